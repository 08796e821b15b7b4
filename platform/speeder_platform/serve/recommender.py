"""The in-process recommender that the Serve app and the Gradio demo share.

    rec = Recommender.from_checkpoint("runs/smoke/train/smoke-stage3/checkpoint_000000")
    rec.recommend([[3, 17, "item-00042"]], k=10)      # item ids or source ids, oldest first
    rec.search("mug", limit=5); rec.item(3); rec.metadata()

The catalog's item tokens are computed once, when the recommender is built; a request then costs
one LLM forward over its (batched) histories and one (B, N) matrix product. Every input is checked
before the model sees it: a bad one raises `RequestError`, which names the field and the value
(`history[2]: unknown item id 999 (the catalog has ids 0..79)`) and carries an HTTP status.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speeder import schema
from speeder.loop import catalog_tokens
from speeder.prompt import pad_histories
from speeder_platform import storage
from speeder_platform.config import ServeConfig

if TYPE_CHECKING:
    from speeder_platform.trained import TrainedModel

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200  # title search strings longer than this are refused
MAX_SEARCH_LIMIT = 100


class RequestError(ValueError):
    """A bad request: `field` names the offending input (`k`, `history[3]`, `id`), `status` is the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults are ServeConfig's (the one place they are set)."""

    max_history: int = ServeConfig.max_history
    max_k: int = ServeConfig.max_k
    max_batch_requests: int = ServeConfig.max_batch_requests


@dataclass(frozen=True)
class Query:
    """One validated recommendation request: item ids only, oldest first."""

    history: tuple[int, ...]
    k: int
    candidates: tuple[int, ...] | None = None
    exclude_history: bool = True


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _same_uri(a: str, b: str) -> bool:
    """Whether two storage URIs name the same object (local paths compared absolute)."""
    def norm(uri: str) -> str:
        try:
            return uri.rstrip("/") if storage.is_s3(uri) else storage.resolve(uri)[1].rstrip("/")
        except ValueError:
            return uri

    return norm(a) == norm(b)


def resolve_image_uri(dataset: str, image_uri: str | None) -> str | None:
    """An items.parquet image_uri as a storage URI we may read, or None.

    The featurize job's rule (featurize.ops.locate_image), so the API serves exactly the images the
    model saw: relative paths stay inside the dataset root (`..` and symlinks resolved first), absolute
    local paths only when inside a local root, s3:// as given; anything escaping the root
    (`../../etc/passwd`, `/etc/passwd`, a link out) is refused and logged. Remote web URLs are never
    fetched: nothing leaves the machine, so such items simply have no image here.
    """
    from speeder_platform.featurize.ops import REFUSED, locate_image

    status, uri = locate_image(image_uri, dataset)
    if status == REFUSED:
        log.warning("image_uri %r escapes the dataset %s: refused", str(image_uri)[:200], dataset)
    return uri


def load_test_users(dataset: str, split: str = "test") -> dict[int, tuple[list[int], int]]:
    """user_id -> (history oldest first, held-out target) of a split, for the demo's "pick a test user"."""
    from speeder_platform.tables import require_columns, split_uri

    uri = split_uri(dataset, split)
    table = storage.read_table(uri, columns=[schema.USER_ID, schema.HISTORY, schema.TARGET])
    require_columns(table, [schema.USER_ID, schema.HISTORY, schema.TARGET], uri)
    users = table.column(schema.USER_ID).to_pylist()
    histories = table.column(schema.HISTORY).to_pylist()
    targets = table.column(schema.TARGET).to_pylist()
    return {int(u): (list(h), int(t)) for u, h, t in zip(users, histories, targets, strict=True)}


class Recommender:
    """A trained model, its catalog and the checks a request goes through (thread-safe)."""

    def __init__(self, trained: TrainedModel, dataset: str, limits: Limits = Limits(),
                 eval_metrics: dict | None = None) -> None:
        from speeder_platform.tables import require_columns

        self.trained = trained
        self.model = trained.model
        self.dataset = dataset
        self.limits = limits
        self.eval_metrics = eval_metrics
        items_uri = storage.join(dataset, schema.ITEMS_FILE)
        items = storage.read_table(items_uri).sort_by(schema.ITEM_ID)
        require_columns(items, [schema.ITEM_ID, schema.SOURCE_ID, schema.TITLE], items_uri)
        ids = items.column(schema.ITEM_ID).to_numpy()
        n = trained.features.num_items
        if not np.array_equal(ids, np.arange(n)):
            raise ValueError(f"{dataset}: items.parquet ids do not match the {n} featurized items (0..{n - 1})")
        self.titles: list[str] = [t or "" for t in items.column(schema.TITLE).to_pylist()]
        self.source_ids: list[str] = items.column(schema.SOURCE_ID).to_pylist()
        image_col = items.column(schema.IMAGE_URI).to_pylist() if schema.IMAGE_URI in items.column_names else [None] * n
        self.images: list[str | None] = [resolve_image_uri(dataset, u) for u in image_col]
        self.by_source = {s: i for i, s in enumerate(self.source_ids)}
        self._lower_titles = [t.lower() for t in self.titles]
        self.active = list(trained.active)  # the modalities of the checkpoint's stage
        self.table = catalog_tokens(self.model, trained.features, self.active).float()  # (N, D), once
        self.model_max_history = int(self.model.settings.max_history)
        self._lock = threading.Lock()  # one forward at a time: the demo calls from several threads
        self._test_users: dict[int, tuple[list[int], int]] | None = None
        self.stats = {"forwards": 0, "requests": 0, "max_batch": 0}
        log.info("recommender ready: %s, %d items, modalities %s", trained.version, n, ", ".join(trained.active))

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dataset: str | None = None, features_name: str | None = None, *,
                        device: str = "cpu", limits: Limits = Limits(),
                        eval_metrics_uri: str | None = None) -> Recommender:
        """Load a checkpoint (safetensors + JSON, nothing unpickled) and build the catalog's item tokens.

        `dataset` defaults to the one the checkpoint was trained on. `eval_metrics_uri` (a metrics.json
        of `speeder evaluate`) is reported by `metadata()` when it evaluated this very checkpoint.
        """
        from speeder_platform.config import from_dict
        from speeder_platform.trained import load_trained

        trained = load_trained(checkpoint, dataset, features_name, device)
        dataset = dataset or from_dict(trained.meta["config"]).data.uri
        eval_metrics = None
        if eval_metrics_uri and storage.exists(eval_metrics_uri):
            found = storage.read_json(eval_metrics_uri)
            if _same_uri(str(found.get("checkpoint")), checkpoint):
                eval_metrics = found.get("metrics")
            else:
                log.info("%s evaluated %s, not the served checkpoint: not reported", eval_metrics_uri,
                         found.get("checkpoint"))
        return cls(trained, dataset, limits, eval_metrics)

    # -- the catalog --------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.titles)

    def item_id(self, value: Any, field: str) -> int:
        """An item id (int) or a source id (str) -> item id, or RequestError naming `field`."""
        if _is_int(value):
            if not 0 <= value < self.num_items:
                raise RequestError(field, f"unknown item id {value} (the catalog has ids 0..{self.num_items - 1})")
            return int(value)
        if isinstance(value, str):
            if value not in self.by_source:
                raise RequestError(field, f"unknown source id {value[:80]!r}")
            return self.by_source[value]
        raise RequestError(field, f"must be an item id (integer) or a source id (string), got {type(value).__name__}")

    def item(self, item_id: Any, field: str = "id") -> dict[str, Any]:
        """One item's public record; an unknown id raises RequestError with status 404."""
        try:
            return self._record(self.item_id(item_id, field))
        except RequestError as err:
            well_typed = _is_int(item_id) or isinstance(item_id, str)
            raise RequestError(err.field, err.message, status=404 if well_typed else 422) from None

    def _record(self, i: int) -> dict[str, Any]:
        return {"item_id": i, "source_id": self.source_ids[i], "title": self.titles[i], "image_url": self.image_url(i)}

    def image_url(self, item_id: int) -> str | None:
        """Where the app serves the item's image (same origin, never a CDN), or None."""
        return f"/items/{item_id}/image" if self.images[item_id] else None

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        """(bytes, media type) of an item's image read from the dataset, or None when it has none."""
        uri = self.images[self.item(item_id)["item_id"]]
        if uri is None:
            return None
        from speeder_platform.featurize.ops import read_image_bytes

        status, data = read_image_bytes(uri)  # regular files only, size-capped, never raises
        if data is None:
            log.warning("image of item %d unreadable (%s): %s", item_id, uri, status)
            return None
        return data, mimetypes.guess_type(uri)[0] or "application/octet-stream"

    def search(self, q: str, limit: int = 10) -> list[dict[str, Any]]:
        """Case-insensitive title search: an exact source id first, then titles starting with q, then containing it."""
        if not isinstance(q, str):
            raise RequestError("q", "must be a string")
        if len(q) > MAX_QUERY_CHARS:
            raise RequestError("q", f"at most {MAX_QUERY_CHARS} characters, got {len(q)}")
        if not _is_int(limit) or not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise RequestError("limit", f"must be an integer in 1..{MAX_SEARCH_LIMIT}, got {limit!r}")
        needle = q.strip().lower()
        exact = [self.by_source[q]] if q in self.by_source else []
        starts = [i for i, t in enumerate(self._lower_titles) if t.startswith(needle)]
        contains = [i for i, t in enumerate(self._lower_titles) if needle in t and not t.startswith(needle)]
        seen: dict[int, None] = dict.fromkeys(exact + starts + contains)
        return [self._record(i) for i in list(seen)[:limit]]

    # -- requests -----------------------------------------------------------------------------------
    def _ids(self, values: Any, field: str, max_len: int) -> tuple[int, ...]:
        if not isinstance(values, list | tuple):
            raise RequestError(field, f"must be a list of item ids or source ids, got {type(values).__name__}")
        if not values:
            raise RequestError(field, "must not be empty")
        if len(values) > max_len:
            raise RequestError(field, f"at most {max_len} items, got {len(values)}")
        return tuple(self.item_id(v, f"{field}[{i}]") for i, v in enumerate(values))

    def query(self, history: Any, k: Any = 10, candidates: Any = None, exclude_history: Any = True,
              index: int | None = None) -> Query:
        """Check one request and resolve source ids; `index` is its place in a batch request (for field names)."""
        at = "" if index is None else f"[{index}]"
        if not _is_int(k) or not 1 <= k <= self.limits.max_k:
            raise RequestError("k", f"must be an integer in 1..{self.limits.max_k}, got {k!r}")
        if not isinstance(exclude_history, bool):
            raise RequestError("exclude_history", f"must be true or false, got {exclude_history!r}")
        ids = self._ids(history, "history" if index is None else f"histories{at}", self.limits.max_history)
        cands = None
        if candidates is not None:
            cands = tuple(dict.fromkeys(self._ids(candidates, f"candidates{at}", self.num_items)))  # dedupe
        return Query(history=ids, k=int(k), candidates=cands, exclude_history=exclude_history)

    def queries(self, histories: Any, k: Any = 10, candidates: Any = None,
                exclude_history: Any = True) -> list[Query]:
        """Check a batch request: many histories, one k; candidates None or one list per history."""
        if not isinstance(histories, list | tuple):
            raise RequestError("histories", f"must be a list of histories, got {type(histories).__name__}")
        if not histories:
            raise RequestError("histories", "must not be empty")
        if len(histories) > self.limits.max_batch_requests:
            raise RequestError("histories", f"at most {self.limits.max_batch_requests} histories per request, "
                               f"got {len(histories)}")
        if candidates is not None and (not isinstance(candidates, list | tuple) or len(candidates) != len(histories)):
            raise RequestError("candidates", "must hold one candidate list per history")
        return [self.query(h, k, None if candidates is None else candidates[i], exclude_history, i)
                for i, h in enumerate(histories)]

    @torch.no_grad()
    def recommend_queries(self, queries: Sequence[Query]) -> list[list[dict[str, Any]]]:
        """Top-k items of each (already checked) query, in ONE forward pass over all their histories.

        Each result is a list of {rank, item_id, source_id, title, score, image_url}, best first. With
        exclude_history the history's items are never recommended; with candidates only they are ranked.
        """
        if not queries:
            return []
        device = self.table.device
        hist = torch.from_numpy(pad_histories([list(q.history) for q in queries], self.model_max_history))
        with self._lock:
            u, _, _ = self.model.user_vectors(hist.to(device), self.table, self.active)  # (B, D)
            scores = self.model.item_scores(u, self.table).float().cpu()  # (B, N)
            self.stats["forwards"] += 1
            self.stats["requests"] += len(queries)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(queries))
        out = []
        for row, q in enumerate(queries):
            pool = torch.tensor(q.candidates) if q.candidates is not None else torch.arange(self.num_items)
            if q.exclude_history:
                pool = pool[~torch.isin(pool, torch.tensor(q.history))]
            values, index = scores[row, pool].topk(min(q.k, len(pool)))  # sorted, descending
            out.append([{"rank": r + 1, **self._record(int(pool[i])), "score": float(v)}
                        for r, (v, i) in enumerate(zip(values.tolist(), index.tolist(), strict=True))])
        return out

    def recommend(self, histories: Sequence[Sequence[Any]], k: int = 10, candidates: Sequence | None = None,
                  exclude_history: bool = True) -> list[list[dict[str, Any]]]:
        """Check and answer a batch of histories (item ids or source ids, oldest first) in one forward."""
        return self.recommend_queries(self.queries(list(histories), k, candidates, exclude_history))

    # -- about the model ----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Model version, stage, modalities, catalog size, metrics, limits and batching counters.

        What anyone may know about the model (the API serves it as is): never a path (checkpoint,
        dataset), host, process id or credential; those stay on `trained` and `dataset`.
        """
        meta = self.trained.meta
        return {
            "model_version": self.trained.version,
            "stage": meta.get("stage"),
            "step": meta.get("step"),
            "modalities": list(self.trained.active),
            "num_items": self.num_items,
            "model_max_history": self.model_max_history,
            "train_metrics": meta.get("metrics", {}),
            "eval_metrics": self.eval_metrics,
            "limits": asdict(self.limits),
            "batching": dict(self.stats),
        }

    @property
    def test_users(self) -> dict[int, tuple[list[int], int]]:
        """The test split's users (history, held-out target), read on first use."""
        if self._test_users is None:
            self._test_users = load_test_users(self.dataset)
        return self._test_users
