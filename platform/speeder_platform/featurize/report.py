"""FeaturizeReport: what a featurize run did, as the job summary records it and the log prints it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FeaturizeReport:
    """What a featurize run did. `encoded` items went through the encoders in this run."""

    name: str
    uri: str
    mode: str  # full | incremental | up_to_date
    items: int  # rows of the features table
    encoded: int = 0
    items_with_text: int = 0  # of the encoded items: non-blank text (blank ones are encoded from the title)
    image_status: dict[str, int] = field(default_factory=dict)  # of the encoded items; empty without vision
    seq_items: int = 0  # rows with seq_emb (items with train interactions)
    dims: dict[str, int] = field(default_factory=dict)
    sasrec: str = "-"  # trained | loaded | kept (incremental) | off (...)
    seconds: float = 0.0  # the whole run
    encode_seconds: float = 0.0  # the Ray Data pipeline (actor start-up included)
    sequence_seconds: float = 0.0  # SASRec (training or loading)

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "items_per_s": self.items_per_s}

    def summary(self) -> str:
        if self.mode == "up_to_date":
            return (f"features {self.name}: up to date ({self.items:,} items, same settings and dataset as the "
                    f"last full run; nothing encoded) -> {self.uri}")
        head = (f"features {self.name} ({self.mode}): encoded {self.encoded:,} of {self.items:,} items in "
                f"{self.seconds:.1f}s ({self.items_per_s:.1f} items/s; encoders {self.encode_seconds:.1f}s, "
                f"SASRec {self.sequence_seconds:.1f}s) -> {self.uri}")
        if self.mode == "incremental" and self.encoded == 0:
            return f"features {self.name} (incremental): no new items; {self.items:,} items unchanged -> {self.uri}"
        images = "not encoded (vision_encoder none)"
        if self.image_status:
            images = ", ".join(f"{k} {v:,}" for k, v in self.image_status.items() if v) or "none"
        return "\n".join([
            head,
            f"text: {self.items_with_text:,} items with text, dim {self.dims.get('text', 0)}",
            f"images: {images}; dim {self.dims.get('vision', 0)}",
            f"sequence: {self.seq_items:,} items with seq_emb, dim {self.dims.get('sequence', 0)} "
            f"(SASRec {self.sasrec})",
        ])
