import pytest

from speeder_platform.config import ConfigError, from_dict, load_config, to_dict


def test_defaults_and_dotlist_overrides() -> None:
    cfg = load_config(None, ["trainer.num_workers=4", "output_root=/tmp/run1", "model.lora.r=16"])
    assert cfg.trainer.num_workers == 4
    assert cfg.model.lora.r == 16
    # Paths follow output_root through interpolation.
    assert cfg.data.uri == "/tmp/run1/data"
    assert cfg.trainer.storage_path == "/tmp/run1/train"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.num_wrkers=4"], "trainer.num_wrkers"),
        (["trainer.num_workers=four"], "trainer.num_workers"),
        (["trainer.strategy=horovod"], "trainer.strategy"),
        (["model.lora.r=0"], "model.lora.r"),
        (["steps=[prepare,bogus]"], "steps[1]"),
        (["data.uri=null"], "data.uri"),
        (["model.mrc.hidden_size=100", "model.mrc.num_heads=3"], "model.mrc.hidden_size"),
        (["score.date=2026-13-01"], "score.date"),
        (["model.modalities=[text,smell]"], "model.modalities[1]"),
        (["trainer.loss_pool=inbatch"], "trainer.loss_pool"),
        (["trainer.sampled_negatives=0"], "trainer.sampled_negatives"),
        (["trainer.lr_schedule=linear"], "trainer.lr_schedule"),
        (["trainer.lr_warmup=1.0"], "trainer.lr_warmup"),
        (["trainer.loss_pool=sampled", "model.distill_weight=0.5"], "trainer.loss_pool"),
        (["trainer.stage_samples=[8,8,8]", "trainer.max_train_samples=8"], "trainer.max_train_samples"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("#!/usr/bin/env -S speeder job\ntrainer:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"^trainer\.batchsize"):
        load_config(str(spec))


def test_shebang_line_is_a_yaml_comment(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("#!/usr/bin/env -S speeder job\nsteps: [prepare]\ntrainer:\n  epochs: 3\n")
    cfg = load_config(str(spec))
    assert cfg.steps == ["prepare"] and cfg.trainer.epochs == 3


def test_missing_file_and_malformed_override() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/spec.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.num_workers"])


def test_round_trip_through_plain_dict() -> None:
    cfg = load_config(None, ["trainer.epochs=5", "output_root=/x"])
    again = from_dict(to_dict(cfg))
    assert again == cfg


def test_model_defaults_are_the_model_packages_defaults() -> None:
    """One recipe: a model built from the platform's defaults equals one built from speeder's own."""
    import dataclasses

    from speeder.model import SpeederSettings
    from speeder_platform.modeling import settings_from_config

    dims = {"text": 8, "vision": 0, "sequence": 4}
    # sequence_user needs featurize's SASRec, which the platform has and a bare SpeederSettings does not.
    assert settings_from_config(load_config().model, dims) == SpeederSettings(feature_dims=dims, sequence_user=True)
    assert not settings_from_config(load_config().model, {**dims, "sequence": 0}).sequence_user
    assert {f.name for f in dataclasses.fields(SpeederSettings)} - {"feature_dims"} <= {
        f.name for f in dataclasses.fields(load_config().model)} | {"mrc_hidden", "mrc_layers", "mrc_heads",
                                                                      "mrc_dropout"}
