"""Fixtures for the fault scenarios: a workspace with a ready-made dataset and checkpoint.

The tests call the same scenario functions as `speeder bench faults`; the workspace gets its dataset
(random features) and checkpoint (untrained) from testkit, so no scenario has to featurize or train.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from speeder_platform.bench.faults.env import Workspace
from speeder_platform.serve.proxy import install_proxy_hook
from testkit.datasets import prepare_synthetic, write_checkpoint, write_random_features

# Serve's proxy reads its middleware hook from the environment of the Ray it runs in: set it before any
# test starts Ray (collection comes first), as `speeder serve` does before it starts one.
install_proxy_hook()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    workspace = Workspace(str(tmp_path_factory.mktemp("faults")))
    workspace.dataset = prepare_synthetic(workspace.path("data"))
    write_random_features(workspace.dataset)
    workspace.checkpoint = write_checkpoint(workspace.config(), workspace.path("checkpoint"))
    try:
        yield workspace
    finally:
        workspace.close()
