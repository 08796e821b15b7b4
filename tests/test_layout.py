"""DESIGN 2.1: `platform/` is a source root; nothing may shadow the standard library's `platform`."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_shadowed_from_repo_root() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "Linux"
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_model_package_imports_no_ray() -> None:
    code = "import sys, speeder, speeder.schema; assert 'ray' not in sys.modules, 'speeder imported ray'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "speeder").rglob("*.py")
        if any(line.lstrip().startswith(("import ray", "from ray", "import omegaconf", "from omegaconf"))
               for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_speeder_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "speeder_platform.cli", "--help"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert "data" in out.stdout and "model" in out.stdout
