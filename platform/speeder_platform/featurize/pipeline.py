"""`speeder featurize CONFIG [--incremental]`: item text, images and sequences -> the features table.

    speeder featurize jobs/smoke.yaml
    speeder featurize jobs/smoke.yaml --incremental        # encode only items not in the table yet

Ray Data streams `<data>/items.parquet` (local or s3://) through
    text actors (featurize.text_actors x TextEmbedder)  -> text_emb
    image decode tasks (featurize.ops.decode_images)     -> pixels + a status per image
    vision actors (featurize.vision_actors x ImageEmbedder) -> image_emb (null without a usable image)
while a Ray task trains SASRec on the train part of every sequence (featurize.sequence) -> seq_emb.
Encoder actors get `featurize.actor_num_cpus` CPUs (fractional on small machines) and a GPU each when
the cluster has GPUs (or `featurize.actor_num_gpus`).

Writes `<data>/features/<name>/items.parquet` (item_id 0..N-1, text_emb, image_emb, seq_emb as
list<float32>, nullable) in one atomic write, then `meta.json` (encoders, dims, counts per image
status, settings, the set's fingerprint and the table's SHA-256): the set commits as one unit
(lineage.commit), and checkpoints record its fingerprint. A full run whose settings and dataset files
match the last full run's, and whose table is still the one committed, is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speeder import schema
from speeder_platform import lineage, storage
from speeder_platform.config import SpeederConfig, to_dict
from speeder_platform.featurize.ops import (
    EMB_TYPE,
    IMAGE_STATUS,
    ImageEmbedder,
    TextEmbedder,
    decode_images,
    drop_known,
    list_column,
    null_column,
    status_counts,
)
from speeder_platform.featurize.report import FeaturizeReport
from speeder_platform.featurize.sequence import SequenceFeatures, sequence_features
from speeder_platform.tables import features_folder, features_uri, in_blocks, is_small, require_columns

log = logging.getLogger("speeder.featurize")

META_FORMAT = "speeder-features/1"
FEATURES_SCHEMA = pa.schema([pa.field(schema.ITEM_ID, pa.int64(), nullable=False),
                             pa.field(schema.TEXT_EMB, EMB_TYPE), pa.field(schema.IMAGE_EMB, EMB_TYPE),
                             pa.field(schema.SEQ_EMB, EMB_TYPE)])
PROGRESS_EVERY_S = 10.0


def features_dir(cfg: SpeederConfig) -> str:
    return features_folder(cfg.data.uri, cfg.featurize.name)


def encoder_settings(cfg: SpeederConfig) -> dict[str, Any]:
    """What the features depend on (not how many actors computed them)."""
    fz = cfg.featurize
    out: dict[str, Any] = {"text_encoder": fz.text_encoder, "vision_encoder": fz.vision_encoder,
                           "image_size": fz.image_size, "sasrec": to_dict(fz.sasrec)}
    if fz.text_encoder == "backbone":
        out["backbone"] = {"name": cfg.model.backbone, "num_layers": cfg.model.num_layers, "dtype": cfg.model.dtype}
    return out


def _file_digest(uri: str) -> str:
    fs, path = storage.resolve(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(data_uri: str) -> dict[str, str]:
    return {name: _file_digest(storage.join(data_uri, name)) for name in (schema.ITEMS_FILE,
                                                                          schema.INTERACTIONS_FILE)}


def _catalog_ids(items_uri: str) -> tuple[np.ndarray, list[str]]:
    """item_id of items.parquet (checked to be 0..N-1) and the columns the pipeline reads."""
    fs, path = storage.resolve(items_uri)
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except FileNotFoundError:
        raise FileNotFoundError(f"no items at {items_uri}: run `speeder data prepare` first") from None
    require_columns(pa.table({n: [] for n in names}), [schema.ITEM_ID, schema.TEXT, schema.IMAGE_URI], items_uri)
    ids = np.sort(storage.read_table(items_uri, columns=[schema.ITEM_ID]).column(schema.ITEM_ID).to_numpy())
    if not len(ids):
        raise ValueError(f"{items_uri}: no items")
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{items_uri}: item_id must be exactly 0..N-1 (found {len(ids)} rows, max id {ids.max()})")
    columns = [schema.ITEM_ID, schema.TEXT, schema.IMAGE_URI] + ([schema.TITLE] if schema.TITLE in names else [])
    return ids, columns


def _num_gpus(cfg: SpeederConfig) -> float:
    from speeder_platform.ray_utils import cluster_has_gpus

    if cfg.featurize.actor_num_gpus is not None:
        return cfg.featurize.actor_num_gpus
    return 1.0 if cluster_has_gpus() else 0.0


def _encode(cfg: SpeederConfig, items_uri: str, columns: list[str], known: np.ndarray | None,
            total: int) -> pa.Table:
    """The Ray Data pipeline: items (minus `known` ids) -> item_id, text_emb, has_text, image_emb, image_status."""
    import ray.data

    from speeder_platform.ray_utils import worker_env

    fz = cfg.featurize
    gpus = _num_gpus(cfg)
    # Workers get the driver's storage settings (endpoint, region) even if Ray started earlier; never credentials.
    common = {"batch_format": "pyarrow", "batch_size": fz.batch_size, "runtime_env": {"env_vars": worker_env()}}
    pool = {**common, "num_cpus": fz.actor_num_cpus, "num_gpus": gpus}
    if is_small(items_uri):  # read by the driver (tables.SMALL_TABLE_BYTES): no read tasks to start
        items = storage.read_table(items_uri, columns=columns)
        if known is not None:
            items = drop_known(items, known)
        if not items.num_rows:
            return pa.table({})  # nothing to encode, as when the pipeline yields no batch
        ds = ray.data.from_arrow(in_blocks(items, fz.batch_size))
    else:
        fs, path = storage.resolve(items_uri)
        ds = ray.data.read_parquet(path, filesystem=fs, columns=columns, runtime_env=common["runtime_env"])
        if known is not None:
            ds = ds.map_batches(drop_known, fn_kwargs={"known": known}, **common)
    backbone = encoder_settings(cfg).get("backbone")
    ds = ds.map_batches(TextEmbedder, fn_constructor_kwargs={"encoder": fz.text_encoder, "num_gpus": gpus,
                                                             "backbone": backbone},
                        compute=ray.data.ActorPoolStrategy(size=fz.text_actors), **pool)
    if fz.vision_encoder != "none":
        ds = ds.map_batches(decode_images, fn_kwargs={"root": cfg.data.uri, "image_size": fz.image_size}, **common)
        ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"encoder": fz.vision_encoder,
                                                                  "image_size": fz.image_size, "num_gpus": gpus},
                            compute=ray.data.ActorPoolStrategy(size=fz.vision_actors), **pool)
    else:
        ds = ds.drop_columns([schema.IMAGE_URI])
    batches, done, t0, last = [], 0, time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        batches.append(batch)
        done += batch.num_rows
        if time.perf_counter() - last > PROGRESS_EVERY_S:
            last = time.perf_counter()
            log.info("featurize: %d/%d items encoded (%.1f items/s)", done, total, done / (last - t0))
    if not batches:
        return pa.table({})
    return pa.concat_tables(batches).sort_by(schema.ITEM_ID)


def _sequence_task(*args: Any) -> SequenceFeatures:
    """sequence_features in a Ray worker, its per-epoch log lines sent to the driver (Ray forwards stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for name in ("speeder.sasrec", "speeder.featurize"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    return sequence_features(*args)


def _start_sequence_task(cfg: SpeederConfig, num_items: int, cpus: int = 1) -> Any:
    """Submit SASRec training as a Ray task on `cpus` CPUs (one thread each); returns its ObjectRef."""
    import ray

    from speeder_platform.ray_utils import worker_env

    gpus = 1.0 if _num_gpus(cfg) > 0 else 0.0
    task = ray.remote(_sequence_task).options(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": worker_env()})
    return task.remote(cfg.data.uri, features_dir(cfg), to_dict(cfg.featurize.sasrec), num_items,
                       "cuda" if gpus else "cpu", cpus)


def _sasrec_alongside(cfg: SpeederConfig) -> bool:
    """Whether SASRec fits beside the encoder pools and a decode/read task (else it runs after them:
    on a 2-core machine it would hold the CPU the read tasks need)."""
    import ray

    fz = cfg.featurize
    actors = fz.text_actors + (fz.vision_actors if fz.vision_encoder != "none" else 0)
    total = ray.cluster_resources()
    gpus = _num_gpus(cfg)
    spare_cpus = total.get("CPU", 0.0) - actors * fz.actor_num_cpus - 1.0
    spare_gpus = total.get("GPU", 0.0) - actors * gpus
    return spare_cpus >= 1.0 and (gpus == 0 or spare_gpus >= 1.0)


def _check_compatible(meta: dict[str, Any] | None, cfg: SpeederConfig, uri: str) -> None:
    settings = encoder_settings(cfg)
    if meta is None:
        raise ValueError(f"{uri}: no meta.json beside the features: run a full featurize (without --incremental)")
    old = {k: v for k, v in meta.get("settings", {}).items() if k != "sasrec"}
    new = {k: v for k, v in settings.items() if k != "sasrec"}
    if old != new:
        raise ValueError(f"featurize --incremental: the features at {uri} were made with {old}, not {new}; "
                         "run a full featurize")


def _extendable(cfg: SpeederConfig, meta: dict[str, Any] | None, out_uri: str, items_uri: str,
                num_items: int) -> tuple[pa.Table, np.ndarray]:
    """The committed features an incremental run extends, and their item ids; refused (ValueError,
    FeaturesError) when made with other encoders, not whole, or from another preparation of the dataset."""
    _check_compatible(meta, cfg, out_uri)
    lineage.committed_features(cfg.data.uri, cfg.featurize.name)  # never extend a half-committed or corrupt table
    existing = storage.read_table(out_uri)
    require_columns(existing, FEATURES_SCHEMA.names, out_uri)
    existing = existing.select(FEATURES_SCHEMA.names).cast(FEATURES_SCHEMA)
    known = existing.column(schema.ITEM_ID).to_numpy()
    if known.size and known.max() >= num_items:
        raise ValueError(f"{out_uri} has item ids up to {known.max()} but {items_uri} only 0..{num_items - 1}: "
                         "the dataset was prepared again; run a full featurize")
    return existing, known


def _encode_and_sequence(cfg: SpeederConfig, items_uri: str, columns: list[str], known: np.ndarray | None,
                         todo: int, num_items: int, full: bool) -> tuple[pa.Table, SequenceFeatures, float]:
    """The encoder pipeline over the items to do and, on a full run, SASRec (beside the encoders when the
    cluster has room, else after them) -> encoded rows, sequence features, the encoders' seconds."""
    import ray

    seq_ref = None
    if full and _sasrec_alongside(cfg):
        seq_ref = _start_sequence_task(cfg, num_items)  # alongside the encoders: the cluster has room
    t0 = time.perf_counter()
    encoded = _encode(cfg, items_uri, columns, known, todo)
    encode_seconds = time.perf_counter() - t0
    if not full:  # incremental: the items it adds get no seq_emb until the next full run
        return encoded, SequenceFeatures(np.zeros((num_items, 0), np.float32), np.zeros(num_items, bool),
                                         {"sasrec": "kept"}), encode_seconds
    if seq_ref is None:  # after the encoders, on up to 2 CPUs (2 threads: ~30% faster per step, sasrec/train.py)
        seq_ref = _start_sequence_task(cfg, num_items, cpus=int(min(2, max(1, ray.cluster_resources()["CPU"]))))
    return encoded, ray.get(seq_ref), encode_seconds


def run_featurize(cfg: SpeederConfig, force: bool = False) -> FeaturizeReport:
    """Featurize the catalog of cfg.data.uri into features/<featurize.name> (see the module docstring).

    force: run even when the last full run had the same settings and the dataset files are unchanged.
    """
    t0 = time.perf_counter()
    fz = cfg.featurize
    items_uri = storage.join(cfg.data.uri, schema.ITEMS_FILE)
    out_uri = features_uri(cfg.data.uri, fz.name)
    meta_uri = storage.join(features_dir(cfg), schema.META_FILE)
    ids, columns = _catalog_ids(items_uri)
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else None
    settings, digest = encoder_settings(cfg), dataset_fingerprint(cfg.data.uri)
    existing, known = None, None
    if fz.incremental and storage.exists(out_uri):
        existing, known = _extendable(cfg, meta, out_uri, items_uri, len(ids))
        if np.isin(ids, known).all():
            report = FeaturizeReport(fz.name, out_uri, "incremental", existing.num_rows, sasrec="kept",
                                     seq_items=existing.num_rows - existing.column(schema.SEQ_EMB).null_count,
                                     dims=meta.get("dims", {}), seconds=time.perf_counter() - t0)
            log.info("featurize --incremental: no new items in %s; features unchanged", items_uri)
            return report
    elif (not fz.incremental and not force and meta and meta.get("settings") == settings
          and meta.get("fingerprint") == digest and _committed(cfg) == lineage.fingerprint(digest, settings)):
        log.info("featurize: %s is up to date (same settings and dataset files); skipping", out_uri)
        return FeaturizeReport(fz.name, out_uri, "up_to_date", meta["counts"]["items"], dims=meta.get("dims", {}),
                               seq_items=meta["counts"].get("seq_items", 0), sasrec="unchanged",
                               seconds=time.perf_counter() - t0)
    from speeder_platform.ray_utils import ensure_ray

    ensure_ray(cfg)
    mode = "incremental" if existing is not None else "full"
    todo = len(ids) - (0 if known is None else int(np.isin(ids, known).sum()))
    log.info("featurize (%s): %d items with text=%s, vision=%s, %d+%d actors", mode, todo, fz.text_encoder,
             fz.vision_encoder, fz.text_actors, fz.vision_actors if fz.vision_encoder != "none" else 0)
    encoded, seq, encode_seconds = _encode_and_sequence(cfg, items_uri, columns, known, todo, len(ids),
                                                        full=existing is None)
    table, report = _assemble(cfg, encoded, existing, seq, len(ids), mode, out_uri)
    report.encode_seconds, report.sequence_seconds = encode_seconds, seq.info.get("seconds", 0.0)
    report.seconds = time.perf_counter() - t0
    # An incremental run extends the last set: checkpoints of that set (or of any it extended) still fit it.
    base = meta.get(lineage.META_KEY) if existing is not None and meta else None
    history = [*meta.get("lineage", []), base] if base else []
    new_meta = {**_meta(cfg, report, meta, seq, digest if mode == "full" else None), "lineage": history}
    lineage.commit(table, features_dir(cfg), new_meta, lineage.fingerprint(digest, settings, extends=base))
    log.info("%s", report.summary())
    return report


def _committed(cfg: SpeederConfig) -> str | None:
    """The fingerprint of the committed features set, None when there is none or it is not whole."""
    try:
        return lineage.committed_features(cfg.data.uri, cfg.featurize.name).fingerprint
    except (FileNotFoundError, lineage.FeaturesError) as err:
        log.info("featurize: the features table will be made again (%s)", err)
        return None


def _dims(table: pa.Table) -> dict[str, int]:
    out = {}
    for modality, column in (("text", schema.TEXT_EMB), ("vision", schema.IMAGE_EMB), ("sequence", schema.SEQ_EMB)):
        values = table.column(column).drop_null()
        out[modality] = len(values[0]) if len(values) else 0
    return out


def _assemble(cfg: SpeederConfig, encoded: pa.Table, existing: pa.Table | None, seq: SequenceFeatures,
              num_items: int, mode: str, out_uri: str) -> tuple[pa.Table, FeaturizeReport]:
    """The encoded rows + seq_emb (+ the existing rows, untouched) -> the features table and the report."""
    n = encoded.num_rows
    ids = encoded.column(schema.ITEM_ID).to_numpy()
    image_emb = encoded.column(schema.IMAGE_EMB) if schema.IMAGE_EMB in encoded.column_names else null_column(n)
    if seq.values.shape[1]:
        seq_col: pa.Array | pa.ChunkedArray = list_column(seq.values[ids], seq.present[ids])
    else:
        seq_col = null_column(n)
    new = pa.table([encoded.column(schema.ITEM_ID), encoded.column(schema.TEXT_EMB), image_emb, seq_col],
                   schema=FEATURES_SCHEMA)
    table = new if existing is None else pa.concat_tables([existing, new]).sort_by(schema.ITEM_ID)
    got = table.column(schema.ITEM_ID).to_numpy()
    if not np.array_equal(got, np.arange(num_items)):
        raise RuntimeError(f"featurize produced {len(got)} rows for {num_items} items (ids not exactly 0..N-1)")
    if existing is not None:
        old_dims, new_dims = _dims(existing), _dims(new)
        for m in ("text", "vision"):
            if old_dims[m] and new_dims[m] and old_dims[m] != new_dims[m]:
                raise ValueError(f"featurize --incremental: new {m} features have dim {new_dims[m]}, the table "
                                 f"{old_dims[m]}; run a full featurize")
    statuses = status_counts(encoded.column(IMAGE_STATUS)) if IMAGE_STATUS in encoded.column_names else {}
    report = FeaturizeReport(
        cfg.featurize.name, out_uri, mode, table.num_rows, encoded=n,
        items_with_text=int(np.sum(encoded.column("has_text").to_numpy(zero_copy_only=False))) if n else 0,
        image_status=statuses, seq_items=table.num_rows - table.column(schema.SEQ_EMB).null_count, dims=_dims(table),
        sasrec=seq.info.get("sasrec", "-"))
    return table, report


def _meta(cfg: SpeederConfig, report: FeaturizeReport, old: dict[str, Any] | None, seq: SequenceFeatures,
          digest: dict[str, str] | None) -> dict[str, Any]:
    """meta.json: counts cover the whole table (an incremental run adds its counts to the last ones)."""
    counts = {"items": report.items, "items_with_text": report.items_with_text, "seq_items": report.seq_items,
              "image_status": dict(report.image_status)}
    sequence = {k: v for k, v in seq.info.items() if k != "seconds"}
    if report.mode == "incremental" and old:
        prev = old.get("counts", {})
        counts["items_with_text"] += prev.get("items_with_text", 0)
        for k, v in prev.get("image_status", {}).items():
            counts["image_status"][k] = counts["image_status"].get(k, 0) + v
        sequence = old.get("sequence", {})
    return {
        "format": META_FORMAT,
        "name": cfg.featurize.name,
        "settings": encoder_settings(cfg),
        "dims": report.dims,
        "counts": counts,
        "sequence": sequence,
        # Only a full run vouches for the whole table; after an incremental one the next full run runs.
        "fingerprint": digest,
        "last_run": {"mode": report.mode, "encoded": report.encoded, "seconds": round(report.seconds, 2),
                     "text_actors": cfg.featurize.text_actors, "vision_actors": cfg.featurize.vision_actors,
                     "batch_size": cfg.featurize.batch_size},
    }
