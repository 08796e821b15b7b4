"""Features under fault: a committed table that rots, and a catalog featurized again after the model was
trained. Scoring and serving refuse both in one line, yesterday's scores stay, featurize repairs the first.

Unlike the other fault tests these need real features (a fingerprinted set from `speeder featurize`):
the workspace featurizes its tiny catalog once; its checkpoint is untrained but records those features.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from speeder_platform.bench.faults.data import features_checkpoint_mismatch, features_corrupt
from speeder_platform.bench.faults.env import Workspace
from speeder_platform.lineage import committed_features
from testkit.datasets import write_checkpoint

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.fixture(scope="module")
def featurized_ws(tmp_path_factory: pytest.TempPathFactory, _ray_session: None, s3_server: str) -> Iterator[Workspace]:
    from speeder_platform.ray_utils import ensure_ray

    ensure_ray()
    workspace = Workspace(str(tmp_path_factory.mktemp("features-faults")))
    assert committed_features(workspace.dataset, "default").fingerprint  # prepared and featurized for real
    workspace.checkpoint = write_checkpoint(workspace.config(), workspace.path("checkpoint"))
    try:
        yield workspace
    finally:
        workspace.close()


def test_a_corrupt_features_table_is_refused_then_made_again(featurized_ws) -> None:
    result = features_corrupt(featurized_ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["observed"].count("REFUSED") == 2 and "featurize again: full" in result["observed"]


def test_features_made_after_training_are_refused_naming_both_fingerprints(featurized_ws) -> None:
    result = features_checkpoint_mismatch(featurized_ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    details = result["details"]
    assert details["trained_on"] and details["features"] and details["trained_on"] != details["features"]
    assert result["observed"].count(f"trained on features {details['trained_on']}") == 2
