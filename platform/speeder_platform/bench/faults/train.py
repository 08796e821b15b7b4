"""Fault scenarios for training and checkpoints: a killed worker, a killed driver, a crash mid-save,
and a pickle where the weights should be.

Training scenarios run the real `run_training` (Ray Train, one tiny stage) and kill processes with
SIGKILL; checkpoint scenarios kill a process while it writes, then load what is left.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from speeder_platform import storage
from speeder_platform.bench.faults.env import Workspace, alive_actors, kill_pid, outcome, wait_for

EPOCHS, STEPS = 3, 12  # 36 steps, a checkpoint every 3: a kill after the first leaves most of the stage
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def registered_checkpoints(stage_dir: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Ray Train's view of a run: (its latest checkpoint {checkpoint_dir_name, metrics} or None, every
    registered checkpoint folder name). Ray Train resumes from the latest; a folder still being uploaded
    is not registered. (Reads Ray's own snapshot file, ray 2.60 format.)"""
    uri = storage.join(stage_dir, SNAPSHOT)
    if not storage.exists(uri):
        return None, []
    try:
        snapshot = storage.read_json(uri)
    except (FileNotFoundError, ValueError):  # replaced or half-written while we read it: nothing registered yet
        return None, []
    return snapshot.get("latest_checkpoint_result"), [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def _registered_step(stage_dir: str) -> int:
    """Step of Ray Train's latest registered checkpoint (0: none yet)."""
    latest, _ = registered_checkpoints(stage_dir)
    return int(latest["metrics"].get("step", 0)) if latest else 0


def _meta(checkpoint: str) -> dict[str, Any]:
    return storage.read_json(storage.join(checkpoint, "meta.json"))


def check_run(stage_dir: str) -> dict[str, Any]:
    """After a run: Ray Train's latest checkpoint, its meta.json and load error, and whether every
    registered folder is complete (has meta.json)."""
    latest, names = registered_checkpoints(stage_dir)
    if latest is None:
        return {"latest": None, "meta": {}, "error": "Ray Train registered no checkpoint", "all_complete": False}
    uri = storage.join(stage_dir, latest["checkpoint_dir_name"])
    complete = all(storage.exists(storage.join(stage_dir, n, "meta.json")) for n in names)
    return {"latest": uri, "meta": _meta(uri), "error": _loads(uri), "all_complete": complete}


def _stage_dir(cfg) -> str:
    return storage.join(cfg.trainer.storage_path, f"{cfg.trainer.run_name}-stage1")


def _train_config(ws: Workspace, name: str, *overrides: str):
    return ws.config(f"trainer.epochs={EPOCHS}", f"trainer.max_steps_per_epoch={STEPS}", "trainer.patience=10",
                     "trainer.checkpoint_every=3", "trainer.max_failures=2",
                     f"trainer.run_name={name}-{uuid.uuid4().hex[:6]}", *overrides)


def _loads(checkpoint: str) -> str | None:
    """None when the checkpoint loads into a model, else the error."""
    from speeder_platform.trained import load_trained

    try:
        load_trained(checkpoint)
        return None
    except Exception as err:  # noqa: BLE001 - reported, not raised: the scenario judges it
        return f"{type(err).__name__}: {err}"


def _judge(run: dict[str, Any]) -> tuple[bool, str]:
    """(progress lost, what the run shows): the stage must finish every step after resuming from a
    checkpoint (not from step 0), and Ray Train's latest checkpoint must be complete and load."""
    meta = run["meta"]
    state = meta.get("train_state", {})
    finished = meta.get("epoch") == EPOCHS and meta.get("step") == EPOCHS * STEPS
    lost = not finished or state.get("resumes", 0) < 1 or run["error"] is not None or not run["all_complete"]
    text = (f"resumed from its checkpoint (resumes={state.get('resumes', 0)}), not from step 0, and finished "
            f"epoch {meta.get('epoch')}/{EPOCHS} at step {meta.get('step')}/{EPOCHS * STEPS}; Ray Train's latest "
            f"checkpoint {'loads' if run['error'] is None else 'FAILS: ' + str(run['error'])}, every registered "
            f"one is complete: {run['all_complete']}")
    return lost, text


def train_worker_killed(ws: Workspace) -> dict[str, Any]:
    """SIGKILL a Ray Train worker once Ray Train registered a checkpoint; the stage must resume from it.
    The stage's checkpoints live on the workspace's S3 server, as on a cluster (uploads, Ray Train's
    snapshot and the restarted workers' download all go through the object store)."""
    from speeder_platform.train.driver import run_training

    started = time.perf_counter()
    killed: dict[str, int] = {}
    with ws.s3.environment():
        cfg = _train_config(ws, "worker-killed", f"trainer.storage_path={ws.s3.bucket()}/train")
        stage_dir = _stage_dir(cfg)

        def kill_a_worker() -> None:
            if wait_for(lambda: _registered_step(stage_dir), timeout_s=300):
                workers = wait_for(lambda: alive_actors("RayTrainWorker"), timeout_s=30)
                if workers:
                    killed.update(pid=workers[0]["pid"], registered_step=_registered_step(stage_dir))
                    kill_pid(workers[0]["pid"])

        killer = threading.Thread(target=kill_a_worker, daemon=True)
        killer.start()
        summary = run_training(cfg)
        killer.join(timeout=5)
        lost, shows = _judge(check_run(stage_dir))
    on_s3 = summary.checkpoint.startswith("s3://")
    observed = (f"worker pid {killed.get('pid', '-')} killed (latest registered checkpoint: step "
                f"{killed.get('registered_step', '-')}); Ray Train restarted the worker group, which {shows}; "
                f"final checkpoint on S3: {on_s3}")
    return outcome("train-worker-killed", f"SIGKILL of the Ray Train worker mid-stage, after its first registered "
                   f"checkpoint ({EPOCHS * STEPS} steps, a checkpoint every 3, checkpoints on S3)", observed,
                   data_lost=lost, passed=bool(killed) and on_s3, started=started, killed=killed,
                   checkpoint=summary.checkpoint)


def _driver(spec: str, log_path: str, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "speeder_platform.cli", "train", spec], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def train_driver_restarted(ws: Workspace) -> dict[str, Any]:
    """SIGKILL the `speeder train` driver process mid-stage, start it again with the same spec."""
    import ray

    from speeder_platform.config import to_yaml
    from speeder_platform.ray_utils import ensure_ray
    from speeder_platform.trained import FINAL_FILE, STAGES_FILE, run_uri

    started = time.perf_counter()
    cfg = _train_config(ws, "driver-restarted")
    stage_dir = _stage_dir(cfg)
    spec, log_path = ws.path(f"{cfg.trainer.run_name}.yaml"), ws.path(f"{cfg.trainer.run_name}.log")
    Path(spec).write_text(to_yaml(cfg))
    ensure_ray(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # join this Ray: no second one
    first = _driver(spec, log_path, env)
    ready = wait_for(lambda: _registered_step(stage_dir) or first.poll() is not None, 300)
    killed_at_step = _registered_step(stage_dir)
    crashed_early = first.poll() is not None
    if not crashed_early:
        os.killpg(first.pid, signal.SIGKILL)  # the driver process; the Ray it joined keeps running
    first.wait()
    stages_before = storage.exists(storage.join(run_uri(cfg), STAGES_FILE))
    code = _driver(spec, log_path, env).wait(timeout=500)
    lost, shows = _judge(check_run(stage_dir))
    final = storage.join(run_uri(cfg), FINAL_FILE)
    final_error = _loads(storage.read_json(final)["checkpoint"]) if storage.exists(final) else "no final.json"
    observed = (f"driver killed (latest registered checkpoint: step {killed_at_step}; stages.json "
                f"{'not yet written' if not stages_before else 'ALREADY written'}); the same command again exited "
                f"{code}: the run {shows}; final.json {'loads' if final_error is None else 'FAILS: ' + final_error}")
    return outcome("train-driver-restarted", "SIGKILL of the `speeder train` driver mid-stage, then the same "
                   "command again", observed, data_lost=lost or final_error is not None,
                   passed=bool(ready) and not crashed_early and code == 0 and not stages_before, started=started,
                   log=log_path)


# -- checkpoints ------------------------------------------------------------------------------------
SAVE_LOOP = """
import sys, torch
from speeder.checkpoint import save_checkpoint
class Weights(torch.nn.Module):
    def __init__(self, value, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((n,), float(value)))
    def trainable_state(self):
        return {"w": self.w}
directory, n, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for value in range(first, first + 10**6):  # overwrite the same folder until killed
    save_checkpoint(directory, Weights(value, n), {"stage": 1, "step": value})
"""
WRITE_JSON_LOOP = """
import sys
from speeder_platform import storage
for i in range(10**9):  # rewrite final.json until killed, as the trainer does after each stage
    storage.write_json(sys.argv[1], {"checkpoint": f"ckpt-{i}", "i": i, "pad": "x" * (1 << 20)})
"""
WEIGHTS = 4_000_000  # 16 MB of float32: a save takes long enough to be caught in the middle


def _kill_while_looping(code: str, args: list[str], ready: Path, rng: random.Random, mid_write: bool) -> None:
    """Run a writer loop in a child process and SIGKILL it once it has written `ready`: at a random
    moment, or (mid_write) a few milliseconds after `ready` disappears, i.e. inside an overwrite."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_for(lambda: ready.exists() or child.poll() is not None, timeout_s=60, every_s=0.02)
    if mid_write:
        wait_for(lambda: not ready.exists() or child.poll() is not None, timeout_s=30, every_s=0.001)
        time.sleep(rng.uniform(0.0, 0.005))
    else:
        time.sleep(rng.uniform(0.0, 0.4))
    child.kill()
    child.wait()


def _probe_checkpoint(directory: Path) -> str:
    """refused | consistent | BROKEN: what loading a folder left by a killed save gives."""
    import torch

    from speeder.checkpoint import CheckpointError, load_checkpoint

    class Weights(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(WEIGHTS))

        def trainable_state(self) -> dict[str, torch.Tensor]:
            return {"w": self.w}

    model = Weights()
    try:
        meta = load_checkpoint(directory, model)
    except CheckpointError:
        return "refused"
    except Exception:  # noqa: BLE001 - any other failure is not a clear refusal
        return "BROKEN"
    return "consistent" if bool((model.w == float(meta["step"])).all()) else "BROKEN"


def _probe_json(path: Path) -> str:
    try:
        obj = storage.read_json(str(path))
    except (OSError, ValueError):
        return "BROKEN"
    return "consistent" if obj["checkpoint"] == f"ckpt-{obj['i']}" and len(obj["pad"]) == 1 << 20 else "BROKEN"


def checkpoint_crash_mid_write(ws: Workspace, rounds: int = 6) -> dict[str, Any]:
    """Kill processes while they overwrite a checkpoint folder and final.json; load what is left."""
    started = time.perf_counter()
    rng = random.Random(0)
    folder, final = Path(ws.path("crash", "checkpoint")), Path(ws.path("crash", "final.json"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    ckpt_results, json_results = [], []
    for r in range(rounds):  # even rounds: inside an overwrite of the checkpoint; odd ones: anywhere
        _kill_while_looping(SAVE_LOOP, [str(folder), str(WEIGHTS), str(1000 * (r + 1))], folder / "meta.json", rng,
                            mid_write=r % 2 == 0)
        ckpt_results.append(_probe_checkpoint(folder))
        _kill_while_looping(WRITE_JSON_LOOP, [str(final)], final, rng, mid_write=False)
        json_results.append(_probe_json(final))
    counts = {k: ckpt_results.count(k) for k in ("refused", "consistent", "BROKEN")}
    json_counts = {k: json_results.count(k) for k in ("consistent", "BROKEN")}
    observed = (f"checkpoint folder after each kill: {counts['refused']} refused as incomplete (CheckpointError: "
                f"no meta.json), {counts['consistent']} loaded with weights matching meta.json, {counts['BROKEN']} "
                f"loadable-but-broken; final.json after each kill: {json_counts['consistent']} whole, "
                f"{json_counts['BROKEN']} torn")
    return outcome("checkpoint-crash-mid-write", f"SIGKILL x{rounds} of a process overwriting a 16 MB checkpoint "
                   f"folder (half of them inside a save), and x{rounds} of one rewriting final.json (1 MB), at "
                   f"random moments", observed,
                   data_lost=counts["BROKEN"] + json_counts["BROKEN"] > 0, passed=counts["refused"] >= rounds // 2,
                   started=started, checkpoint=counts, final_json=json_counts)


class _Payload:
    """Unpickling this creates a file: proof that something executed code while loading."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def _unpickles(call: ast.Call) -> bool:
    """Whether a call can unpickle: pickle-family loads/open, torch.load without weights_only=True,
    numpy load with allow_pickle=True."""
    func = call.func
    if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
        return False
    module, name = func.value.id, func.attr
    if module in PICKLERS:
        return name in ("load", "loads", "open", "Unpickler")
    if module == "torch" and name == "load":
        return not _keyword_true(call, "weights_only")
    return module in ("np", "numpy") and name == "load" and _keyword_true(call, "allow_pickle")


def unsafe_load_sites(roots: list[Path]) -> list[str]:
    """file:line of every call in the source under `roots` that can unpickle (see _unpickles)."""
    sites = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            sites += [f"{path}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and _unpickles(node)]
    return sites


def source_roots() -> list[Path]:
    import speeder
    import speeder_platform

    return [Path(next(iter(package.__path__))) for package in (speeder, speeder_platform)]


def checkpoint_not_pickle(ws: Workspace) -> dict[str, Any]:
    """Put a code-executing pickle where model.safetensors should be; every loader must refuse it."""
    import torch

    from speeder.checkpoint import META_FILE, MODEL_FILE

    started = time.perf_counter()
    local = Path(storage.download_dir(ws.checkpoint, ws.path("pickled-checkpoint")))
    marker = Path(ws.path("unpickled-marker"))
    with open(local / MODEL_FILE, "wb") as f:
        pickle.dump(_Payload(str(marker)), f)  # writing a pickle; nothing here ever loads one
    refusals = [_loads(str(local))]
    meta = json.loads((local / META_FILE).read_text())
    meta.pop("files", None)  # a checkpoint from before the digests: the format check alone must refuse it
    (local / META_FILE).write_text(json.dumps(meta))
    refusals.append(_loads(str(local)))
    legacy = local / "legacy.pt"  # torch.load reads *.safetensors with safetensors: give it a pickle file
    legacy.write_bytes((local / MODEL_FILE).read_bytes())
    try:
        torch.load(legacy, weights_only=True)
        refusals.append(None)
    except Exception as err:  # noqa: BLE001 - the refusal is the expected outcome
        refusals.append(f"{type(err).__name__}")
    sites = unsafe_load_sites(source_roots())
    refused = all(r is not None for r in refusals)
    first, second, third = (r.split(":")[0] if r else "LOADED" for r in refusals)
    ran = "RAN" if marker.exists() else "never ran"
    observed = (f"load_trained refused it twice ({first} on the digest, then {second} on the format); "
                f"torch.load(weights_only=True) refused it ({third}); the payload {ran}; unsafe load calls in "
                f"the source: {', '.join(sites) or 'none'}")
    return outcome("checkpoint-not-pickle", "model.safetensors replaced by a pickle whose loading creates a file",
                   observed, data_lost=marker.exists(), passed=refused and not sites, started=started,
                   refusals=refusals, unsafe_sites=sites)
