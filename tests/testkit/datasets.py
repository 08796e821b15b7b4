"""Small prepared datasets and feature tables for platform tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from speeder import schema
from speeder_platform import lineage, storage
from speeder_platform.config import load_config
from speeder_platform.data.prepare import prepare_dataset
from speeder_platform.featurize.pipeline import dataset_fingerprint
from speeder_platform.tables import features_uri


def prepare_synthetic(out: str, num_users: int = 60, num_items: int = 80, **kw) -> str:
    overrides = [f"prepare.synthetic.num_users={num_users}", f"prepare.synthetic.num_items={num_items}",
                 "prepare.synthetic.image_size=16", "prepare.max_history=8",
                 *[f"prepare.{k}={v}" for k, v in kw.items()]]
    prepare_dataset(load_config(None, overrides).prepare, out)
    return out


def write_random_features(dataset: str, name: str = "default", dims: tuple[int, int, int] = (16, 8, 6),
                          image_rate: float = 0.8, seed: int = 0) -> str:
    """A features table with random text and image vectors and an untrained SASRec's item embeddings as
    seq_emb, that SASRec kept where featurize keeps its own (for tests of the plumbing, not of encoders)."""
    import torch

    from speeder.sasrec import SASRec
    from speeder_platform.featurize.sequence import sasrec_dir, save_sasrec
    from speeder_platform.tables import features_folder

    items = storage.read_table(storage.join(dataset, schema.ITEMS_FILE))
    n = items.num_rows
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sasrec = SASRec(n, hidden_size=dims[2], num_heads=2, max_length=50)
    save_sasrec(sasrec, sasrec_dir(features_folder(dataset, name)), {"settings": {}, "stats": []})

    def column(values: np.ndarray, present: np.ndarray) -> pa.Array:
        return pa.array([v.tolist() if p else None for v, p in zip(values, present, strict=True)],
                        type=pa.list_(pa.float32()))

    table = pa.table({
        schema.ITEM_ID: pa.array(np.arange(n), type=pa.int64()),
        schema.TEXT_EMB: column(rng.standard_normal((n, dims[0])).astype(np.float32), np.ones(n, bool)),
        schema.IMAGE_EMB: column(rng.standard_normal((n, dims[1])).astype(np.float32), rng.random(n) < image_rate),
        schema.SEQ_EMB: column(sasrec.item_embeddings().detach().numpy(), np.ones(n, bool)),
    })
    # Committed as featurize commits a set (the table, then meta.json naming its fingerprint): lineage refuses
    # a features table that nothing committed.
    settings = {"text_encoder": "random", "dims": list(dims), "image_rate": image_rate, "seed": seed}
    inputs = dataset_fingerprint(dataset)  # the dataset files' digests, as featurize fingerprints them
    lineage.commit(table, features_folder(dataset, name), {"settings": settings}, lineage.fingerprint(inputs, settings))
    return features_uri(dataset, name)


def tiny_config(output_root: str, *overrides: str):
    """A config for tiny end-to-end runs on the synthetic set (tiny-llama, small MRC, 1 worker)."""
    return load_config(None, [f"output_root={output_root}", "model.max_history=8", "model.mrc.hidden_size=32",
                              "model.mrc.num_layers=1", "trainer.num_workers=1", "trainer.epochs=1",
                              "trainer.batch_size=16", "trainer.log_every=5", "featurize.text_encoder=hashing",
                              "featurize.sasrec.epochs=2", "score.k=5", *overrides])


def write_checkpoint(cfg, directory: str, stage: int = 3, seed: int = 0) -> str:
    """A checkpoint of an untrained model built from `cfg` on the dataset's features (no Ray needed),
    recording those features as train.worker does."""
    from speeder.checkpoint import save_checkpoint
    from speeder_platform.config import to_dict
    from speeder_platform.lineage import checkpoint_record, committed_features
    from speeder_platform.modeling import build_from_config
    from speeder_platform.tables import available_modalities, features_folder, load_item_features

    features = load_item_features(cfg.data.uri, cfg.featurize.name)
    model = build_from_config(cfg.model, features.dims(), seed=seed,
                              features_dir=features_folder(cfg.data.uri, cfg.featurize.name))
    active = [m for m in ("text", "vision", "sequence") if m in available_modalities(features)]
    save_checkpoint(directory, model, {"stage": stage, "stage_name": "test", "step": 0, "epoch": 0,
                                       "modalities": active, "config": to_dict(cfg),
                                       "feature_dims": features.dims(), "metrics": {},
                                       "features": checkpoint_record(committed_features(cfg.data.uri,
                                                                                        cfg.featurize.name))})
    return directory
