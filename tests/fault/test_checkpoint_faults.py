"""Checkpoints under fault: a crash mid-write never leaves a loadable-but-broken checkpoint or a torn
final.json, and nothing that loads a checkpoint ever unpickles."""

from __future__ import annotations

import pytest
import torch

import speeder.checkpoint as checkpoint
from speeder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from speeder_platform.bench.faults.train import checkpoint_crash_mid_write, checkpoint_not_pickle, unsafe_load_sites

pytestmark = pytest.mark.fault


class Weights(torch.nn.Module):
    """The smallest model with the checkpoint contract (trainable_state)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((1000,), value))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}


def test_processes_killed_mid_write_leave_no_broken_checkpoint_or_final_json(ws) -> None:
    result = checkpoint_crash_mid_write(ws, rounds=4)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["details"]["checkpoint"]["BROKEN"] == 0 and result["details"]["checkpoint"]["refused"] >= 2
    assert result["details"]["final_json"] == {"consistent": 4, "BROKEN": 0}


def test_an_interrupted_overwrite_is_refused_not_half_loaded(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, Weights(1.0), {"stage": 1, "step": 1})

    def crash(tensors: dict, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # part of a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, Weights(2.0), {"stage": 1, "step": 2})
    monkeypatch.undo()
    model = Weights(0.0)
    with pytest.raises(CheckpointError, match="no meta.json"):  # not the old meta.json over new weights
        load_checkpoint(tmp_path, model)
    assert model.w.sum() == 0.0
    assert (tmp_path / "model.safetensors").read_bytes()[:8] != b"\x00" * 8  # the old file stayed whole


def test_a_weights_file_cut_short_or_swapped_is_refused(tmp_path) -> None:
    save_checkpoint(tmp_path / "a", Weights(1.0), {"stage": 1, "step": 1})
    save_checkpoint(tmp_path / "b", Weights(2.0), {"stage": 1, "step": 2})
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    (tmp_path / "a" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "a", Weights(0.0))
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match meta.json"):  # valid safetensors, another save
        load_checkpoint(tmp_path / "a", Weights(0.0))
    assert load_checkpoint(tmp_path / "b", Weights(0.0))["step"] == 2


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(ws) -> None:
    result = checkpoint_not_pickle(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    digest, fmt, torch_load = result["details"]["refusals"]
    assert "does not match meta.json" in digest and "not a readable safetensors file" in fmt
    assert torch_load == "UnpicklingError"
    assert result["details"]["unsafe_sites"] == []


def test_the_source_scan_finds_every_unpickling_call(tmp_path) -> None:
    (tmp_path / "m.py").write_text("import pickle, torch, numpy as np\n"
                                   "pickle.loads(b)\n"
                                   "torch.load(f)\n"
                                   "torch.load(g(), map_location='cpu',\n           weights_only=True)\n"
                                   "np.load(f, allow_pickle=True)\n"
                                   "np.load(f)\npickle.dump(x, f)\n")
    assert unsafe_load_sites([tmp_path]) == [f"{tmp_path / 'm.py'}:{line}" for line in (2, 3, 6)]
