"""`speeder bench faults`: inject the faults a nightly, unattended platform meets, and check nothing is lost.

    speeder bench faults                                   # every scenario; a markdown table on stdout
    speeder bench faults --only score-actor-killed serve-replica-killed --out runs/faults.json
    speeder bench faults --list

Each scenario runs in this process against real components: an embedded local Ray (bound to
127.0.0.1), a moto S3 server the bench starts on 127.0.0.1, Ray Serve on loopback, and the real jobs
(prepare, featurize, train, score, serve) on a tiny synthetic catalog in a temporary folder that is
removed afterwards. A scenario reports what it injected, what it observed, whether any data was lost
and whether it passed (the fault really hit and the system recovered as designed). The command exits
1 when any scenario lost data or failed. The whole run takes a few minutes on 2 CPU cores.

Scenarios live in bench/faults/data.py, train.py, score.py and serve.py; what they share in env.py.
The tests in tests/fault call the same scenario functions, every one of them (tests/fault/test_bench_faults.py
checks that none is left out).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("speeder.bench")

# name -> "module:function", in running order (training first: its checkpoint serves scoring and serving).
SCENARIOS = {
    "data-import": "data:data_import",
    "featurize-bad-images": "data:featurize_bad_images",
    "checkpoint-crash-mid-write": "train:checkpoint_crash_mid_write",
    "train-worker-killed": "train:train_worker_killed",
    "train-driver-restarted": "train:train_driver_restarted",
    "checkpoint-not-pickle": "train:checkpoint_not_pickle",
    "features-corrupt": "data:features_corrupt",
    "features-checkpoint-mismatch": "data:features_checkpoint_mismatch",
    "score-actor-killed": "score:score_actor_killed",
    "score-s3-outage": "score:score_s3_outage",
    "score-same-date-twice": "score:score_same_date_twice",
    "disk-full-write": "score:disk_full_write",
    "serve-hostile-payloads": "serve:serve_hostile_payloads",
    "serve-replica-killed": "serve:serve_replica_killed",
    "serve-request-timeout": "serve:serve_request_timeout",  # last: it restarts Serve
}
COLUMNS = ("scenario", "injected", "observed", "data lost", "passed", "seconds")


def scenario(name: str) -> Callable[..., dict[str, Any]]:
    """The scenario function registered under `name` (imported on demand: the modules import Ray)."""
    module, function = SCENARIOS[name].split(":")
    return getattr(importlib.import_module(f"speeder_platform.bench.faults.{module}"), function)


def run_one(name: str, ws: Any) -> dict[str, Any]:
    """Run one scenario; a scenario that raises is a failure whose data loss is unknown (reported as lost)."""
    started = time.perf_counter()
    log.info("fault scenario %s: starting", name)
    try:
        result = scenario(name)(ws)
    except Exception as err:  # noqa: BLE001 - one broken scenario must not hide the others' results
        log.error("fault scenario %s crashed:\n%s", name, traceback.format_exc())
        result = {"scenario": name, "injected": "-", "observed": f"scenario crashed: {type(err).__name__}: {err}",
                  "data_lost": True, "passed": False, "seconds": round(time.perf_counter() - started, 1),
                  "details": {"crashed": True}}
    log.info("fault scenario %s: %s in %.0fs", name, "passed" if result["passed"] else "FAILED", result["seconds"])
    return result


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(results: list[dict[str, Any]]) -> str:
    """The markdown table of scenario results."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lost = "unknown (crashed)" if r["details"].get("crashed") else ("YES" if r["data_lost"] else "none")
        cells = (r["scenario"], r["injected"], r["observed"], lost, "yes" if r["passed"] else "NO", r["seconds"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def run_faults(names: list[str], keep: bool = False) -> list[dict[str, Any]]:
    """Run scenarios in one workspace on an embedded local Ray; clean everything up afterwards."""
    import ray

    from speeder_platform.bench.faults.env import Workspace, bench_credentials
    from speeder_platform.serve.proxy import install_proxy_hook

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is 15-35x faster on 2 cores
    install_proxy_hook()  # before Ray starts: Serve's proxy inherits it (serve-replica-killed needs it)
    started_ray = not ray.is_initialized()
    ws = Workspace()
    log.info("fault scenarios %s in %s", ", ".join(names), ws.root)
    try:
        with bench_credentials():  # the S3 scenarios' workers inherit them from the Ray started inside
            return [run_one(name, ws) for name in names]
    finally:
        ws.close(keep_root=keep)
        if started_ray and ray.is_initialized():
            ray.shutdown()


def run_command(only: list[str] | None, out: str | None, keep: bool = False) -> int:
    """`speeder bench faults`: run the scenarios (all, or `only` in the usual order), print the table,
    write it as JSON to `out` if given; exit code 1 when any scenario failed or lost data."""
    unknown = sorted(set(only or ()) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; `speeder bench faults --list` names them")
    names = [n for n in SCENARIOS if n in set(only or SCENARIOS)]
    t0 = time.perf_counter()
    results = run_faults(names, keep=keep)
    seconds = time.perf_counter() - t0
    failed = [r["scenario"] for r in results if r["data_lost"] or not r["passed"]]
    if out:
        from speeder_platform import storage

        storage.write_json(out, {"results": results, "seconds": round(seconds, 1), "failed": failed})
    sys.stdout.write(format_table(results) + f"\n\n{len(results)} scenarios in {seconds:.0f}s; "
                     f"{'all passed, no data lost' if not failed else 'FAILED: ' + ', '.join(failed)}\n")
    return 1 if failed else 0
