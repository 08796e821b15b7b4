import os

import pyarrow as pa
import pytest

from speeder_platform import storage


def test_resolve_local_and_file_uris(tmp_path) -> None:
    fs, path = storage.resolve(f"file://{tmp_path}/a")
    assert path == f"{tmp_path}/a"
    _, rel = storage.resolve("relative/dir")
    assert os.path.isabs(rel)
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="malformed S3 URI"):
        storage.resolve("s3://")


def test_local_atomic_write_leaves_no_temporary_files(tmp_path) -> None:
    uri = str(tmp_path / "sub" / "t.parquet")
    storage.write_table(pa.table({"a": [1, 2]}), uri)
    storage.write_table(pa.table({"a": [3]}), uri)
    assert storage.read_table(uri).to_pydict() == {"a": [3]}
    assert os.listdir(tmp_path / "sub") == ["t.parquet"]


def test_staging_dir_replaces_and_rolls_back(tmp_path) -> None:
    final = str(tmp_path / "dt=2026-01-01")
    for value in (1, 2):
        with storage.staging_dir(final) as d:
            storage.write_table(pa.table({"a": [value]}), storage.join(d, "part-0.parquet"))
    assert storage.read_table(final).to_pydict() == {"a": [2]}
    with pytest.raises(RuntimeError), storage.staging_dir(final) as d:
        storage.write_table(pa.table({"a": [3]}), storage.join(d, "part-0.parquet"))
        raise RuntimeError("crash mid-write")
    assert storage.read_table(final).to_pydict() == {"a": [2]}
    assert sorted(os.listdir(tmp_path)) == ["dt=2026-01-01"]


@pytest.mark.integration
def test_s3_round_trip_through_loopback_server(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/data/items.parquet"
    table = pa.table({"item_id": [0, 1, 2], "title": ["a", "b", "c"]})
    storage.write_table(table, uri)
    assert storage.exists(uri)
    assert storage.read_table(uri).equals(table)
    storage.write_json(f"{s3_bucket}/data/meta.json", {"n": 3})
    assert storage.read_json(f"{s3_bucket}/data/meta.json") == {"n": 3}
    assert storage.listdir(f"{s3_bucket}/data") == ["items.parquet", "meta.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/data/missing.json")


@pytest.mark.integration
def test_s3_commit_dir_replaces_a_partition(s3_bucket: str) -> None:
    final = f"{s3_bucket}/scores/dt=2026-01-01"
    for value in (1, 2):
        with storage.staging_dir(final) as d:
            storage.write_table(pa.table({"a": [value]}), storage.join(d, "part-0.parquet"))
            storage.write_table(pa.table({"a": [value * 10]}), storage.join(d, "part-1.parquet"))
        assert sorted(storage.read_table(final).to_pydict()["a"]) == [value, value * 10]
    # Only the last run's files and the manifest remain; the staging folders are gone.
    names = storage.listdir(final)
    assert names[0] == storage.MANIFEST and len(names) == 2
    assert storage.listdir(f"{s3_bucket}/scores") == ["dt=2026-01-01"]
