"""Durable writes: every file a checkpoint or a backbone cache holds is on disk before its name points at it.

os.fsync and the renames are recorded (speeder.durable.fsync_path looks os.fsync up at call time); a
descriptor's path is read from /proc/self/fd, as tests/platform/test_storage.py does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from speeder import backbone
from speeder.checkpoint import META_FILE, MODEL_FILE, OPTIM_FILE, OPTIM_META, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


class Small(nn.Module):
    """A model with trainable_state, as SpeederModel has, and a frozen part that is not saved."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p for k, p in self.named_parameters() if p.requires_grad}


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """("fsync", path) and ("rename", src, dst) in the order they happen, for files under any path."""
    found: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        found.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        found.append(("rename", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs) -> None:
        found.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return found


def fsynced_before(events: list[tuple], path: str, position: int) -> bool:
    return ("fsync", path) in events[:position]


def test_every_checkpoint_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path, events) -> None:
    model = Small()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.head(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # moments to save
    d = tmp_path / "ckpt"
    save_checkpoint(d, model, {"stage": 1}, optimizer=optimizer)

    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    placed = {os.path.basename(dst) for _, _, dst in renames}
    assert placed == {MODEL_FILE, OPTIM_FILE, OPTIM_META, META_FILE} == set(os.listdir(d))  # every file, renamed
    for i, src, dst in renames:
        assert os.path.dirname(src) == str(d), src  # a temporary name in the same folder
        assert fsynced_before(events, src, i), f"{os.path.basename(dst)} renamed into place before its fsync"
    # The folder: after the weights' renames and before meta.json's (it names them), and after meta.json's.
    meta_at = next(i for i, _, dst in renames if dst.endswith(META_FILE))
    weights_done = max(i for i, _, dst in renames if not dst.endswith(META_FILE))
    dir_fsyncs = [i for i, e in enumerate(events) if e == ("fsync", str(d))]
    assert any(weights_done < i < meta_at for i in dir_fsyncs), events
    assert dir_fsyncs and dir_fsyncs[-1] > meta_at, events
    load_checkpoint(d, Small(), optimizer)  # and it is still a checkpoint that loads


def test_a_backbone_cache_folder_is_fsynced_before_its_rename_and_its_parent_after(tmp_path, events) -> None:
    def build(folder: Path) -> None:  # a converted model's shape: files and a subfolder
        (folder / "tokenizer").mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer" / "tokenizer.json").write_text("{}")

    target = tmp_path / "cache" / "smollm2-135m"
    assert backbone._atomic_cache(target, build) == target
    (at, tmp, dst), = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    assert dst == str(target) and os.path.dirname(tmp) == str(target.parent)
    built = [os.path.join(tmp, p.relative_to(target)) for p in target.rglob("*")] + [tmp]
    assert len(built) == 5
    for path in built:
        assert fsynced_before(events, path, at), f"{path} not fsynced before the rename"
    assert ("fsync", str(target.parent)) in events[at + 1:], "the parent folder is not fsynced after the rename"
    assert (target / "tokenizer" / "tokenizer.json").read_text() == "{}"
    # Built already: nothing is written again.
    events.clear()
    assert backbone._atomic_cache(target, build) == target and events == []
