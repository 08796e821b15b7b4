"""trainer.zero_stage=3 is refused at config load: ZeRO-3 would save partitions, not whole parameters."""

from __future__ import annotations

import pytest

from speeder_platform.config import ConfigError, load_config


def test_zero_stage_3_is_refused_with_the_reason_and_the_alternative() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.zero_stage: 3 is not supported: .*use 2") as err:
        load_config(None, ["trainer.strategy=deepspeed", "trainer.zero_stage=3"])
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_1_and_2_load(stage: int) -> None:
    assert load_config(None, [f"trainer.zero_stage={stage}"]).trainer.zero_stage == stage
