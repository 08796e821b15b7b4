"""Checkpoints: trainable weights only (LoRA, MRC, PPL, heads) as safetensors + JSON metadata.

    <dir>/model.safetensors      SpeederModel.trainable_state()
    <dir>/optimizer.safetensors  optimizer tensors (optional, for resuming mid-stage)
    <dir>/optimizer.json         optimizer scalars and parameter groups
    <dir>/meta.json              format, stage, step, epoch, settings, feature dims, metrics, config

Nothing is pickled: loading a checkpoint cannot execute code, and a file that is not safetensors
(a pickle put in its place, say) is refused with a CheckpointError.

Crash safety: `meta.json` is removed first and written last, so a folder without it is an incomplete
checkpoint and is refused, also when a crash interrupts overwriting an older checkpoint. Every file is
written under a temporary name, fsynced and renamed into place, and meta.json records the size and
SHA-256 of each weights file: a file cut short, swapped or from another save does not load. The folder
is fsynced after the weights' renames (before meta.json names them) and after meta.json's, so a power
cut cannot keep the commit point while losing the files it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speeder.durable import fsync_path

log = logging.getLogger(__name__)

FORMAT = "speeder-checkpoint/1"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, of another format, or does not fit the model."""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    fsync_path(tmp)  # its bytes on disk before the name points at them
    os.replace(tmp, path)


def _digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as meta.json records them."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Write safetensors under a temporary name, rename it into place; returns its digest."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    digest = _digest(tmp)
    fsync_path(tmp)  # its bytes on disk before the name points at them
    os.replace(tmp, path)
    return digest


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write a checkpoint folder; meta.json last, so its presence marks a complete checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / META_FILE).unlink(missing_ok=True)  # overwriting: incomplete until the new meta.json lands
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
    files = {MODEL_FILE: _save_tensors(state, d / MODEL_FILE)}
    if optimizer is not None:
        tensors, scalars = _flatten_optimizer(optimizer.state_dict())
        files[OPTIM_FILE] = _save_tensors(tensors, d / OPTIM_FILE)
        _write_json(d / OPTIM_META, scalars)
    fsync_path(d)  # the weights' renames on disk before meta.json names them
    _write_json(d / META_FILE, {"format": FORMAT, **meta, "files": files})
    fsync_path(d)  # and the commit point itself
    return d


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: no {META_FILE}; not a complete Speeder checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory}: {META_FILE} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{directory}: format {found!r}, expected {FORMAT!r}")
    return meta


def _load_tensors(directory: str | os.PathLike, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A weights file, checked against the size and digest meta.json records (older checkpoints have none)."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: {name} missing; not a complete Speeder checkpoint")
    expected = meta.get("files", {}).get(name)
    if expected is not None and _digest(path) != expected:
        raise CheckpointError(f"{directory}: {name} does not match {META_FILE} (size or SHA-256 differ): "
                              "cut short, replaced or from another save")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # never unpickled: not safetensors is refused
        raise CheckpointError(f"{directory}: {name} is not a readable safetensors file ({err})") from None


def load_checkpoint(directory: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state when asked and present) into a freshly built model.

    Every trainable tensor must be present with the same shape: a checkpoint of another model
    configuration is refused with the first mismatching name.
    """
    meta = read_meta(directory)
    d = Path(directory)
    state = _load_tensors(d, MODEL_FILE, meta)
    expected = model.trainable_state()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{directory}: {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    if optimizer is not None and (d / OPTIM_FILE).exists():
        scalars = json.loads((d / OPTIM_META).read_text())
        optimizer.load_state_dict(_unflatten_optimizer(_load_tensors(d, OPTIM_FILE, meta), scalars))
    return meta


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, slot in state_dict["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, slot in scalars["state"].items():
        state.setdefault(int(idx), {}).update(slot)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in scalars["param_groups"]]
    return {"state": state, "param_groups": groups}
