"""`speeder model info NAME`: what a backbone is and what Speeder trains on top of it."""

from __future__ import annotations

from speeder.backbone import count_parameters
from speeder.sasrec import SASRec
from speeder_platform.config import load_config
from speeder_platform.modeling import DEFAULT_FEATURE_DIMS, build_from_config


def model_info(name: str, overrides: list[str] | None = None) -> str:
    """A short table: family, d_llm, layers, prompt template cost, total / trainable parameters."""
    cfg = load_config(None, [f"model.backbone={name}", *[f"model.{o}" for o in overrides or []]])
    # A stand-in for featurize's SASRec (frozen, read for the user state): its weights are not Speeder's.
    encoder = SASRec(num_items=1, hidden_size=DEFAULT_FEATURE_DIMS["sequence"])
    model = build_from_config(cfg.model, DEFAULT_FEATURE_DIMS, sequence_encoder=encoder)
    backbone = model._backbone
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    speeder = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith(("backbone.", "sequence_encoder.")))
    total = count_parameters(model) - count_parameters(encoder)
    rows = [
        ("backbone", name),
        ("family", backbone.family),
        ("d_llm", f"{backbone.hidden_size}"),
        ("layers", f"{backbone.num_layers}"),
        ("vocabulary", f"{len(backbone.tokenizer):,}"),
        ("prompt tokens", f"{model.prompt.template_length} + 1 per history item "
                          f"({model.prompt.template_length + cfg.model.max_history} at history "
                          f"{cfg.model.max_history})"),
        ("total parameters", f"{total:,}"),
        ("backbone (frozen)", f"{total - lora - speeder:,}"),
        ("trainable: LoRA", f"{lora:,} (r={cfg.model.lora.r}, {', '.join(cfg.model.lora.target_modules)})"),
        ("trainable: Speeder", f"{speeder:,} (MRC, PPL, heads; feature dims {DEFAULT_FEATURE_DIMS})"),
        ("trainable share", f"{(lora + speeder) / total:.2%}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
