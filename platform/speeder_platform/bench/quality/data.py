"""Data for `speeder bench quality`: prepared datasets, real features, the cold-start split, masked modalities.

Everything here is seeded, so two runs of the bench see the same items held out and the same
modalities masked.

- `ensure_dataset` / `ensure_features`: the canonical layout and the project's featurize output
  (MiniLM text, EfficientNet-Lite0 images when the catalog has them, SASRec sequence features),
  made when missing and reused when present.
- `cold_start`: 10% of the items held out of training entirely. Their train samples go (a sample whose
  target is held out is dropped, held-out items are cut out of every history), SASRec is trained
  again without them, and they get no seq_emb. The model then trains on the warm sub-catalog only
  (ids remapped), so held-out items are not even softmax negatives; at test time the whole catalog
  is back.
- `mask_modality`: drop a share of the items' text or image features at test time (masks only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speeder import schema
from speeder.loop import Samples
from speeder.mrc import ItemFeatures
from speeder.prompt import pad_histories
from speeder_platform import storage
from speeder_platform.tables import available_modalities, load_item_features, load_samples

log = logging.getLogger("speeder.bench")



@dataclass
class BenchData:
    """A prepared dataset with its features and splits, as the model sees them."""

    name: str
    uri: str
    features: ItemFeatures
    train: Samples
    valid: Samples
    test: Samples
    titles: list[str]
    sasrec_settings: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return self.features.num_items

    @property
    def available(self) -> set[str]:
        return available_modalities(self.features)


def ensure_dataset(cfg: Any, required: Sequence[str] = ()) -> None:
    """Prepare cfg.data.uri from cfg.prepare unless a complete dataset (meta.json) is there. A synthetic set made
    with other generator settings than cfg.prepare.synthetic is reused with a warning naming them, or refused
    (ValueError) when one of them is in `required` (settings the user asked for explicitly)."""
    from speeder_platform.config import to_dict
    from speeder_platform.data.prepare import prepare_dataset

    meta_uri = storage.join(cfg.data.uri, schema.META_FILE)
    if storage.exists(meta_uri):
        made = storage.read_json(meta_uri).get("synthetic")
        wanted = to_dict(cfg.prepare.synthetic)
        if cfg.prepare.source == "synthetic" and made is not None:
            differ = [k for k in sorted(wanted) if made.get(k) != wanted[k]]
            said = ", ".join(f"{k}={made.get(k)} (the recipe: {wanted[k]})" for k in differ)
            if set(differ) & set(required):
                raise ValueError(f"{cfg.data.uri} holds a synthetic set made with {said}: pass another data folder "
                                 "(--synthetic-data) or remove this one")
            if differ:
                log.warning("%s was made with %s; the bench uses it as it is", cfg.data.uri, said)
        log.info("dataset %s exists; reusing it", cfg.data.uri)
        return
    log.info("preparing %s at %s", cfg.prepare.source, cfg.data.uri)
    log.info("%s", prepare_dataset(cfg.prepare, cfg.data.uri).summary())


def ensure_features(cfg: Any) -> dict[str, Any]:
    """Run the project's featurize (skipped by featurize itself when up to date); stop the Ray it started."""
    import ray

    from speeder_platform.featurize.pipeline import run_featurize

    started = not ray.is_initialized()
    try:
        report = run_featurize(cfg)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    log.info("%s", report.summary())
    return {"mode": report.mode, "seconds": round(report.seconds, 1), "dims": report.dims}


def load_bench_data(name: str, cfg: Any, max_history: int, required: Sequence[str] = ()) -> BenchData:
    """Prepare + featurize if needed (`required`: see ensure_dataset), then load features, splits and titles."""
    ensure_dataset(cfg, required)
    featurize = ensure_features(cfg)
    uri = cfg.data.uri
    items = storage.read_table(storage.join(uri, schema.ITEMS_FILE), columns=[schema.ITEM_ID, schema.TITLE])
    titles = items.sort_by(schema.ITEM_ID).column(schema.TITLE).to_pylist()
    splits = {s: load_samples(uri, s, max_history) for s in schema.SPLITS}
    from speeder_platform.config import to_dict

    return BenchData(name=name, uri=uri, features=load_item_features(uri, cfg.featurize.name), titles=titles,
                     sasrec_settings=to_dict(cfg.featurize.sasrec), info={"featurize": featurize}, **splits)


# -- cold start ------------------------------------------------------------------------------------
@dataclass
class ColdStart:
    """Items held out of training: ids, the warm sub-catalog, and the remapped warm training samples."""

    held_out: np.ndarray  # (K,) sorted item ids
    warm: np.ndarray  # (N - K,) sorted item ids; warm index w <-> item warm[w]
    train: Samples  # warm train samples in warm ids (held-out targets dropped, held-out items cut out)

    def is_held_out(self, items: np.ndarray) -> np.ndarray:
        return np.isin(items, self.held_out)


def hold_out_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of the item ids (at least one), sorted."""
    k = max(1, int(round(fraction * num_items)))
    return np.sort(np.random.default_rng([seed, 42]).choice(num_items, k, replace=False))


def warm_train_samples(train: Samples, held_out: np.ndarray, num_items: int, max_history: int) -> tuple[Samples,
                                                                                                     np.ndarray]:
    """Train samples without any held-out item, in warm ids; -> (samples, warm item ids)."""
    held = np.zeros(num_items, bool)
    held[held_out] = True
    warm = np.flatnonzero(~held)
    remap = np.full(num_items, -1, np.int64)
    remap[warm] = np.arange(len(warm))
    keep = ~held[train.target]
    histories = [remap[row[(row >= 0) & ~held[np.clip(row, 0, None)]]] for row in train.history[keep]]
    rows = [i for i, h in enumerate(histories) if len(h)]  # a history made only of held-out items says nothing
    target = remap[train.target[keep][rows]]
    samples = Samples(history=pad_histories([histories[i] for i in rows], max_history), target=target,
                      candidates=target[:, None].copy(),  # the catalog softmax uses no candidates
                      user_id=None if train.user_id is None else train.user_id[keep][rows])
    return samples, warm


def cold_start(data: BenchData, fraction: float, seed: int, max_history: int) -> ColdStart:
    held_out = hold_out_items(data.num_items, fraction, seed)
    train, warm = warm_train_samples(data.train, held_out, data.num_items, max_history)
    log.info("cold start: %d of %d items held out; %d of %d train samples kept", len(held_out), data.num_items,
             len(train), len(data.train))
    return ColdStart(held_out=held_out, warm=warm, train=train)


def cold_sasrec(data: BenchData, cold: ColdStart, num_threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """SASRec trained (featurize's settings) on the train sequences without held-out items, as a model of
    the whole catalog: held-out items keep SASRec's initialisation N(0, 0.02), as any unseen id would."""
    from speeder.sasrec import SASRec, train_sasrec
    from speeder_platform.baselines_eval import train_item_counts

    sequences, num_items = train_item_counts(data.uri)
    remap = np.full(num_items, -1, np.int64)
    remap[cold.warm] = np.arange(len(cold.warm))
    warm_seqs = [remap[s[~cold.is_held_out(s)]] for s in sequences]
    warm_seqs = [s for s in warm_seqs if len(s) >= 2]
    st = data.sasrec_settings
    model, stats = train_sasrec(warm_seqs, len(cold.warm), **st, num_threads=num_threads, log_every_epoch=False)
    with torch.random.fork_rng():
        torch.manual_seed(st["seed"])
        full = SASRec(**{**model.hparams, "num_items": num_items})
    state = model.state_dict()
    table = full.item_embedding.weight.detach().clone()  # (N + 1, d): init rows for held-out items
    table[torch.from_numpy(cold.warm + 1)] = state["item_embedding.weight"][1:]
    state["item_embedding.weight"] = table
    full.load_state_dict(state)
    present = np.zeros(num_items, bool)
    present[cold.warm[np.unique(np.concatenate(warm_seqs))]] = True
    info = {"epochs": len(stats), "seconds": round(sum(s["seconds"] for s in stats), 1),
            "train_sequences": len(warm_seqs), "seq_items": int(present.sum())}
    return full.eval(), {"present": present, **info}


def with_sequence(features: ItemFeatures, sasrec: Any, present: np.ndarray) -> ItemFeatures:
    """`features` with seq_emb taken from `sasrec` (null where `present` is False)."""
    values = sasrec.item_embeddings().detach().float().clone()  # (N, d)
    mask = torch.from_numpy(present.copy())
    return ItemFeatures(text=features.text, text_mask=features.text_mask, image=features.image,
                        image_mask=features.image_mask, sequence=torch.where(mask[:, None], values, 0.0),
                        sequence_mask=mask)


# -- missing modalities ----------------------------------------------------------------------------
def mask_modality(features: ItemFeatures, modality: str, rate: float, seed: int,
                  active: list[str]) -> tuple[ItemFeatures, dict[str, int]]:
    """Drop `modality` for round(rate x items having it) items, chosen (seeded) among those keeping another
    active modality (MRC needs one). -> (masked features, {"had", "masked", "requested"})."""
    masks = {m: v.clone() for m, v in features.masks().items()}
    had = masks[modality].numpy().copy()
    others = [masks[m].numpy() for m in active if m != modality]
    eligible = np.flatnonzero(had & np.logical_or.reduce(others)) if others else np.zeros(0, np.int64)
    requested = int(round(rate * int(had.sum())))
    if len(eligible) < requested:
        log.warning("only %d items can lose their %s (another active modality needed); %d requested",
                    len(eligible), modality, requested)
    rng = np.random.default_rng([seed, 7, schema.MODALITIES.index(modality)])
    chosen = rng.choice(eligible, min(requested, len(eligible)), replace=False)
    masks[modality][torch.from_numpy(chosen)] = False
    out = ItemFeatures(text=features.text, text_mask=masks["text"], image=features.image, image_mask=masks["vision"],
                       sequence=features.sequence, sequence_mask=masks["sequence"])
    return out, {"had": int(had.sum()), "requested": requested, "masked": len(chosen)}
