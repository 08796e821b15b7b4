"""Across nodes: a two-node Ray cluster on this machine, training workers on both nodes, checkpoints on
shared storage (the loopback S3 server), and the same metrics as a one-node run of the same seed."""

from __future__ import annotations

import pytest

from speeder_platform import storage
from speeder_platform.train.driver import run_training
from testkit.datasets import prepare_synthetic, tiny_config, write_random_features

pytestmark = pytest.mark.integration


def test_two_node_training_matches_one_node(tmp_path, s3_bucket) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from speeder_platform.ray_utils import ensure_ray, worker_env

    data = f"{s3_bucket}/data"
    prepare_synthetic(data)
    write_random_features(data)
    common = [f"data.uri={data}", "trainer.stages=[1]", "trainer.num_workers=2", "trainer.cpus_per_worker=0.75",
              "trainer.epochs=1", "trainer.strategy=ddp"]

    if ray.is_initialized():
        ray.shutdown()  # this test runs its own clusters; the next test's ray_local starts a fresh one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                            "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, resources={"second": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", runtime_env={"env_vars": worker_env()})
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        two = run_training(tiny_config(str(tmp_path / "two"), *common,
                                       f"trainer.storage_path={s3_bucket}/train-two"))
    finally:
        ray.shutdown()
        cluster.shutdown()

    local = storage.download_dir(two.checkpoint, str(tmp_path / "ckpt"))
    meta = storage.read_json(f"{local}/meta.json")
    assert len(set(meta["worker_nodes"])) == 2, meta["worker_nodes"]  # one worker on each node
    assert two.checkpoint.startswith(f"{s3_bucket}/train-two/")  # checkpoints on the shared store

    ensure_ray()  # one node, two CPUs
    one = run_training(tiny_config(str(tmp_path / "one"), *common, f"trainer.storage_path={s3_bucket}/train-one"))
    a, b = two.stages[0]["metrics"], one.stages[0]["metrics"]
    assert a["step"] == b["step"]
    # Same seed, same data, same sharding: the runs differ only by gloo's reduction order.
    assert abs(a["train_loss"] - b["train_loss"]) < 0.05, (a, b)
    assert abs(a["valid_hr1"] - b["valid_hr1"]) <= 0.05, (a, b)
