"""Fault scenarios for nightly batch scoring: a scorer actor killed mid-job, the S3 endpoint stopped and
restarted while the partition is written, two runs of the same date at once, a full disk.

All run the real `run_score` (Ray Data + scorer actors) on a history table of many users and check
that every input user is scored exactly once; the S3 scenario also reads the partition continuously
while it is replaced and checks that no reader ever sees part of one.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speeder import schema
from speeder_platform import storage
from speeder_platform.bench.faults.env import Workspace, alive_actors, kill_pid, outcome, wait_for
from speeder_platform.score import read_scores, run_score
from speeder_platform.storage import folders, objects

log = logging.getLogger("speeder.bench")

DATE = "2026-01-01"
SCORER = "MapBatches(Scorer)"  # the repr of Ray Data's actors running score.Scorer
OUTAGE_S = 3.0  # seconds down: longer than one request's own retries, shorter than ours (7.5 s)


def write_histories(ws: Workspace, users: int, name: str) -> str:
    """A score.input table: `users` users (ids shuffled) with 1-8 random catalog items each."""
    n = storage.read_table(storage.join(ws.dataset, schema.ITEMS_FILE), columns=[schema.ITEM_ID]).num_rows
    rng = np.random.default_rng(0)
    histories = [rng.choice(n, size=int(rng.integers(1, 9)), replace=False).tolist() for _ in range(users)]
    table = pa.table({schema.USER_ID: pa.array(rng.permutation(users), pa.int64()),
                      schema.HISTORY: pa.array(histories, pa.list_(pa.int64()))})
    uri = ws.path(f"{name}.parquet")
    storage.write_table(table, uri)
    return uri


def _exactly_once(table: pa.Table, users: int) -> tuple[bool, int, int]:
    """(every user 0..users-1 scored exactly once, rows, distinct users)."""
    ids = table.column(schema.USER_ID).to_numpy()
    return len(ids) == users and np.array_equal(np.sort(ids), np.arange(users)), len(ids), len(np.unique(ids))


def _restarts(actor_id: str) -> int:
    import ray
    from ray.util.state import list_actors

    found = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("actor_id", "=", actor_id)],
                        detail=True)
    return int(found[0]["num_restarts"] or 0) if found else 0


def score_actor_killed(ws: Workspace, users: int = 3000, delay_s: float = 1.0) -> dict[str, Any]:
    """SIGKILL the scorer actor `delay_s` after it started scoring; every user must be scored exactly once."""
    started = time.perf_counter()
    out = ws.path("scores-actor-killed")
    cfg = ws.config(f"score.input={write_histories(ws, users, 'histories-actor-killed')}", f"score.out={out}",
                    f"score.date={DATE}", f"score.checkpoint={ws.checkpoint}", "score.num_actors=1")
    killed: dict[str, Any] = {}
    running = threading.Event()
    running.set()

    def kill_the_scorer() -> None:
        actors = wait_for(lambda: alive_actors(SCORER), timeout_s=300, every_s=0.1)
        if actors:
            time.sleep(delay_s)  # constructed (model and catalog loaded): now it is scoring batches
            killed.update(pid=actors[0]["pid"], actor_id=actors[0]["actor_id"], mid_job=running.is_set())
            kill_pid(actors[0]["pid"])

    killer = threading.Thread(target=kill_the_scorer, daemon=True)
    killer.start()
    report = run_score(cfg)
    running.clear()
    killer.join(timeout=5)
    once, rows, distinct = _exactly_once(read_scores(out, DATE), users)
    restarts = _restarts(killed["actor_id"]) if killed else 0
    observed = (f"scorer pid {killed.get('pid', '-')} killed {delay_s:.0f}s into scoring "
                f"({'mid-job' if killed.get('mid_job') else 'NOT mid-job'}); Ray restarted it (restarts={restarts}) "
                f"and retried its batches; the job finished: {report.users_scored} users scored, {rows} rows, "
                f"{distinct} distinct users of {users}, skipped {sum(report.skipped.values())}")
    return outcome("score-actor-killed", f"SIGKILL of the scorer actor mid-job ({users} users, batches of 16)",
                   observed, data_lost=not once or report.users_scored != users,
                   passed=bool(killed.get("mid_job")) and restarts >= 1, started=started, killed=killed,
                   users_scored=report.users_scored, rows=rows, distinct=distinct)


class PartitionReader:
    """A thread that reads a partition over and over and classifies what each read saw."""

    def __init__(self, out: str, users: int) -> None:
        self.out, self.users = out, users
        self.seen: Counter[str] = Counter()
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> str:
        try:
            table = read_scores(self.out, DATE)
        except FileNotFoundError:
            return "absent"
        except (OSError, pa.ArrowException):
            return "unavailable"
        once, _, _ = _exactly_once(table, self.users)
        stamps = set(table.column("scored_at").to_pylist())
        if not once or len(stamps) != 1:
            return "PARTIAL"
        version = str(stamps.pop())
        if not self.versions or self.versions[-1] != version:
            self.versions.append(version)
        return "complete"

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.seen[self._read()] += 1
            time.sleep(0.1)

    def __enter__(self) -> PartitionReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


class Outages:
    """Stops the workspace's S3 server for OUTAGE_S, twice during one scoring job: when the first file of
    the partition's staging folder appears (Ray Data's write tasks are under way), and when the commit
    of the staged files into the partition starts (storage.commit_dir, on the driver)."""

    def __init__(self, ws: Workspace, bucket: str) -> None:
        import boto3

        self.ws, self.bucket = ws, bucket[len("s3://"):]
        self.client = boto3.client("s3", endpoint_url=ws.s3.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.log: list[str] = []
        self.commit_seconds = 0.0
        self._commit_dir = storage.commit_dir
        self._watcher = threading.Thread(target=self._on_first_staged_file, daemon=True)

    def _outage(self, what: str) -> threading.Thread:
        """Stop the server now; a thread starts it again OUTAGE_S later."""
        self.ws.s3.stop()
        self.log.append(what)

        def restart() -> None:
            time.sleep(OUTAGE_S)
            self.ws.s3.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    def _staged(self) -> bool:
        found = self.client.list_objects_v2(Bucket=self.bucket, Prefix="scores/.dt=").get("Contents", [])
        return any(".staging-" in o["Key"] and o["Key"].endswith(".parquet") for o in found)

    def _on_first_staged_file(self) -> None:
        if wait_for(self._staged, timeout_s=300, every_s=0.05):
            self._outage("parquet writes").join()

    def _commit_during_outage(self, staging_uri: str, final_uri: str) -> None:
        restarting = self._outage("commit")
        t0 = time.perf_counter()
        try:
            self._commit_dir(staging_uri, final_uri)
        finally:
            self.commit_seconds = time.perf_counter() - t0
            restarting.join()

    def __enter__(self) -> Outages:
        folders.commit_dir = self._commit_during_outage  # staging_dir calls it by its module-level name
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        folders.commit_dir = self._commit_dir
        self._watcher.join(timeout=OUTAGE_S + 60)
        if not self.ws.s3.running:
            self.ws.s3.start()


def score_s3_outage(ws: Workspace, users: int = 600) -> dict[str, Any]:
    """Score to S3 twice while a reader polls the partition; during the second run the endpoint goes down
    twice (Outages) and comes back OUTAGE_S later each time."""
    started = time.perf_counter()
    histories = write_histories(ws, users, "histories-s3")
    with ws.s3.environment():
        bucket = ws.s3.bucket()
        out = f"{bucket}/scores"
        cfg = ws.config(f"score.input={histories}", f"score.out={out}", f"score.date={DATE}",
                        f"score.checkpoint={ws.checkpoint}", "score.num_actors=1")
        with PartitionReader(out, users) as reader:
            first = run_score(cfg)
            with Outages(ws, bucket) as outages:
                second = run_score(cfg)
            time.sleep(0.5)  # one more read of the final state
        once, rows, _ = _exactly_once(read_scores(out, DATE), users)
        leftovers = [n for n in storage.listdir(out) if n != f"dt={DATE}"]
    reads = ", ".join(f"{k} {v}" for k, v in sorted(reader.seen.items()))
    waited = outages.commit_seconds >= OUTAGE_S * 0.9  # the commit retried until the endpoint was back
    observed = (f"endpoint down {OUTAGE_S:.0f}s during the {' and again during the '.join(outages.log)}; the "
                f"writes retried (the commit waited {outages.commit_seconds:.1f}s for the endpoint), the job "
                f"finished ({second.users_scored} users); partition: {rows} rows, every user once: {once}; concurrent "
                f"reads: {reads}; {len(reader.versions)} versions seen, never a partial one; staging left behind: "
                f"{leftovers or 'none'}")
    lost = not once or second.users_scored != users or first.users_scored != users or reader.seen["PARTIAL"] > 0
    return outcome("score-s3-outage", f"S3 endpoint stopped for {OUTAGE_S:.0f}s during the partition's parquet "
                   f"writes and again during its commit (replacing the previous run's partition), restarted on the "
                   f"same port each time", observed, data_lost=lost,
                   passed=len(outages.log) == 2 and waited and not leftovers and len(reader.versions) == 2,
                   started=started, reads=dict(reader.seen), outages=outages.log,
                   commit_seconds=round(outages.commit_seconds, 1))


class MeetAtCommit:
    """Holds each of two scoring runs at its partition commit (storage.commit_dir) until the other gets
    there, then lets both commit at once."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=300)
        self._commit_dir = storage.commit_dir

    def _commit(self, staging_uri: str, final_uri: str) -> None:
        self.barrier.wait()
        self._commit_dir(staging_uri, final_uri)

    def __enter__(self) -> MeetAtCommit:
        folders.commit_dir = self._commit  # staging_dir calls it by its module-level name
        return self

    def __exit__(self, *exc: object) -> None:
        folders.commit_dir = self._commit_dir


def _twice_at_once(ws: Workspace, out: str, users: int) -> dict[str, Any]:
    """Score the same date twice at once into `out` (the retry with k=4 to tell the runs apart); what the
    partition holds afterwards."""
    histories = write_histories(ws, users, "histories-same-date")
    runs = {"first": 5, "retry": 4}  # run -> score.k: the length of its rows' top-K lists
    errors: dict[str, str] = {}

    def run(name: str) -> None:
        cfg = ws.config(f"score.input={histories}", f"score.out={out}", f"score.date={DATE}",
                        f"score.checkpoint={ws.checkpoint}", "score.num_actors=1", f"score.k={runs[name]}")
        try:
            run_score(cfg)
        except Exception as err:  # noqa: BLE001 - a failed run is what the scenario reports
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[-1][:300]}"

    with MeetAtCommit():
        threads = [threading.Thread(target=run, args=(name,), name=name) for name in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    try:
        table = read_scores(out, DATE)
    except (OSError, pa.ArrowException) as err:  # a partition naming files another commit deleted
        return {"errors": errors, "readable": f"{type(err).__name__}: {err}"}
    once, rows, _ = _exactly_once(table, users)
    lengths = set(pc.list_value_length(table.column("item_ids")).to_pylist())
    # Which commit came last is not observable from outside commit_dir (its commit point is a rename or a
    # manifest PUT in the middle); tests/platform/test_storage.py orders commits and checks the later wins.
    return {"errors": errors, "readable": "yes", "once": once, "rows": rows,
            "whole_from": [n for n, k in runs.items() if lengths == {k}],
            "leftovers": [n for n in storage.listdir(out) if n != f"dt={DATE}"]}


def score_same_date_twice(ws: Workspace, users: int = 400) -> dict[str, Any]:
    """Two scoring runs of the same date at once (a nightly job and its retry), their commits at the same
    moment, on local disk and on S3: both must finish and the partition must be one run's, whole."""
    started = time.perf_counter()
    local = _twice_at_once(ws, ws.path("scores-same-date"), users)
    with ws.s3.environment():
        s3 = _twice_at_once(ws, f"{ws.s3.bucket()}/scores", users)
    results = {"local disk": local, "S3": s3}
    whole = {where: r["readable"] == "yes" and r["once"] and len(r["whole_from"]) == 1
             for where, r in results.items()}
    parts = []
    for where, r in results.items():
        runs = f"FAILED runs: {r['errors']}" if r["errors"] else "both runs finished"
        if r["readable"] != "yes":
            parts.append(f"{where}: {runs}; partition UNREADABLE ({r['readable']})")
            continue
        source = f"the {r['whole_from'][0]} run's, whole" if len(r["whole_from"]) == 1 else "a MIX of both runs"
        parts.append(f"{where}: {runs}; the partition is {source} ({r['rows']} rows, every user once: "
                     f"{r['once']}); staging left: {r['leftovers'] or 'none'}")
    clean = all(not r["errors"] and not r.get("leftovers") for r in results.values())
    return outcome("score-same-date-twice", f"two scoring runs of {DATE} at once ({users} users; the retry with k=4 "
                   "to tell them apart), both held at the partition commit until the other got there, then "
                   "committed together; on local disk and on S3", "; ".join(parts),
                   data_lost=not all(whole.values()), passed=clean, started=started, local=local, s3=s3)


class _HalfWriter:
    """A file whose writes stop half-way with ENOSPC, as on a disk that fills up during the write."""

    def __init__(self, f: Any, disk: DiskFull) -> None:
        self._f, self._disk = f, disk

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        raise self._disk._full("write")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


class DiskFull:
    """The driver's local disk is full while active: storage's file writes stop half-way with ENOSPC,
    and fsync (where delayed allocation reports a full disk) fails with ENOSPC for files other
    processes wrote, such as the staged partition Ray Data's write tasks left."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self._fsync = os.fsync

    def _full(self, what: str) -> OSError:
        self.hits[what] += 1
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _open(self, path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - handed to the caller, who closes it
        return _HalfWriter(f, self) if "w" in mode else f

    def _fsync_full(self, fd: int) -> None:
        raise self._full("fsync")

    def __enter__(self) -> DiskFull:
        objects.open = self._open  # shadows the builtin inside storage's file writes only
        os.fsync = self._fsync_full
        return self

    def __exit__(self, *exc: object) -> None:
        del objects.open
        os.fsync = self._fsync


def disk_full_write(ws: Workspace, users: int = 200) -> dict[str, Any]:
    """Replace a date's partition and overwrite a JSON pointer (a run's final.json) while the disk is full:
    both must fail with ENOSPC, leave the old versions whole and no temporary files; then succeed."""
    started = time.perf_counter()
    out = ws.path("scores-disk-full")
    cfg = ws.config(f"score.input={write_histories(ws, users, 'histories-disk-full')}", f"score.out={out}",
                    f"score.date={DATE}", f"score.checkpoint={ws.checkpoint}", "score.num_actors=1")
    run_score(cfg)
    before = read_scores(out, DATE)
    pointer = ws.path("disk-full", "final.json")
    storage.write_json(pointer, {"checkpoint": ws.checkpoint})
    errors: dict[str, str] = {}
    with DiskFull() as disk:
        for what, call in {"scoring": lambda: run_score(cfg),
                           "final.json": lambda: storage.write_json(pointer, {"checkpoint": "a newer one"})}.items():
            try:
                call()
            except OSError as err:
                errors[what] = str(err)
    kept = {"partition": read_scores(out, DATE).equals(before),
            "final.json": storage.read_json(pointer) == {"checkpoint": ws.checkpoint}}
    leftovers = [n for folder in (out, os.path.dirname(pointer)) for n in os.listdir(folder) if n.startswith(".")]
    after = run_score(cfg)
    full = all("No space left" in errors.get(w, "") for w in ("scoring", "final.json"))
    observed = (f"disk full at {dict(disk.hits)}; scoring failed: {errors.get('scoring', 'NOT AT ALL')}; the "
                f"final.json overwrite failed: {errors.get('final.json', 'NOT AT ALL')}; old partition "
                f"{'whole' if kept['partition'] else 'CHANGED'}, old final.json "
                f"{'whole' if kept['final.json'] else 'CHANGED'}; temporary files left: {leftovers or 'none'}; with "
                f"space again scoring committed {after.users_scored} users")
    return outcome("disk-full-write", "ENOSPC from the driver's disk while a date's partition is replaced (its staged "
                   "files' fsync) and while final.json is overwritten (the write stops half-way)", observed,
                   data_lost=not all(kept.values()), passed=full and not leftovers and after.users_scored == users,
                   started=started, hits=dict(disk.hits), errors=errors)
