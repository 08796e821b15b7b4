"""Folders that appear whole: reading a folder of parquet files, and committing one (a scoring partition).

`staging_dir` yields a fresh folder beside the target and, on success, `commit_dir` makes its files the
target's contents. Local disks: two renames under a lock. Object stores: the files under a fresh run
prefix, then a manifest naming them (the commit point), which readers (`committed_files`,
`read_table`) follow. Two concurrent commits of the same folder (a retried nightly job) never corrupt
it: the later one wins whole.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speeder.durable import fsync_path, fsync_tree
from speeder_platform.storage.objects import (
    _call,
    _files,
    _info,
    exists,
    is_s3,
    join,
    listdir,
    makedirs,
    read_json,
    remove,
    resolve,
    with_retries,
    write_json,
)

MANIFEST = "_manifest.json"  # lists the files of a committed folder on object stores
# A run-* folder no manifest names is swept after this long: a commit copies its files in minutes, so an
# older one is an attempt that crashed before its commit point, never one still copying beside ours.
STALE_RUN_S = 24 * 3600


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file (or a folder of parquet files) into one table."""
    fs, path = resolve(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {uri}")
    if info.type != pafs.FileType.Directory:
        return _call(uri, lambda: pq.read_table(path, filesystem=fs, columns=columns), "read")
    for attempt in range(3):
        try:  # each try lists the folder again: a commit may replace it between the listing and the reads
            return _call(uri, lambda: _read_committed(uri, columns), "read")
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _read_committed(uri: str, columns: list[str] | None) -> pa.Table:
    fs, _ = resolve(uri)
    tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in committed_files(uri)]
    if not tables:
        raise FileNotFoundError(f"no parquet files in {uri}")
    return pa.concat_tables(tables)


def committed_files(uri: str) -> list[str]:
    """Paths (inside the filesystem) of the parquet files a folder holds.

    A folder committed by `commit_dir` on an object store carries a manifest: only the files it
    names are read, so a reader never mixes a previous run's files with a new one's.
    """
    _, path = resolve(uri)
    if _info(join(uri, MANIFEST)).type == pafs.FileType.File:
        names = read_json(join(uri, MANIFEST))["files"]
        return [posixpath.join(path, n) for n in names]
    # On an object store, run-* folders without a manifest are a first commit still copying: not data yet.
    hidden = (".", "_", "run-") if is_s3(uri) else (".", "_")
    return sorted(
        i.path
        for i in _files(uri)
        if i.path.endswith(".parquet")
        and not any(p.startswith(hidden) for p in posixpath.relpath(i.path, path).split("/"))
    )


@contextmanager
def staging_dir(final_uri: str) -> Iterator[str]:
    """Yield a fresh staging folder beside `final_uri`; on success commit it there (see commit_dir).

    On an exception the staging folder is deleted and the previous contents of `final_uri` stay.
    """
    parent, name = posixpath.split(final_uri.rstrip("/")) if is_s3(final_uri) else os.path.split(
        os.path.abspath(final_uri)
    )
    staging = join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
    makedirs(staging)
    try:
        yield staging
        commit_dir(staging, final_uri)
    finally:
        if exists(staging):
            remove(staging)


def commit_dir(staging_uri: str, final_uri: str) -> None:
    """Make the files of `staging_uri` the contents of `final_uri`, replacing what was there.

    Local disks: the staged files are fsynced, then two renames (old folder aside, staging in place)
    under an exclusive lock on the parent folder, so readers see the old folder or the new one, never a
    mix, and two commits of the same folder at once (a retried nightly job) run one after the other:
    the later one wins whole, neither fails on the other's half-done renames.

    Object stores cannot rename folders: the files are copied under a fresh run prefix, then a manifest
    naming exactly those files is written in one PUT (the commit point). After it, only the files the
    replaced manifest named are deleted, never another run's: a concurrent commit of the same partition
    may still be copying its own, and deleting them would leave its manifest naming missing files. The
    last manifest written wins, and its files are never deleted by the other commit (it read the manifest
    it replaces before its own PUT, so that manifest is older than the winner's). Runs that never
    committed (a crash mid-copy) are swept once older than STALE_RUN_S. Readers go through
    `committed_files`.
    """
    if not is_s3(final_uri):
        _commit_local(os.path.abspath(staging_uri), os.path.abspath(final_uri))
        return
    fs, staging = resolve(staging_uri)
    _, final = resolve(final_uri)
    run = f"run-{int(time.time())}-{uuid.uuid4().hex[:12]}"  # its start time: see STALE_RUN_S
    infos = _files(staging_uri)
    names = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = posixpath.relpath(info.path, staging)
        name = f"{run}/{rel}"
        with_retries(lambda: fs.copy_file(info.path, posixpath.join(final, name)), f"copy {rel}")  # noqa: B023
        names.append(name)
    replaced = _manifest_runs(final_uri)  # read before our PUT: see the docstring
    write_json(join(final_uri, MANIFEST), {"files": names, "run": run, "committed_at": time.time()})
    for child in listdir(final_uri):
        stale = child.startswith("run-") and child != run and _run_age_s(child) > STALE_RUN_S
        if child in replaced or stale:
            with_retries(lambda: remove(join(final_uri, child)), f"delete old {child}")  # noqa: B023


def _manifest_runs(final_uri: str) -> set[str]:
    """The run folders the committed manifest of `final_uri` names (empty when there is none)."""
    try:
        files = read_json(join(final_uri, MANIFEST))["files"]
    except FileNotFoundError:
        return set()
    return {name.split("/", 1)[0] for name in files}


def _run_age_s(run: str) -> float:
    """Seconds since a run-<unix time>-<id> folder's commit started (infinite for a name without one)."""
    try:
        return time.time() - int(run.split("-")[1])
    except (IndexError, ValueError):
        return float("inf")


def _commit_local(staging: str, final: str) -> None:
    """commit_dir on a local disk (see there)."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    fsync_tree(staging)  # every staged byte (Ray Data's files too) on disk before the name points at it
    trash = f"{parent}/.{os.path.basename(final)}.old-{uuid.uuid4().hex[:12]}"
    lock = os.open(parent, os.O_RDONLY)  # flock on the folder itself: no lock file beside the outputs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            os.replace(final, trash)
        except FileNotFoundError:
            trash = ""  # a first commit
        os.replace(staging, final)
        fsync_path(parent)
    finally:
        os.close(lock)  # releases the flock
    if trash:
        remove(trash)
