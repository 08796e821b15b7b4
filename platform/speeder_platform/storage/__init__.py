"""Object storage (local paths, file:// and s3://) behind one set of functions: `objects` for single files
(resolve, retries, atomic writes), `folders` for folders that must appear whole (committed partitions).

    from speeder_platform import storage
    storage.write_json("s3://bucket/run/final.json", {...})
    with storage.staging_dir("s3://bucket/scores/dt=2026-12-01") as staging: ...

Design: docs/platform.md#storage.
"""

from speeder_platform.storage.folders import (
    MANIFEST,
    STALE_RUN_S,
    commit_dir,
    committed_files,
    read_table,
    staging_dir,
)
from speeder_platform.storage.objects import (
    download_dir,
    exists,
    is_dir,
    is_s3,
    join,
    listdir,
    makedirs,
    read_bytes,
    read_json,
    remove,
    resolve,
    s3_filesystem,
    size,
    table_to_parquet_bytes,
    uri_of,
    with_retries,
    write_bytes,
    write_json,
    write_table,
)

__all__ = [
    "MANIFEST", "STALE_RUN_S", "commit_dir", "committed_files", "download_dir", "exists", "is_dir",
    "is_s3", "join", "listdir", "makedirs", "read_bytes", "read_json", "read_table", "remove", "resolve",
    "s3_filesystem", "size", "staging_dir", "table_to_parquet_bytes", "uri_of", "with_retries", "write_bytes",
    "write_json", "write_table",
]
