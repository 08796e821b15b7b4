"""Fixtures for the model tests."""

import pytest
import torch

from speeder.model import build_model
from speeder.mrc import ItemFeatures
from testkit.model import make_features, tiny_settings


@pytest.fixture
def features() -> ItemFeatures:
    return make_features()


@pytest.fixture
def tiny_model(features: ItemFeatures):
    torch.manual_seed(0)
    return build_model("tiny-llama", tiny_settings(features), lora_dropout=0.0)
