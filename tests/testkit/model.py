"""Tiny feature tables and settings for model tests."""

from __future__ import annotations

import torch

from speeder.model import SpeederSettings
from speeder.mrc import ItemFeatures
from speeder.schema import MODALITIES

ALL = list(MODALITIES)  # every modality active, as stage 3 has them


def make_features(n: int = 40, dims: tuple[int, int, int] = (16, 8, 6), image_rate: float = 0.7,
                  seed: int = 0) -> ItemFeatures:
    g = torch.Generator().manual_seed(seed)
    return ItemFeatures(
        text=torch.randn(n, dims[0], generator=g), text_mask=torch.ones(n, dtype=torch.bool),
        image=torch.randn(n, dims[1], generator=g), image_mask=torch.rand(n, generator=g) < image_rate,
        sequence=torch.randn(n, dims[2], generator=g), sequence_mask=torch.ones(n, dtype=torch.bool),
    )


def tiny_settings(features: ItemFeatures, **kw) -> SpeederSettings:
    base = dict(feature_dims=features.dims(), max_history=6, mrc_hidden=32, mrc_layers=1, mrc_heads=4,
                mrc_dropout=0.0)
    base.update(kw)
    return SpeederSettings(**base)


