"""Sequence features (docs/model.md#item-features): SASRec item embeddings trained on the train part of each sequence.

No leakage: the train part of a user's sequence is their chronological items (interactions.parquet,
ties in file order, i.e. the protocol's order) minus the last two, which are the valid and the test
targets (docs/data.md#leave-one-out). SASRec never sees those two positions, as input or as target.

seq_emb is null for items with no train interaction: their rows of the item table never received a
gradient, so they hold only the random initialisation and would tell MRC nothing.

The trained weights are kept beside the features for later runs and for the SASRec baseline:

    features/<name>/sasrec/model.safetensors   SASRec state_dict
    features/<name>/sasrec/sasrec.json         hparams, settings, train-data fingerprint, epoch stats

A run with the same settings on the same train sequences loads them instead of training again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from speeder import schema
from speeder_platform import storage

log = logging.getLogger("speeder.featurize")

SASREC_DIR = "sasrec"
WEIGHTS_FILE = "model.safetensors"
SASREC_META = "sasrec.json"
FORMAT = "speeder-sasrec/1"


@dataclass
class SequenceFeatures:
    """seq_emb of every item: values (N, d) float32, present (N,) bool, and what happened."""

    values: np.ndarray
    present: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def train_sequences(interactions: pa.Table) -> list[np.ndarray]:
    """Each user's chronological item ids without their last two (valid and test targets).

    Sorted by (user, timestamp) with ties in file order, as the protocol orders them. Only train parts
    of 2+ items are returned: a single item is no SASRec training sample.
    """
    user = interactions.column(schema.USER_ID).to_numpy()
    item = interactions.column(schema.ITEM_ID).to_numpy()
    ts = interactions.column(schema.TIMESTAMP).to_numpy()
    order = np.lexsort((np.arange(len(user)), ts, user))
    user, item = user[order], item[order]
    bounds = np.flatnonzero(np.diff(user)) + 1
    return [seq[:-2].astype(np.int64) for seq in np.split(item, bounds) if len(seq) >= 4]


def fingerprint(sequences: list[np.ndarray], num_items: int) -> str:
    """sha256 of the train sequences and the catalog size: what a trained SASRec depends on."""
    h = hashlib.sha256(np.int64(num_items).tobytes())
    h.update(np.array([len(s) for s in sequences], np.int64).tobytes())
    for seq in sequences:
        h.update(seq.tobytes())
    return h.hexdigest()


def sasrec_dir(features_dir: str) -> str:
    return storage.join(features_dir, SASREC_DIR)


def save_sasrec(model: Any, directory: str, meta: dict[str, Any]) -> None:
    """Weights first, JSON last: a folder without sasrec.json is incomplete and never loaded."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(directory, WEIGHTS_FILE), save(state))
    storage.write_json(storage.join(directory, SASREC_META), {"format": FORMAT, "hparams": model.hparams, **meta})


def load_sasrec(directory: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(SASRec in eval mode, its sasrec.json) from `features/<name>/sasrec` (local or s3://)."""
    from safetensors.torch import load

    from speeder.sasrec import SASRec

    meta = storage.read_json(storage.join(directory, SASREC_META))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a {FORMAT} folder (format {meta.get('format')!r})")
    model = SASRec(**meta["hparams"])
    model.load_state_dict(load(storage.read_bytes(storage.join(directory, WEIGHTS_FILE))))
    return model.to(device).eval(), meta


def _cached(directory: str, settings: dict[str, Any], digest: str, device: str) -> Any | None:
    if not storage.exists(storage.join(directory, SASREC_META)):
        return None
    try:
        model, meta = load_sasrec(directory, device)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        log.warning("ignoring the saved SASRec in %s (%s): training again", directory, err)
        return None
    if meta.get("settings") != settings or meta.get("train_fingerprint") != digest:
        return None
    return model


def sequence_features(data_uri: str, features_dir: str, settings: dict[str, Any], num_items: int,
                      device: str = "cpu", num_threads: int = 1) -> SequenceFeatures:
    """Train (or load) SASRec on the train part of every sequence; -> seq_emb of the N items.

    `settings` is FeaturizeConfig.sasrec as a dict. epochs == 0 turns sequence features off.
    """
    import torch

    from speeder.sasrec import train_sasrec

    t0 = time.perf_counter()
    inter = storage.read_table(storage.join(data_uri, schema.INTERACTIONS_FILE),
                               columns=[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP])
    sequences = train_sequences(inter)
    flat = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        bad = int(flat[(flat < 0) | (flat >= num_items)][0])
        raise ValueError(f"interactions.parquet: item id {bad} is outside items.parquet's 0..{num_items - 1}")
    present = np.bincount(flat, minlength=num_items) > 0
    info: dict[str, Any] = {"train_users": len(sequences), "train_interactions": int(flat.size),
                            "items_with_train_interactions": int(present.sum())}
    off = np.zeros((num_items, 0), np.float32), np.zeros(num_items, bool)
    if settings["epochs"] <= 0:
        return SequenceFeatures(*off, {**info, "sasrec": "off (featurize.sasrec.epochs=0)"})
    if not sequences:
        log.warning("no user has a train sequence of 2+ items: no sequence features")
        return SequenceFeatures(*off, {**info, "sasrec": "off (no training samples)"})
    directory = sasrec_dir(features_dir)
    digest = fingerprint(sequences, num_items)
    model = _cached(directory, settings, digest, device)
    if model is not None:
        info["sasrec"] = "loaded"
    else:
        model, stats = train_sasrec(sequences, num_items, **settings, num_threads=num_threads, device=device)
        save_sasrec(model, directory, {"settings": settings, "train_fingerprint": digest, "stats": stats,
                                       **info})
        info.update(sasrec="trained", final_loss=stats[-1]["loss"] if stats else None)
    with torch.no_grad():
        values = model.item_embeddings().detach().float().cpu().numpy()  # (N, d)
    info["seconds"] = time.perf_counter() - t0
    return SequenceFeatures(values, present, info)
