"""What belongs together: a features set (its table and meta.json) and the checkpoints trained on it.

A features set is `features/<name>/items.parquet` + `meta.json`. Its fingerprint hashes its inputs:
the SHA-256 of the dataset's items.parquet and interactions.parquet and the encoder settings (plus, for
an incremental run, the fingerprint of the set it extends). Featurize commits a set as one unit
(`commit`): items.parquet in one atomic write, then meta.json, the commit point, naming the
fingerprint and the size and SHA-256 of the table's bytes.

`committed_features` checks the table against meta.json before anything uses it: a crash between the
two writes (new table, old meta.json; or a first run's table and no meta.json yet), a file cut short by a
copy, or bytes rotted on disk are refused with a one-line error, never read as features. A checkpoint
records the fingerprint it was trained on (`checkpoint_record`), and loading it against other features
(`check_checkpoint`) is a one-line error naming both, even when the dimensions agree and the model would
otherwise load and rank items it never learnt. An incremental run extends a set (new items, old rows
untouched), so a checkpoint of any set in its `lineage` still belongs to it.

A set without a fingerprint (no meta.json, or one written before fingerprints existed) cannot be told
apart from a half-committed one, so it is refused too: `speeder featurize --force` commits it again.
Checkpoints written before fingerprints record none: nothing can be compared for them (the dimension
check in trained.load_trained still applies).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from speeder import schema
from speeder_platform import storage
from speeder_platform.tables import features_folder

META_KEY = "features_fingerprint"  # in meta.json, with TABLE_KEY: the table's size and SHA-256
TABLE_KEY = "table"


class FeaturesError(ValueError):
    """Features that cannot be used: unreadable, half-committed, or not the ones a checkpoint was trained on."""


def fingerprint(inputs: dict[str, str], settings: dict[str, Any], extends: str | None = None) -> str:
    """The fingerprint of a features set from its inputs: dataset file digests, encoder settings, and the
    set an incremental run extends (None for a full run)."""
    blob = json.dumps({"inputs": inputs, "settings": settings, "extends": extends}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _show(digest: dict[str, Any]) -> str:
    return f"{digest.get('bytes', 0):,} bytes, sha256 {str(digest.get('sha256'))[:12]}"


def commit(table: pa.Table, folder: str, meta: dict[str, Any], fp: str) -> None:
    """Write a features set as one unit: the table, then meta.json (the commit point) naming its digest."""
    data = storage.table_to_parquet_bytes(table)
    storage.write_bytes(storage.join(folder, schema.ITEMS_FILE), data)
    storage.write_json(storage.join(folder, schema.META_FILE), {**meta, META_KEY: fp, TABLE_KEY: _digest(data)})


@dataclass
class FeaturesSet:
    """A committed features set: where it is, its fingerprint, the fingerprints of the sets it extends,
    and its encoder settings."""

    uri: str
    fingerprint: str
    lineage: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def committed_features(dataset: str, name: str) -> FeaturesSet:
    """The features set `features/<name>` of a dataset, its table checked against its meta.json.

    Raises FileNotFoundError when there is none, FeaturesError (one line) when the table is not the one
    meta.json committed, or nothing committed it: no meta.json (a first featurize stopped between its two
    writes) or one without a fingerprint (written before them).
    """
    folder = features_folder(dataset, name)
    table_uri, meta_uri = storage.join(folder, schema.ITEMS_FILE), storage.join(folder, schema.META_FILE)
    if not storage.exists(table_uri):
        raise FileNotFoundError(f"no item features at {table_uri}: run `speeder featurize` first")
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else None
    fp = meta.get(META_KEY) if isinstance(meta, dict) else None
    if fp is None:
        why = "no meta.json beside it" if meta is None else "its meta.json names no fingerprint"
        raise FeaturesError(f"features {table_uri} were never committed ({why}): a featurize run stopped before "
                            "its commit, or a set from before fingerprints; run `speeder featurize --force`")
    committed, found = meta.get(TABLE_KEY) or {}, _digest(storage.read_bytes(table_uri))
    if committed != found:
        raise FeaturesError(f"features {table_uri} are not the table meta.json committed ({_show(found)}, not "
                            f"{_show(committed)}): cut short, corrupted, or a featurize run stopped between its "
                            "writes; run `speeder featurize --force`")
    return FeaturesSet(folder, fp, list(meta.get("lineage", [])), dict(meta.get("settings", {})))


def checkpoint_record(features: FeaturesSet) -> dict[str, Any]:
    """What a checkpoint's meta.json records about the features it was trained on."""
    return {"fingerprint": features.fingerprint, "settings": features.settings, "uri": features.uri}


def check_checkpoint(meta: dict[str, Any], features: FeaturesSet, checkpoint: str) -> None:
    """Refuse (FeaturesError, one line naming both fingerprints) features a checkpoint was not trained on."""
    trained = (meta.get("features") or {}).get("fingerprint")
    if trained is None:  # a checkpoint from before fingerprints: nothing to compare
        return
    if trained == features.fingerprint or trained in features.lineage:
        return
    settings = (meta.get("features") or {}).get("settings")
    why = ("they were made with other encoder settings" if settings != features.settings
           else "they were made from other dataset files")
    raise FeaturesError(f"checkpoint {checkpoint} was trained on features {trained}, but {features.uri} holds "
                        f"features {features.fingerprint}: {why}; use the features it was trained on, or train "
                        "again")
