"""The driver's stage sample draws (no Ray): what `speeder train` and the quality bench train each stage on."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from speeder_platform.bench.quality.models import recipe_steps
from speeder_platform.config import load_config
from speeder_platform.train.driver import stage_table
from testkit.model import make_features


def test_stage_table_draws_fewer_in_split_order_and_more_as_further_seeded_passes() -> None:
    table = pa.table({"row": np.arange(10)})
    assert stage_table(table, None, 0, 1) is table and stage_table(table, 10, 0, 1) is table
    fewer = stage_table(table, 4, 0, 1).column("row").to_pylist()
    assert len(set(fewer)) == 4 and fewer == sorted(fewer)  # without replacement, in split order
    assert fewer != stage_table(table, 4, 0, 3).column("row").to_pylist()  # fresh samples per stage
    more = stage_table(table, 25, 0, 1).column("row").to_pylist()
    counts = Counter(more)
    assert len(more) == 25 and set(counts) == set(range(10))  # every row, then further passes
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two whole passes and half a third
    assert more[:10] != sorted(more[:10])  # a drawn order, not copies side by side
    assert more == stage_table(table, 25, 0, 1).column("row").to_pylist()  # seeded


def test_recipe_steps_count_draws_beyond_the_split_as_the_trainer_does() -> None:
    cfg = load_config("jobs/synthetic.yaml", ["trainer.stage_samples=[64,64,640]", "trainer.batch_size=32"])
    features = make_features(12)
    assert recipe_steps(cfg, features, num_train=100) == {1: 2, 2: 2, 3: 20}  # 640 draws of a 100-row split
