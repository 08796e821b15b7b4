"""What lands on the nodes: cluster/Dockerfile and the launcher's setup_commands install exactly the pinned
versions on a rayproject/ray base; .dockerignore, rsync and the job runtime_env leave local state behind."""

import pathlib
import re
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: pathlib.Path) -> dict[str, str]:
    """name -> version of a pip constraints file; every line must be an exact pin."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!;@ ]", line), f"{path.name}: not an exact pin: {line}"
            out[norm(name)] = version
    return out


CONSTRAINTS = pins(ROOT / "constraints.txt")
CUDA = pins(ROOT / "cluster" / "constraints-cuda.txt")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)  # quotes kept, && and ; split off
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [argv[2:] for argv in commands + [current] if argv[:2] == ["pip", "install"]]


def check_pinned(args: list[str], where: str) -> set[str]:
    """Each install uses constraints.txt (and the CUDA pins when it can pull torch's dependencies);
    each requirement is an exact pin equal to the lock, or the local project. Returns the packages."""
    constraint_files = {pathlib.Path(args[i + 1]).name for i, a in enumerate(args) if a in ("-c", "--constraint")}
    assert "constraints.txt" in constraint_files, f"{where}: pip install without -c constraints.txt: {args}"
    if "--no-deps" not in args:
        assert "constraints-cuda.txt" in constraint_files, f"{where}: torch's CUDA dependencies unpinned: {args}"
    assert not {"-r", "--requirement"} & set(args), f"{where}: a requirements file this check cannot see into"
    named = set()
    skip_next = False
    for a in args:
        if skip_next or a.startswith("-"):
            skip_next = a in ("-c", "--constraint", "-e", "--editable", "-i", "--index-url", "--extra-index-url")
            continue
        name, sep, version = a.partition("==")
        if not sep:
            assert a.startswith("/"), f"{where}: unpinned requirement {a!r}"
            continue
        assert (CONSTRAINTS | CUDA).get(norm(name)) == version, f"{where}: {a} differs from the lock files"
        named.add(norm(name))
    return named


def makefile_model_packages() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^MODEL_PACKAGES := (.*?[^\\])$", text, re.M | re.S).group(1)
    return {norm(p.split("==")[0]) for p in block.replace("\\\n", " ").split()}


def test_dockerfile_base_is_rayproject_ray_of_the_pinned_version() -> None:
    froms = [args for instr, args in dockerfile_instructions() if instr == "FROM"]
    assert len(froms) == 1
    image = froms[0].split("@")[0]
    assert image == f"rayproject/ray:{CONSTRAINTS['ray']}-py311-gpu"  # ray-ml stopped after 2.49


def test_dockerfile_installs_only_pinned_versions_with_torch_first() -> None:
    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN"]
    installs = [args for run in runs for args in pip_installs(run)]
    assert installs, "no pip install in cluster/Dockerfile"
    named = [check_pinned(args, "cluster/Dockerfile") for args in installs]
    assert named[0] == {"torch"}  # its own layer, reused when only the code changes
    assert f"torch=={CONSTRAINTS['torch']}" in installs[0]
    assert any("-e" in args and "/app" in args for args in installs)
    assert makefile_model_packages() <= set().union(*named)
    # The build fails rather than ship a CPU build of torch.
    assert any("torch.version.cuda" in run for run in runs)


def test_launcher_setup_installs_the_same_pins() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    installs = [args for command in config["setup_commands"] for args in pip_installs(command)]
    assert installs
    named = set().union(*(check_pinned(args, "aws-gpu.yaml setup_commands") for args in installs))
    assert makefile_model_packages() <= named
    assert any(args[-2:] == ["-e", "/home/ray/speeder"] for args in installs)


def test_pin_checker_catches_unpinned_and_drifted_installs() -> None:
    with pytest.raises(AssertionError, match="unpinned"):
        check_pinned(["-c", "constraints.txt", "--no-deps", "torch"], "x")
    with pytest.raises(AssertionError, match="differs"):
        check_pinned(["-c", "constraints.txt", "--no-deps", "torch==2.0.0"], "x")
    with pytest.raises(AssertionError, match="without -c"):
        check_pinned(["torch==" + CONSTRAINTS["torch"]], "x")
    with pytest.raises(AssertionError, match="CUDA"):
        check_pinned(["-c", "constraints.txt", "-e", "/app"], "x")


def test_cuda_pins_only_add_to_constraints_txt() -> None:
    assert CUDA, "cluster/constraints-cuda.txt is empty"
    assert not set(CUDA) & set(CONSTRAINTS), "a package pinned in both lock files"
    assert {"triton", "nvidia-nccl-cu13", "cuda-bindings"} <= set(CUDA)  # what DeepSpeed and NCCL need on GPUs


def docker_ignores(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule (moby/patternmatcher): a pattern matches the path or one of its parent
    folders, from the context root; `**` spans folders, `*` and `?` do not."""
    def regex(pattern: str) -> str:
        out = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return out
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(regex(p), prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # no re-includes to reason about
    for path in (".venv/bin/python", "runs/ml100k/report/report.md", ".git/HEAD", "test-artifacts/trace.zip",
                 "speeder/__pycache__/model.cpython-311.pyc", "platform/speeder_platform/__pycache__/x.pyc",
                 ".pytest_cache/v/cache/lastfailed", ".ruff_cache/x", "speeder.egg-info/PKG-INFO", ".env",
                 "ui/.env", "runs/checkpoint/model.safetensors"):
        assert docker_ignores(patterns, path), path
    for path in ("speeder/model.py", "platform/speeder_platform/jobs.py", "jobs/score.yaml", "pyproject.toml",
                 "constraints.txt", "cluster/constraints-cuda.txt", "README.md"):
        assert not docker_ignores(patterns, path), path
    # The matcher follows Docker, not .gitignore: a bare name matches at the root only.
    assert not docker_ignores(["__pycache__"], "speeder/__pycache__/x.pyc")


def test_job_runtime_env_uploads_no_virtualenv_runs_or_caches(tmp_path: pathlib.Path) -> None:
    """The excludes of jobs/runtime_env.yaml through Ray's own working_dir packaging matcher."""
    from ray._private.runtime_env.packaging import _get_excludes

    excludes = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    excluded = _get_excludes(tmp_path, excludes)
    for path in (".venv", ".venv/lib/python3.11/site.py", "runs", "runs/smoke/final.json", ".git",
                 "test-artifacts", "speeder/__pycache__", ".pytest_cache", ".ruff_cache", "speeder.egg-info"):
        assert excluded(tmp_path / path), path
    for path in ("speeder/model.py", "jobs/train.yaml", "platform/speeder_platform/cli.py"):
        assert not excluded(tmp_path / path), path
