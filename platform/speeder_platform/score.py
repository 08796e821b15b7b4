"""`speeder score CONFIG`: nightly batch scoring, top-K over the whole catalog for every user.

    speeder score jobs/score.yaml score.date=2026-11-27
    speeder score jobs/smoke.yaml score.input=s3://bucket/histories.parquet

Input: `score.input` (parquet: user_id int64, history list<int64>, oldest first) or, by default, every
user's whole chronological sequence from `<data>/interactions.parquet` (ties in file order): the
recommendations for what comes after everything we know. The model reads the last `max_history`
items of a history (its checkpoint's setting); every item of the history is excluded from its top-K.

Ray Data feeds the histories to `score.num_actors` scorer actors; each loads the checkpoint and builds
the catalog's item tokens once. A scorer actor that dies is restarted and its batches retried, so every
user is scored exactly once; writes to object storage are retried while the endpoint is down. Users
with an empty history, an item id outside the catalog, no user_id, or more than one input row are
counted by reason and skipped.

Output: `<score.out>/dt=YYYY-MM-DD/*.parquet` with user_id int64, item_ids list<int64>, scores
list<float32> (descending), model_version string, scored_at timestamp[us, UTC]. The partition is
written to a fresh staging folder and committed in one step (storage.staging_dir): rerunning a date
replaces it, readers never see a mix, and two runs of the same date at once (a retried nightly job)
leave the whole partition of the one that committed last. Read it back with `read_scores(out, date)`.

A checkpoint is only scored with the features it was trained on (lineage.check_checkpoint): other
features, or a features table that is not the one its meta.json committed, are refused before any
actor starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speeder import schema
from speeder_platform import storage
from speeder_platform.config import SpeederConfig

log = logging.getLogger("speeder.score")

ITEM_IDS, SCORES, MODEL_VERSION, SCORED_AT = "item_ids", "scores", "model_version", "scored_at"
SKIP_REASON = "skip_reason"  # internal: null for scored users
SCORES_SCHEMA = pa.schema([
    pa.field(schema.USER_ID, pa.int64()),
    pa.field(ITEM_IDS, pa.list_(pa.int64())),
    pa.field(SCORES, pa.list_(pa.float32())),
    pa.field(MODEL_VERSION, pa.string()),
    pa.field(SCORED_AT, pa.timestamp("us", tz="UTC")),
])
SKIP_REASONS = ("missing_user_id", "empty_history", "unknown_item", "duplicate_user_id")


@dataclass
class ScoreReport:
    users_scored: int
    skipped: dict[str, int]
    partition: str
    date: str
    model_version: str | None
    checkpoint: str
    k: int
    seconds: float = 0.0

    @property
    def users_per_s(self) -> float:
        return self.users_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "users_per_s": self.users_per_s}

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v:,}" for k, v in self.skipped.items() if v) or "none"
        return (f"scored {self.users_scored:,} users (top-{self.k}) with {self.model_version} in {self.seconds:.1f}s "
                f"({self.users_per_s:.1f} users/s) -> {self.partition}\nskipped: {skipped}")


def partition_uri(out: str, date: str) -> str:
    return storage.join(out, f"dt={date}")


def read_scores(out: str, date: str) -> pa.Table:
    """A committed date partition, sorted by user_id."""
    return storage.read_table(partition_uri(out, date)).sort_by(schema.USER_ID)


class Scorer:
    """Ray Data actor: (user_id, history) batches -> top-K rows. Loads the model and the catalog once."""

    def __init__(self, checkpoint: str, dataset: str, features_name: str, k: int, scored_at: datetime.datetime,
                 num_gpus: float = 0.0) -> None:
        import torch

        from speeder.loop import catalog_tokens
        from speeder_platform.trained import load_trained

        device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.trained = load_trained(checkpoint, dataset, features_name, device)
        self.model = self.trained.model
        self.items = catalog_tokens(self.model, self.trained.features, self.trained.active).float()  # (N, D)
        self.num_items = self.items.shape[0]
        self.k = min(k, self.num_items)
        self.max_history = self.model.settings.max_history
        self.version = self.trained.version
        self.scored_at = scored_at

    def _check(self, user: int | None, history: list | None) -> str | None:
        if user is None:
            return "missing_user_id"
        if not history:
            return "empty_history"
        if any(i is None or not 0 <= i < self.num_items for i in history):
            return "unknown_item"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from speeder.prompt import pad_histories

        users = batch.column(schema.USER_ID).to_pylist()
        histories = batch.column(schema.HISTORY).to_pylist()
        reasons = [self._check(u, h) for u, h in zip(users, histories, strict=True)]
        ok = [i for i, r in enumerate(reasons) if r is None]
        item_ids: list[list[int] | None] = [None] * len(users)
        scores: list[list[float] | None] = [None] * len(users)
        if ok:
            device = self.items.device
            hist = torch.from_numpy(pad_histories([histories[i] for i in ok], self.max_history)).to(device)
            with torch.no_grad():
                u, _, _ = self.model.user_vectors(hist, self.items, self.trained.active)  # (B, D)
                s = self.model.item_scores(u, self.items).float()  # (B, N)
                rows = np.repeat(np.arange(len(ok)), [len(histories[i]) for i in ok])
                cols = np.concatenate([np.asarray(histories[i], np.int64) for i in ok])
                s[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = float("-inf")
                top = s.topk(self.k, dim=1)  # sorted, descending
            values, index = top.values.cpu().numpy(), top.indices.cpu().numpy()
            for row, i in enumerate(ok):
                keep = np.isfinite(values[row])  # a history covering most of the catalog leaves < K items
                item_ids[i] = index[row][keep].tolist()
                scores[i] = values[row][keep].tolist()
        n = len(users)
        return pa.table({
            schema.USER_ID: pa.array(users, pa.int64()),
            ITEM_IDS: pa.array(item_ids, pa.list_(pa.int64())),
            SCORES: pa.array(scores, pa.list_(pa.float32())),
            MODEL_VERSION: pa.array([self.version] * n, pa.string()),
            SCORED_AT: pa.array([self.scored_at] * n, pa.timestamp("us", tz="UTC")),
            SKIP_REASON: pa.array(reasons, pa.string()),
        })


def latest_histories(data_uri: str) -> pa.Table:
    """Every user's whole chronological sequence (ties in file order) as (user_id, history)."""
    inter = storage.read_table(storage.join(data_uri, schema.INTERACTIONS_FILE),
                               columns=[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP])
    user = inter.column(schema.USER_ID).to_numpy()
    order = np.lexsort((np.arange(len(user)), inter.column(schema.TIMESTAMP).to_numpy(), user))
    user, item = user[order], inter.column(schema.ITEM_ID).to_numpy()[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(user)) + 1]).astype(np.int64)
    offsets = np.concatenate([starts, [len(user)]]).astype(np.int32)
    return pa.table({schema.USER_ID: pa.array(user[starts], pa.int64()),
                     schema.HISTORY: pa.ListArray.from_arrays(pa.array(offsets), pa.array(item, pa.int64()))})


def _num_blocks(rows: int, cfg: SpeederConfig) -> int:
    """Blocks to spread over the scorers: a block goes to one actor, so one block would use one actor."""
    return max(1, min(-(-rows // cfg.score.batch_size), cfg.score.num_actors * 8))


def _histories(cfg: SpeederConfig, env: dict[str, Any]) -> Any:
    """The input as a materialised Ray Dataset (read before the scorers start, so they never compete).
    A small input (tables.SMALL_TABLE_BYTES) is read by the driver: no read tasks to start."""
    import ray.data

    from speeder_platform.tables import in_blocks, is_small, require_columns

    if cfg.score.input is None:
        table = latest_histories(cfg.data.uri)
    elif is_small(cfg.score.input):
        table = storage.read_table(cfg.score.input)
        require_columns(table, [schema.USER_ID, schema.HISTORY], f"score.input {cfg.score.input}")
        table = table.select([schema.USER_ID, schema.HISTORY])
    else:
        fs, path = storage.resolve(cfg.score.input)
        ds = ray.data.read_parquet(path, filesystem=fs, runtime_env=env)
        require_columns(ds.schema().names, [schema.USER_ID, schema.HISTORY], f"score.input {cfg.score.input}")
        ds = ds.select_columns([schema.USER_ID, schema.HISTORY]).materialize()
        return ds.repartition(_num_blocks(ds.count(), cfg)).materialize()
    return ray.data.from_arrow(in_blocks(table, -(-table.num_rows // _num_blocks(table.num_rows, cfg))))


def _drop_rows(batch: pa.Table, duplicates: np.ndarray) -> pa.Table:
    """Ray Data task: keep scored users that are not duplicated; drop the internal column."""
    keep = pc.and_(pc.is_null(batch.column(SKIP_REASON)),
                   pc.invert(pc.is_in(batch.column(schema.USER_ID), value_set=pa.array(duplicates, pa.int64()))))
    return batch.filter(keep).drop_columns([SKIP_REASON]).cast(SCORES_SCHEMA)


def _outcome(scored: Any) -> tuple[dict[str, int], np.ndarray, str | None]:
    """Skip counts by reason, the user ids to drop as duplicates, and the model version, from the
    scored dataset's small columns (the top-K lists stay in the object store)."""
    import ray

    parts = ray.get(scored.select_columns([schema.USER_ID, SKIP_REASON, MODEL_VERSION]).to_arrow_refs())
    if not parts:
        return dict.fromkeys(SKIP_REASONS, 0), np.zeros(0, np.int64), None
    status = pa.concat_tables(parts)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for row in pc.value_counts(status.column(SKIP_REASON).drop_null()).to_pylist():
        skipped[row["values"]] += int(row["counts"])
    ok_users = status.filter(pc.is_null(status.column(SKIP_REASON))).column(schema.USER_ID).to_numpy()
    uniq, counts = np.unique(ok_users, return_counts=True)
    skipped["duplicate_user_id"] = int(counts[counts > 1].sum())
    if skipped["duplicate_user_id"]:
        log.warning("score.input: %d users appear more than once; all their rows skipped",
                    int((counts > 1).sum()))
    versions = status.column(MODEL_VERSION).drop_null()
    return skipped, uniq[counts > 1], versions[0].as_py() if len(versions) else None


def run_score(cfg: SpeederConfig) -> ScoreReport:
    """Score every user of the input with the checkpoint and commit the date partition."""
    import ray.data

    from speeder.checkpoint import META_FILE
    from speeder_platform.lineage import check_checkpoint, committed_features
    from speeder_platform.ray_utils import cluster_has_gpus, ensure_ray, worker_env
    from speeder_platform.trained import resolve_checkpoint

    t0 = time.perf_counter()
    sc = cfg.score
    checkpoint = resolve_checkpoint(cfg, sc.checkpoint)
    if not storage.exists(storage.join(checkpoint, META_FILE)):  # fail before any actor starts
        raise FileNotFoundError(f"score.checkpoint: no checkpoint at {checkpoint} (no {META_FILE})")
    # Features it was not trained on, or not whole: refused here, before any actor starts (each would refuse).
    check_checkpoint(storage.read_json(storage.join(checkpoint, META_FILE)),
                     committed_features(cfg.data.uri, cfg.featurize.name), checkpoint)
    date = sc.date or datetime.datetime.now(datetime.UTC).date().isoformat()
    final = partition_uri(sc.out, date)
    ensure_ray(cfg)
    # Workers get the driver's storage settings (endpoint, region) even if Ray started earlier; never credentials.
    env = {"env_vars": worker_env()}
    histories = _histories(cfg, env)
    gpus = sc.actor_num_gpus if sc.actor_num_gpus is not None else (1.0 if cluster_has_gpus() else 0.0)
    scored_at = datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # one time for the whole run
    log.info("scoring %s with %s -> %s (%d actors)", sc.input or "every user's history", checkpoint, final,
             sc.num_actors)
    scored = histories.map_batches(
        Scorer, fn_constructor_kwargs={"checkpoint": checkpoint, "dataset": cfg.data.uri,
                                       "features_name": cfg.featurize.name, "k": sc.k, "scored_at": scored_at,
                                       "num_gpus": gpus},
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors), batch_size=sc.batch_size, batch_format="pyarrow",
        num_cpus=sc.actor_num_cpus, num_gpus=gpus, runtime_env=env,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a scorer that dies is
        # restarted and its unfinished batches run again, a failed task's output is discarded, so every
        # user is scored exactly once (bench.faults.score.score_actor_killed checks it).
    ).materialize()  # scored once; counted, then written from the object store
    skipped, duplicates, version = _outcome(scored)
    users = scored.count() - sum(skipped.values())
    with storage.staging_dir(final) as staging:  # a fresh folder, committed over `final` on success
        fs, path = storage.resolve(staging)
        if users:
            scored.map_batches(_drop_rows, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow",
                               runtime_env=env).write_parquet(path, filesystem=fs, ray_remote_args={"runtime_env": env})
        else:  # an empty partition still commits, with the schema
            storage.write_table(SCORES_SCHEMA.empty_table(), storage.join(staging, "part-empty.parquet"))
    report = ScoreReport(users_scored=users, skipped=skipped, partition=final, date=date, model_version=version,
                         checkpoint=checkpoint, k=sc.k, seconds=time.perf_counter() - t0)
    log.info("%s", report.summary())
    return report
