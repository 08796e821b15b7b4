"""`speeder bench faults`: options, the table, the JSON, and the exit status when a scenario fails."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from speeder_platform import cli
from speeder_platform.bench.faults.run import SCENARIOS, format_table

pytestmark = pytest.mark.fault



def main(argv: list[str]) -> int:
    """`speeder bench faults ARGV` through the one command line."""
    return cli.main(["bench", "faults", *argv])

def test_list_names_every_scenario(capsys) -> None:
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(SCENARIOS)
    with pytest.raises(SystemExit):
        main(["--only", "no-such-scenario"])


def test_every_scenario_is_called_by_a_fault_test() -> None:
    """The tests call the very functions `speeder bench faults` runs, every one of them."""
    called = set()
    for path in pathlib.Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                called.add(node.func.id)
    functions = {name: target.split(":")[1] for name, target in SCENARIOS.items()}
    assert {name for name, function in functions.items() if function not in called} == set()


def test_a_scenario_runs_into_the_table_and_the_json(capsys, tmp_path) -> None:
    out = tmp_path / "faults.json"
    assert main(["--only", "data-import", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| scenario | injected | observed | data lost | passed | seconds |")
    assert "| data-import |" in table and "| none | yes |" in table and "all passed, no data lost" in table
    saved = json.loads(out.read_text())
    assert [r["scenario"] for r in saved["results"]] == ["data-import"] and saved["failed"] == []


def test_a_crashing_scenario_fails_the_command(capsys, monkeypatch) -> None:
    monkeypatch.setitem(SCENARIOS, "data-import", "env:outcome")  # outcome(ws): a TypeError
    assert main(["--only", "data-import"]) == 1
    table = capsys.readouterr().out
    assert "scenario crashed: TypeError" in table and "unknown (crashed)" in table and "FAILED: data-import" in table


def test_table_cells_cannot_break_the_markdown() -> None:
    row = {"scenario": "s", "injected": "a | b", "observed": "line\nbreak", "data_lost": False, "passed": True,
           "seconds": 1.0, "details": {}}
    assert format_table([row]).splitlines()[2] == "| s | a \\| b | line break | none | yes | 1.0 |"
