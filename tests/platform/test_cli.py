"""The `speeder` command line: one argparse tree that declares every command and option."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest

from speeder_platform import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) of every runnable command in the tree."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*words, name))


LEAVES = list(_leaves(cli.build_parser()))


def test_the_tree_has_every_command() -> None:
    names = {" ".join(words) for words, _ in LEAVES}
    assert names == {"data prepare", "data stats", "model info", "train", "evaluate", "diagnose", "featurize",
                     "score", "serve", "ui", "bench serve", "bench speed", "bench quality", "bench faults",
                     "report", "job"}


@pytest.mark.parametrize(("words", "parser"), LEAVES, ids=[" ".join(w) for w, _ in LEAVES])
def test_each_commands_help_lists_all_its_options(capsys, words, parser) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*words, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert options and all(o in text for o in options), [o for o in options if o not in text]


def test_bench_quality_options_reach_the_bench(monkeypatch) -> None:
    seen = {}

    def fake(args: argparse.Namespace, command: str) -> int:
        from speeder_platform.bench.quality.run import check_args

        seen["args"], seen["command"] = check_args(args), command
        return 0

    monkeypatch.setattr("speeder_platform.bench.quality.run.run_command", fake)
    argv = ["bench", "quality", "--dataset", "ml100k", "--set", "trainer.lr=1e-3", "--set", "trainer.epochs=2",
            "--variants", "Speeder,no PPT", "--skip", "llara"]
    assert cli.main(argv) == 0
    args = seen["args"]
    assert args.dataset == "ml100k" and args.set == ["trainer.lr=1e-3", "trainer.epochs=2"]
    assert args.variants == ["Speeder", "no PPT"] and args.skip == {"llara"}
    assert seen["command"] == "speeder " + " ".join(argv)  # recorded in results.json


def test_overrides_may_follow_options_and_bad_words_fail(capsys, tmp_path) -> None:
    out = tmp_path / "syn"
    assert cli.main(["data", "prepare", "synthetic", "--out", str(out), "synthetic.num_users=30",
                     "synthetic.num_items=60"]) == 0
    assert cli.main(["data", "stats", str(out)]) == 0
    assert "users" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        cli.main(["data", "stats", str(out), "--bogus"])
    assert err.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "faults", "--only", "no-such-scenario"])


def test_module_and_console_script_agree() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}"}
    as_module = subprocess.run([sys.executable, "-m", "speeder_platform", "bench", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, check=True).stdout
    script = pathlib.Path(sys.executable).with_name("speeder")
    assert script.exists(), script
    as_script = subprocess.run([str(script), "bench", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert as_module == as_script and "quality" in as_module
    listed = subprocess.run([sys.executable, "-m", "speeder_platform", "bench", "faults", "--list"], cwd=ROOT,
                            env=env, capture_output=True, text=True, check=True).stdout.split()
    from speeder_platform.bench.faults.run import SCENARIOS

    assert listed == list(SCENARIOS)
    assert json.dumps(listed)  # plain names
