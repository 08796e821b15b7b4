"""Object storage: one place that turns a URI into a pyarrow filesystem, and atomic writes.

URIs are plain paths, `file://` paths or `s3://bucket/key`. S3 uses the standard AWS environment and
credential chain (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance roles, AWS_REGION) and honours
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible stores such as MinIO or Ceph.

Writes never expose half a file: bytes go to a temporary name beside the target and are then
committed (a rename on local disks, after an fsync, so a power cut cannot leave an empty file under the
final name; on S3 a PUT is atomic, so the object appears whole). Folders that must appear all at once
(a scoring partition) go through `commit_dir`, which also keeps two concurrent commits of the same
folder (a retried nightly job) from corrupting it: the later one wins whole.

Every operation on s3:// is retried with backoff (`with_retries`, on top of the S3 client's own
retries): an endpoint that restarts for a few seconds costs a delay, not a failed job.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speeder.durable import fsync_path

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "_manifest.json"  # lists the files of a committed folder on object stores
# A run-* folder no manifest names is swept after this long: a commit copies its files in minutes, so an
# older one is an attempt that crashed before its commit point, never one still copying beside ours.
STALE_RUN_S = 24 * 3600


class StorageError(OSError):
    """A storage operation failed after its retries; the message names the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3_endpoint() -> tuple[str | None, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None, "https"
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return parsed.netloc, parsed.scheme or "https"


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, scheme: str, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": region,
        # Retries with backoff for throttling and dropped connections (an endpoint restarting).
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=6),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if endpoint:
        kwargs.update(endpoint_override=endpoint, scheme=scheme, force_virtual_addressing=False)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current environment (endpoint, region, credentials)."""
    endpoint, scheme = _s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(endpoint, scheme, region)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI; local paths come back absolute."""
    if not uri:
        raise ValueError("empty storage URI")
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (both for s3:// and local paths)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Run fn, retrying transient OSErrors (a store restarting) with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OSError, pa.ArrowException) as err:
            if isinstance(err, FileNotFoundError) or attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, err, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _call(uri: str, fn: Callable[[], T], what: str) -> T:
    """fn() for an operation on `uri`: retried when the store is remote (it may be restarting)."""
    return with_retries(fn, f"{what} {uri}") if is_s3(uri) else fn()


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return _call(uri, lambda: fs.get_file_info(path), "stat")


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def size(uri: str) -> int:
    """Bytes of a file, or of every file under a folder (0 when nothing is there)."""
    info = _info(uri)
    if info.type == pafs.FileType.File:
        return int(info.size or 0)
    if info.type != pafs.FileType.Directory:
        return 0
    return sum(int(i.size or 0) for i in _files(uri))


def _files(uri: str) -> list[pafs.FileInfo]:
    """Every file under a folder, at any depth (listing retried on S3)."""
    fs, path = resolve(uri)
    infos = _call(uri, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), "list")
    return [i for i in infos if i.type == pafs.FileType.File]


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    _call(uri, lambda: fs.create_dir(path, recursive=True), "mkdir")


def listdir(uri: str) -> list[str]:
    """Names directly inside a folder (empty when it does not exist)."""
    fs, path = resolve(uri)
    if _info(uri).type == pafs.FileType.NotFound:
        return []
    infos = _call(uri, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=False)), "list")
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def remove(uri: str) -> None:
    """Delete a file or a folder with everything inside; a missing target is not an error."""
    fs, path = resolve(uri)
    kind = _info(uri).type
    if kind == pafs.FileType.Directory:
        _call(uri, lambda: fs.delete_dir(path), "delete")
    elif kind == pafs.FileType.File:
        _call(uri, lambda: fs.delete_file(path), "delete")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return _call(uri, read, "read")
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {uri}") from None


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old version or the new one, never a part."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path)
    if is_s3(uri):
        # One PUT is atomic on S3; a temporary key + copy would only double the traffic.
        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        with_retries(put, f"write {uri}")
        return
    fs.create_dir(parent, recursive=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        fsync_path(parent)  # and the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under a local folder (files other processes wrote, e.g. Ray Data's)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Fixed writer options and no creation-time metadata: the same table gives the same bytes.
    pq.write_table(table, buf, compression="zstd", write_statistics=True, store_schema=True)
    return buf.getvalue()


def write_table(table: pa.Table, uri: str) -> None:
    """Write a table as one parquet file, atomically."""
    write_bytes(uri, table_to_parquet_bytes(table))


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
    _fsync_tree(staging)  # every staged byte on disk before the partition's name points at it
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


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder (local or s3://) into `local_dir`; returns local_dir."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not a folder: {uri}")
    os.makedirs(local_dir, exist_ok=True)
    with_retries(lambda: pafs.copy_files(path, local_dir, source_filesystem=fs,
                                         destination_filesystem=pafs.LocalFileSystem()), f"download {uri}")
    return local_dir


def uri_of(path: str, fs: pafs.FileSystem) -> str:
    """A URI for a path inside a filesystem (Ray hands back such pairs for checkpoints)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path
