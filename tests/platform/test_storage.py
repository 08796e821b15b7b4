import os
import time

import pyarrow as pa
import pytest

from speeder_platform import storage
from speeder_platform.storage import folders


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
    file_bytes = storage.size(uri)
    assert file_bytes == len(storage.read_bytes(uri)) > 0
    assert storage.size(f"{s3_bucket}/data") == file_bytes + len(storage.read_bytes(f"{s3_bucket}/data/meta.json"))
    assert storage.size(f"{s3_bucket}/nothing-here") == 0
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


def test_local_writes_fsync_the_bytes_before_the_rename_and_the_folder_after(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    assert calls == ["fsync file", "rename", "fsync dir"]
    calls.clear()
    with storage.staging_dir(str(tmp_path / "dt=1")) as d:
        storage.write_bytes(storage.join(d, "part-0.parquet"), b"x")
        calls.clear()  # what Ray Data's writers would leave unsynced: the commit syncs them itself
    assert calls.index("fsync file") < calls.index("rename") and calls[-1] == "fsync dir"


def _commit(final: str, value: int) -> None:
    """One run's partition: two files that must be read together (value and 10 x value)."""
    with storage.staging_dir(final) as d:
        storage.write_table(pa.table({"a": [value]}), storage.join(d, "part-0.parquet"))
        storage.write_table(pa.table({"a": [value * 10]}), storage.join(d, "part-1.parquet"))


def test_concurrent_local_commits_of_one_partition_all_succeed_and_one_wins_whole(tmp_path) -> None:
    import threading

    final = str(tmp_path / "dt=2026-01-01")
    barrier, errors = threading.Barrier(4), []

    def run(worker: int) -> None:
        for i in range(15):
            barrier.wait()  # every round: four commits of the same date at the same moment
            try:
                _commit(final, worker * 100 + i)
            except Exception as err:  # noqa: BLE001 - collected: the assertion names it
                errors.append(repr(err))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    first, second = sorted(storage.read_table(final).to_pydict()["a"])
    assert second == first * 10 and first % 100 == 14  # both files of one commit of the last round
    assert sorted(os.listdir(tmp_path)) == ["dt=2026-01-01"]  # no staging or old folder left


@pytest.mark.integration
def test_s3_commit_never_deletes_a_concurrent_commits_files(s3_bucket: str, monkeypatch) -> None:
    """Commit B is copying its files when commit A lands: A must not delete them (B's manifest would
    then name missing files), and B, the later commit, wins whole."""
    import threading

    final = f"{s3_bucket}/scores/dt=2026-01-01"
    _commit(final, 1)  # yesterday's run of the same date: its files are what A's manifest replaces
    b_copying, a_committed = threading.Event(), threading.Event()
    real = storage.with_retries

    def paused(fn, what: str, *args, **kwargs):  # noqa: ANN001, ANN202 - with_retries' own signature
        out = real(fn, what, *args, **kwargs)
        if threading.current_thread().name == "B" and what.startswith("copy ") and not b_copying.is_set():
            b_copying.set()
            assert a_committed.wait(60)
        return out

    monkeypatch.setattr(folders, "with_retries", paused)  # the name commit_dir calls
    b = threading.Thread(target=_commit, args=(final, 3), name="B")
    b.start()
    assert b_copying.wait(60)
    _commit(final, 2)
    assert sorted(storage.read_table(final).to_pydict()["a"]) == [2, 20]  # A committed, readable
    a_committed.set()
    b.join(60)
    assert sorted(storage.read_table(final).to_pydict()["a"]) == [3, 30]
    runs = [n for n in storage.listdir(final) if n != storage.MANIFEST]
    assert len(runs) == 1  # the replaced runs' files are gone, the winner's stayed


@pytest.mark.integration
def test_s3_commit_sweeps_only_stale_uncommitted_runs(s3_bucket: str) -> None:
    final = f"{s3_bucket}/scores/dt=2026-01-01"
    crashed = f"run-{int(time.time()) - storage.STALE_RUN_S - 60}-dead"  # copied a day ago, never committed
    copying = f"run-{int(time.time())}-busy"  # another commit, copying right now
    for run in (crashed, copying):
        storage.write_table(pa.table({"a": [0]}), f"{final}/{run}/part-0.parquet")
    _commit(final, 1)
    names = storage.listdir(final)
    assert copying in names and crashed not in names
    assert sorted(storage.read_table(final).to_pydict()["a"]) == [1, 10]
