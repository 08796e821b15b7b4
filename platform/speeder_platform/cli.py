"""The `speeder` command line.

    speeder data prepare movielens-100k --out runs/ml100k/data
    speeder data stats runs/ml100k/data
    speeder model info smollm2-135m
    speeder job jobs/smoke.yaml [key=value ...] [--address http://head:8265]

Commands that take a CONFIG accept dotlist overrides after it (`trainer.num_workers=4`). Heavy
modules are imported inside each command so that `speeder --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from speeder.defaults import LOSS_POOLS
from speeder_platform.config import PREPARE_SOURCES, ConfigError, TrainerConfig
from speeder_platform.offline import NO_TELEMETRY

log = logging.getLogger("speeder")

# Nothing of ours reaches the internet: no usage stats, no hub telemetry, no Gradio analytics.
OFFLINE_ENV = NO_TELEMETRY


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "botocore", "httpx", "filelock", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset

    cfg = prepare_config_from_args(args.source, args.overrides, raw=args.raw, images=args.images,
                                   kcore=args.kcore, max_history=args.max_history,
                                   num_candidates=args.num_candidates, seed=args.seed)
    report = prepare_dataset(cfg, args.out)
    log.info("%s", report.summary())
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from speeder_platform.data.stats import dataset_stats, format_stats

    sys.stdout.write(format_stats(dataset_stats(args.uri)) + "\n")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from speeder_platform.model_info import model_info

    sys.stdout.write(model_info(args.name, args.overrides) + "\n")
    return 0


def _config(args: argparse.Namespace):
    from speeder_platform.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from speeder_platform.train.driver import run_training

    summary = run_training(_config(args))
    sys.stdout.write(f"{summary.table()}\n\nfinal checkpoint: {summary.checkpoint}\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from speeder_platform.evaluate import run_evaluate

    result = run_evaluate(_config(args), args.checkpoint)
    sys.stdout.write(json.dumps(result["metrics"], indent=2) + "\n")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from speeder_platform.diagnose import diagnose_table, run_diagnose

    result = run_diagnose(_config(args), args.checkpoint, users=args.users)
    sys.stdout.write(diagnose_table(result) + "\n")
    return 0


def _cmd_featurize(args: argparse.Namespace) -> int:
    from speeder_platform.featurize.pipeline import run_featurize

    cfg = _config(args)
    if args.incremental:
        cfg.featurize.incremental = True
    report = run_featurize(cfg, force=args.force)
    sys.stdout.write(report.summary() + "\n")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from speeder_platform.score import run_score

    report = run_score(_config(args))
    sys.stdout.write(report.summary() + "\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from speeder_platform.serve.app import run_serve

    return run_serve(_config(args), args.checkpoint)


def _cmd_ui(args: argparse.Namespace) -> int:
    from speeder_ui.app import run_ui

    return run_ui(args.config, args.overrides, endpoint=args.endpoint, checkpoint=args.checkpoint,
                  compare=args.compare, port=args.port, baselines=not args.no_baselines)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from speeder_platform.bench.serve import format_report, run_bench_serve

    report = run_bench_serve(_config(args), args.checkpoint, requests=args.requests, concurrency=args.concurrency,
                             k=args.k, out=args.out)
    sys.stdout.write(format_report(report) + "\n")
    return 0


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    import json

    from speeder_platform import storage
    from speeder_platform.bench.speed import format_report, run_bench_speed

    report = run_bench_speed(backbone=args.backbone, num_layers=args.num_layers, dataset=args.dataset,
                             history=args.history, train_batch=args.train_batch, train_steps=args.train_steps,
                             infer_batch=args.infer_batch, infer_batches=args.infer_batches, threads=args.threads,
                             negative_cache_steps=args.negative_cache_steps, loss_pool=args.loss_pool,
                             sampled_negatives=args.sampled_negatives)
    if args.out:
        storage.write_json(args.out, report)
    sys.stdout.write(format_report(report) + "\n" + json.dumps({k: report[k] for k in (
        "tokens_per_sample", "train_speedup", "infer_speedup", "infer_speedup_catalog")}, indent=1) + "\n")
    return 0


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from speeder_platform.bench.quality.run import run_command

    return run_command(args, command=" ".join(["speeder", *args.argv]))


def _cmd_bench_faults(args: argparse.Namespace) -> int:
    from speeder_platform.bench.faults.run import SCENARIOS, run_command

    if args.list:
        sys.stdout.write("\n".join(SCENARIOS) + "\n")
        return 0
    return run_command(args.only, args.out, keep=args.keep)


def _cmd_report(args: argparse.Namespace) -> int:
    from speeder_platform.report import write_report

    uri = write_report(args.config, args.overrides, args.out, baselines=not args.no_baselines,
                       diagnose=not args.no_diagnose)
    sys.stdout.write(f"report: {uri}\n")
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    from speeder_platform.jobs import run_job

    return run_job(args.spec, args.overrides, address=args.address, runtime_env_file=args.runtime_env)


def _add_config_command(sub, name: str, help_text: str, func: Callable[[argparse.Namespace], int]):
    cmd = sub.add_parser(name, help=help_text)
    cmd.add_argument("config", help="a job spec / config YAML (jobs/*.yaml)")
    cmd.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.num_workers=4")
    cmd.set_defaults(func=func)
    return cmd


def _add_bench_quality(bsub) -> None:
    from speeder_platform.bench.quality.variants import FEATURES_NAME, PARTS, VARIANTS

    q = bsub.add_parser("quality", help="test-split tables: baselines, Speeder and one row per lever, cold-start "
                        "items, missing modalities (markdown, JSON, PNG)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--dataset", choices=("ml100k", "synthetic", "both"), default="both")
    q.add_argument("--out", default="runs/bench/quality", help="results.md, results.json and PNG plots")
    q.add_argument("--ml100k-data", default="runs/bench/ml100k", help="ML-100K dataset (prepared if missing)")
    q.add_argument("--synthetic-data", default="runs/bench/synthetic", help="synthetic dataset (made if missing)")
    q.add_argument("--features-name", default=FEATURES_NAME, help="features/<name> to use or make; `default` "
                   "reuses a job's features made with the same encoders")
    q.add_argument("--synthetic-users", type=int, help="users of the synthetic set (default: the synthetic spec's "
                   "prepare.synthetic.num_users); a set already at --synthetic-data must have been made with them")
    q.add_argument("--ml100k-spec", default="jobs/demo.yaml", help="ML-100K recipe: model, trainer, featurize")
    q.add_argument("--synthetic-spec", default="jobs/synthetic.yaml", help="synthetic-set recipe")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting for every variant (repeatable), e.g. trainer.stage_samples=[...]")
    q.add_argument("--variants", default=",".join(VARIANTS), help="Speeder variants, comma-separated")
    q.add_argument("--skip", default="", help=f"parts to skip, comma-separated: {', '.join(PARTS)}")
    q.add_argument("--valid-users", type=int, help="stage-end validation users (0: all; default per dataset)")
    q.add_argument("--llara-steps", type=int, help="LLaRA training steps (default per dataset)")
    q.add_argument("--llara-eval-users", type=int, help="LLaRA test users (0: all; default per dataset)")
    q.add_argument("--cold-fraction", type=float, default=0.1, help="share of items held out (cold start)")
    q.add_argument("--missing-rate", type=float, default=0.3, help="share of images/texts masked at test time")
    q.add_argument("--threads", type=int, help="torch threads (default: 1 for tiny backbones, else 2)")
    q.add_argument("--seeds", help="pipeline seeds, comma-separated (e.g. 0,1,2): the bench once per seed "
                   "(featurize.sasrec.seed and trainer.seed) under --out/seed-N, and seeds.md across them")
    q.set_defaults(func=_cmd_bench_quality)


def _add_bench_faults(bsub) -> None:
    from speeder_platform.bench.faults.run import SCENARIOS

    f = bsub.add_parser("faults", help="fault-injection scenarios: what was injected, what was observed, data lost")
    f.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                   help=f"run only these scenarios (in the usual order): {', '.join(SCENARIOS)}")
    f.add_argument("--out", metavar="FILE.json", help="also write the results as JSON (local path or s3://)")
    f.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is logged)")
    f.add_argument("--list", action="store_true", help="list the scenarios and exit")
    f.set_defaults(func=_cmd_bench_faults)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speeder", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import datasets into the canonical layout, and inspect them")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="import a dataset: k-core, leave-one-out splits, candidates")
    prep.add_argument("source", choices=PREPARE_SOURCES)
    prep.add_argument("--out", required=True, help="dataset URI to write (local folder or s3://...)")
    prep.add_argument("--raw", help="folder of the original files (default for movielens-100k: "
                      "the copy inside the recbole package)")
    prep.add_argument("--images", help="amazon: folder of already-downloaded images named <asin>.<ext>")
    prep.add_argument("--kcore", type=int, help="iterative k-core threshold (default 5)")
    prep.add_argument("--max-history", type=int, help="most recent items kept per history (default 20)")
    prep.add_argument("--num-candidates", type=int, help="candidates per sample (default 20)")
    prep.add_argument("--seed", type=int, help="candidate sampling seed (default 0)")
    prep.add_argument("overrides", nargs="*", help="prepare.* overrides, e.g. synthetic.num_users=100")
    prep.set_defaults(func=_cmd_data_prepare)
    stats = dsub.add_parser("stats", help="users, items, interactions, density, history lengths, images")
    stats.add_argument("uri")
    stats.set_defaults(func=_cmd_data_stats)

    model = sub.add_parser("model", help="inspect backbones")
    msub = model.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="family, d_llm, layers, total and trainable parameters")
    info.add_argument("name", help="preset (tiny-llama, smollm2-135m, ...) or a Hugging Face id/path")
    info.add_argument("overrides", nargs="*", help="model.* overrides, e.g. lora.r=16")
    info.set_defaults(func=_cmd_model_info)

    _add_config_command(sub, "train", "run the MPO stages with Ray Train (DDP on CPU, DeepSpeed on GPUs)",
                        _cmd_train)
    ev = _add_config_command(sub, "evaluate", "test-split metrics, both protocols (JSON + markdown)",
                             _cmd_evaluate)
    ev.add_argument("--checkpoint", help="checkpoint URI (default: the run's final checkpoint)")
    dg = _add_config_command(sub, "diagnose", "why a trained model ranks as it does: user-vector collapse, popularity "
                             "correlation, training-free rules, gate and token scales", _cmd_diagnose)
    dg.add_argument("--checkpoint", help="checkpoint URI (default: the run's final checkpoint)")
    dg.add_argument("--users", type=int, default=300, help="validation users for the user-vector figures")
    fz = _add_config_command(sub, "featurize", "encode item text, images and sequences with Ray Data actor pools",
                             _cmd_featurize)
    fz.add_argument("--incremental", action="store_true", help="only items missing from the features table")
    fz.add_argument("--force", action="store_true", help="featurize again even if the table is up to date")
    _add_config_command(sub, "score", "nightly batch scoring: top-K for every user, one date partition",
                        _cmd_score)

    srv = _add_config_command(sub, "serve", "the recommendation HTTP API on Ray Serve (127.0.0.1:serve.port), "
                              "until Ctrl-C", _cmd_serve)
    srv.add_argument("--checkpoint", help="checkpoint URI (default: serve.checkpoint, else the run's final one)")
    ui = sub.add_parser("ui", help="the Gradio demo on 127.0.0.1 (in-process model, or --endpoint of `speeder serve`)")
    ui.add_argument("config", nargs="?", help="a job spec / config YAML (the model's run and dataset)")
    ui.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. serve.max_k=20")
    ui.add_argument("--endpoint", help="a running Serve API (http://127.0.0.1:8000) instead of an in-process model")
    ui.add_argument("--checkpoint", help="in-process checkpoint URI (default: the run's final one)")
    ui.add_argument("--compare", help="a second model side by side: stageN of the run, a checkpoint URI or an "
                    "endpoint URL")
    ui.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    ui.add_argument("--no-baselines", action="store_true",
                    help="without SASRec's and popularity's lists beside Speeder's")
    ui.set_defaults(func=_cmd_ui)
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bserve = _add_config_command(bsub, "serve", "Serve throughput and p50/p99 latency, batching on vs off",
                                 _cmd_bench_serve)
    bserve.add_argument("--checkpoint", help="checkpoint URI (default: serve.checkpoint, else the run's final one)")
    bserve.add_argument("--requests", type=int, default=200, help="requests per mode (default 200)")
    bserve.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    bserve.add_argument("--k", type=int, default=10, help="top-K per request (default 10)")
    bserve.add_argument("--out", help="write the figures as JSON here (local path or s3://)")
    bspeed = bsub.add_parser("speed", help="Speeder vs the multi-token (LLaRA-style) baseline: tokens, train and "
                             "inference speed, memory; same backbone, one run")
    bspeed.add_argument("--backbone", default="smollm2-135m")
    bspeed.add_argument("--num-layers", type=int, help="truncate the backbone to its first N layers")
    bspeed.add_argument("--dataset", default="runs/bench/ml100k", help="prepared dataset (ML-100K made if missing)")
    bspeed.add_argument("--history", type=int, default=20)
    bspeed.add_argument("--train-batch", type=int, default=4)
    bspeed.add_argument("--train-steps", type=int, default=3, help="timed steps (after one warm-up)")
    bspeed.add_argument("--infer-batch", type=int, default=8)
    bspeed.add_argument("--infer-batches", type=int, default=3, help="timed batches (after one warm-up)")
    bspeed.add_argument("--threads", type=int, default=2)
    bspeed.add_argument("--negative-cache-steps", type=int, help="Speeder's catalog-token cache "
                        "(default: the trainer's, 0 = fresh tokens for every item at every step)")
    bspeed.add_argument("--loss-pool", choices=LOSS_POOLS, default=TrainerConfig.loss_pool,
                        help="Speeder's training softmax (trainer.loss_pool; default: the trainer's, catalog)")
    bspeed.add_argument("--sampled-negatives", type=int, default=TrainerConfig.sampled_negatives,
                        help="negatives per step with --loss-pool sampled (trainer.sampled_negatives)")
    bspeed.add_argument("--out", help="write the figures as JSON here")
    bspeed.set_defaults(func=_cmd_bench_speed)
    _add_bench_quality(bsub)
    _add_bench_faults(bsub)
    report = _add_config_command(sub, "report", "the run report of a finished job: markdown, plots, results.json",
                                 _cmd_report)
    report.add_argument("--out", help="report folder (default <output_root>/report)")
    report.add_argument("--no-baselines", action="store_true",
                        help="do not compute popularity/SASRec when the job wrote no baselines.json")
    report.add_argument("--no-diagnose", action="store_true",
                        help="do not run `speeder diagnose` when the job wrote no diagnose.json")

    job = sub.add_parser("job", help="run a job spec's steps on local Ray, or submit it to a cluster")
    job.add_argument("spec", help="a job spec (jobs/*.yaml)")
    job.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. output_root=s3://bucket/run")
    job.add_argument("--address", help="submit to this Ray cluster's job server (http://head:8265)")
    job.add_argument("--runtime-env", help="runtime_env YAML for submission (default: runtime_env.yaml "
                     "beside the spec)")
    job.set_defaults(func=_cmd_job)
    return p


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides (key=value) may come anywhere, also after options: `prepare X --out Y a.b=1`.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # the command line as typed (benches record it with their results)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
