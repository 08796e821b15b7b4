"""What an importer hands to `prepare`: raw records in file order, before any filtering.

Importers (movielens, amazon, synthetic) only parse; the protocol (k-core, ids, splits, candidates)
lives in `protocol` and runs the same way for every source.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_LINE_NUMBERS = 5  # line numbers kept per reason, for the warning


@dataclass(frozen=True)
class RawItem:
    """One catalog record. `text` is already normalised; the image is fetched only if the item survives."""

    title: str
    text: str
    image_url: str | None = None  # an absolute http(s) URI, kept as is (later stages cannot fetch it offline)
    image_loader: Callable[[], bytes] | None = None  # bytes copied into <dataset>/images/<item_id><ext>
    image_ext: str | None = None  # ".png", ".jpg", ... (with the dot) when image_loader is set


@dataclass
class RawDataset:
    """Interactions in the order the source files hold them, plus the catalog keyed by source id."""

    source: str
    origin: str  # where the records came from, for meta.json
    user_ids: list[str]  # (R,) source user id per interaction
    item_ids: list[str]  # (R,) source item id per interaction
    timestamps: np.ndarray  # (R,) int64, in the source's unit
    ratings: np.ndarray  # (R,) float64, NaN when unknown
    catalog: dict[str, RawItem]
    timestamp_divisor: int = 1  # source units per second (1000 for milliseconds)
    skipped: Counter[str] = field(default_factory=Counter)  # "<file>:<reason>" -> lines skipped
    repaired: Counter[str] = field(default_factory=Counter)  # "<file>:<reason>" -> lines kept after cleaning
    extra_meta: dict[str, Any] = field(default_factory=dict)


class MalformedLines:
    """Counts skipped lines per reason and remembers the first few line numbers of each."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.counts: Counter[str] = Counter()
        self.first_lines: dict[str, list[int]] = {}

    def add(self, reason: str, line_no: int) -> None:
        self.counts[reason] += 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < MAX_LINE_NUMBERS:
            lines.append(line_no)

    def total(self) -> int:
        return sum(self.counts.values())

    def prefixed(self) -> Counter[str]:
        return Counter({f"{self.label}:{reason}": n for reason, n in self.counts.items()})

    def warn(self, log: logging.Logger, where: str) -> None:
        """One warning line per file: counts per reason and the first line numbers."""
        if not self.counts:
            return
        parts = [
            f"{reason}: {n} (first at line {', '.join(map(str, self.first_lines[reason]))})"
            for reason, n in sorted(self.counts.items())
        ]
        log.warning("%s: skipped %d malformed line(s): %s", where, self.total(), "; ".join(parts))
