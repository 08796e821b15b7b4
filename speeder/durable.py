"""Durable writes on local disk, shared by the model's checkpoints and the platform's storage (no torch)."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file (its bytes are on disk before it is renamed into place) or a folder (the creations
    and renames inside it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file and folder under a local folder, bottom-up (each folder after what it holds), so
    renaming it into place afterwards never exposes empty or missing files."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)
