"""Layout rules (docs/architecture.md#platform-source-root, docs/architecture.md#layout): `platform/` is a
source root and nothing may shadow the standard library's `platform`; `speeder/` imports no Ray; the
design is cited from docs/, never from documents outside the repository."""

import pathlib
import re
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


# Files that may name the design documents that lived outside the repository: docs/ (which replaced
# them) and README.md (edited by hand).
CITATION_EXEMPT = ("docs/", "README.md")
OLD_CITATION = re.compile(r"DESIGN\.md|STACK-NOTES|DESIGN \d")
DOCS_CITATION = re.compile(r"docs/([a-z-]+\.md)#([a-z0-9-]+)")


def _tracked_text_files() -> list[pathlib.Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    paths = [ROOT / name for name in out.split("\0") if name]
    return [p for p in paths if p.is_file() and p.suffix not in {".png", ".jpg", ".gz", ".parquet", ".safetensors"}]


def _anchors(doc: pathlib.Path) -> set[str]:
    """A document's anchors: explicit `<a id="...">` and GitHub's heading slugs (lowercase, spaces to
    hyphens, punctuation dropped)."""
    text = doc.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def test_no_citation_of_documents_outside_the_repository() -> None:
    """The design lives in docs/: code, tests and build files cite docs/<file>.md#<anchor>, never the
    DESIGN.md / STACK-NOTES documents that were not in the repository."""
    offenders = []
    for path in _tracked_text_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(CITATION_EXEMPT) or rel == "tests/test_layout.py":
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if OLD_CITATION.search(line)]
    assert offenders == []


def test_docs_citations_resolve() -> None:
    """Every `docs/<file>.md#<anchor>` cited outside docs/ names a document and an anchor that exist."""
    broken = []
    for path in _tracked_text_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("docs/"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for doc, anchor in DOCS_CITATION.findall(text):
            target = ROOT / "docs" / doc
            if not target.exists() or anchor not in _anchors(target):
                broken.append(f"{rel}: docs/{doc}#{anchor}")
    assert broken == []
