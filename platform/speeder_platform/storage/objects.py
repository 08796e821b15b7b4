"""Single objects on any store: a URI turned into a pyarrow filesystem, retries, atomic whole-file writes.

URIs are plain paths, `file://` paths or `s3://bucket/key`. S3 uses the standard AWS environment and
credential chain (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance roles, AWS_REGION) and honours
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible stores such as MinIO or Ceph.

Writes never expose half a file: bytes go to a temporary name beside the target and are then
committed (a rename on local disks, after an fsync, so a power cut cannot leave an empty file under the
final name; on S3 a PUT is atomic, so the object appears whole). Every operation on s3:// is retried
with backoff (`with_retries`, on top of the S3 client's own retries): an endpoint that restarts for a
few seconds costs a delay, not a failed job.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speeder.durable import fsync_path

log = logging.getLogger("speeder_platform.storage")
T = TypeVar("T")


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


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Fixed writer options and no creation-time metadata: the same table gives the same bytes.
    pq.write_table(table, buf, compression="zstd", write_statistics=True, store_schema=True)
    return buf.getvalue()


def write_table(table: pa.Table, uri: str) -> None:
    """Write a table as one parquet file, atomically."""
    write_bytes(uri, table_to_parquet_bytes(table))


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
