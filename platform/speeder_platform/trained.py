"""A trained model: where a run keeps it, and loading it with the item features it was trained on.

    trained = load_trained(resolve_checkpoint(cfg, None))    # the run's final checkpoint
    trained.model, trained.features, trained.active           # ready to rank on `device`

The one home for "load a checkpoint and its features": evaluate, score, serve, the UI and the
benchmarks all come here. A training run writes `<trainer.storage_path>/<run_name>/stages.json` (the
stages that finished) and `final.json` (the checkpoint used by default); see
docs/platform.md#checkpoints. Imports no Ray.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from speeder.checkpoint import load_checkpoint, read_meta
from speeder.model import SpeederModel
from speeder.mrc import ItemFeatures
from speeder_platform import storage
from speeder_platform.config import SpeederConfig, from_dict
from speeder_platform.lineage import check_checkpoint, committed_features
from speeder_platform.modeling import build_from_config
from speeder_platform.tables import features_folder, load_item_features

log = logging.getLogger("speeder.trained")

STAGES_FILE = "stages.json"
FINAL_FILE = "final.json"


def run_uri(cfg: SpeederConfig) -> str:
    """The run's folder: `<trainer.storage_path>/<trainer.run_name>` (holds stages.json and final.json)."""
    return storage.join(cfg.trainer.storage_path, cfg.trainer.run_name)


def final_checkpoint(cfg: SpeederConfig) -> str:
    """The checkpoint a finished run names as final (what evaluate/score/serve use by default)."""
    uri = storage.join(run_uri(cfg), FINAL_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no trained model at {uri}: run `speeder train` first or pass a checkpoint")
    return storage.read_json(uri)["checkpoint"]


def resolve_checkpoint(cfg: SpeederConfig, explicit: str | None) -> str:
    """`explicit` when given, else the run's final checkpoint."""
    return explicit or final_checkpoint(cfg)


@dataclass
class TrainedModel:
    """A model restored from a checkpoint, with the item features and modalities it was trained on."""

    model: SpeederModel
    features: ItemFeatures
    active: list[str]
    meta: dict[str, Any]
    checkpoint: str

    @property
    def version(self) -> str:
        """A readable model version: run, stage and step of the checkpoint."""
        cfg = self.meta.get("config", {}).get("trainer", {})
        return f"{cfg.get('run_name', 'speeder')}/stage{self.meta['stage']}/step{self.meta['step']}"


def load_trained(checkpoint: str, dataset: str | None = None, features_name: str | None = None,
                 device: str = "cpu") -> TrainedModel:
    """Rebuild the model a checkpoint was trained as (its own stored config) and load its weights.

    `dataset` / `features_name` default to the ones the model was trained on.
    """
    with tempfile.TemporaryDirectory() as local:
        storage.download_dir(checkpoint, local)
        meta = read_meta(local)
        train_cfg = from_dict(meta["config"])
        dataset, features_name = dataset or train_cfg.data.uri, features_name or train_cfg.featurize.name
        # Features it was not trained on (or not whole) are refused: with equal dims they would load and rank.
        check_checkpoint(meta, committed_features(dataset, features_name), checkpoint)
        features = load_item_features(dataset, features_name)
        dims = features.dims()
        if dims != meta["feature_dims"]:
            raise ValueError(f"features {dims} do not match the checkpoint's {meta['feature_dims']} "
                             f"({checkpoint}); featurize with the encoders it was trained with")
        model = build_from_config(train_cfg.model, dims, seed=train_cfg.trainer.seed,
                                  features_dir=features_folder(dataset, features_name))
        load_checkpoint(local, model)
    model.to(device).eval()
    log.debug("loaded %s (stage %s) from %s", train_cfg.trainer.run_name, meta["stage"], checkpoint)
    return TrainedModel(model=model, features=features.to(device), active=list(meta["modalities"]), meta=meta,
                        checkpoint=checkpoint)
