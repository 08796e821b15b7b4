"""The `speeder` command line: commands with their own option parsers get every word after the command."""

from __future__ import annotations

import pytest

from speeder_platform import cli


@pytest.fixture
def captured(monkeypatch) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}

    def fake(name: str):
        def run(argv: list[str]) -> int:
            seen[name] = argv
            return 0
        return run

    monkeypatch.setattr("speeder_platform.bench.quality.run.main", fake("quality"))
    monkeypatch.setattr("speeder_platform.bench.faults.run.main", fake("faults"))
    monkeypatch.setattr("speeder_platform.report.main", fake("report"))
    return seen


@pytest.mark.parametrize(("argv", "name", "expected"), [
    (["bench", "quality", "--dataset", "ml100k", "--out", "x"], "quality", ["--dataset", "ml100k", "--out", "x"]),
    (["bench", "quality", "--", "--dataset", "synthetic"], "quality", ["--dataset", "synthetic"]),
    (["-v", "bench", "faults", "--only", "data-import"], "faults", ["--only", "data-import"]),
    (["report", "jobs/demo.yaml", "output_root=/tmp/r", "--no-baselines"], "report",
     ["jobs/demo.yaml", "output_root=/tmp/r", "--no-baselines"]),
])
def test_pass_through_commands_get_their_words_in_order(captured, argv, name, expected) -> None:
    assert cli.main(argv) == 0
    assert captured == {name: expected}


def test_unknown_options_of_other_commands_still_fail(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        cli.main(["data", "stats", "/tmp/x", "--bogus"])
    assert err.value.code == 2
    assert "--bogus" in capsys.readouterr().err
