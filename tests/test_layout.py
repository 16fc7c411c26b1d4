"""The package layout the README describes: no stage module imports another stage's module, the
library never reads files by its repository path, and presets ship inside the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsdiff"
# One module (or package) per pipeline stage; each has a job script under jobs/.
STAGES = {
    "rsdiff.ingest", "rsdiff.pretrain", "rsdiff.features.extract", "rsdiff.sweep", "rsdiff.prediction.run",
    "rsdiff.evaluate", "rsdiff.label_efficiency", "rsdiff.sample", "rsdiff.demo", "rsdiff.suggest.run",
}  # fmt: skip
COMPOSERS = {
    "rsdiff.demo": "runs every stage",
    "rsdiff.sample": "runs ingest on generated scenes",
    "rsdiff.label_efficiency": "scores every model through predict and evaluate",
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def _imports(path: Path, names: bool = False) -> set[str]:
    """The rsdiff modules ``path`` imports anywhere in it; with ``names``, also ``pkg.name`` for
    every ``from pkg import name`` (a submodule imported by name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if names:
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("rsdiff")}


@pytest.mark.unit
def test_no_module_imports_another_stages_module():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        if _stage(me) in COMPOSERS:
            continue
        for imported in _imports(path):
            stage = _stage(imported)
            if stage is not None and stage != _stage(me):
                bad.append(f"{me} imports {imported}")
    assert not bad, "\n".join(bad)


def _unit(module: str) -> str:
    """The package-level unit of ``module``: its subpackage (``rsdiff.train``), else itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one node (its cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.unit
def test_the_import_graph_has_no_cycle_between_packages_or_modules():
    """Imports inside functions count too: a cycle there is a design knot even when it loads."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    by_module: dict[str, set[str]] = {}
    by_package: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        for imported in _imports(path, names=True) & modules:
            by_module.setdefault(me, set()).add(imported)
            if _unit(imported) != _unit(me):
                by_package.setdefault(_unit(me), set()).add(_unit(imported))
    assert _cycles(by_package) == []
    assert _cycles(by_module) == []


@pytest.mark.unit
def test_the_library_never_reads_files_by_its_repository_path():
    bad = [
        f"{_module(p)}: {line.strip()}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for line in p.read_text().splitlines()
        if "__file__" in line and ("parents[" in line or ".parent" in line)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.e2e
def test_a_non_editable_install_ships_the_presets(tmp_path):
    """Built as a wheel and installed elsewhere, rsdiff finds its presets by name and every job's
    ``--config <preset>`` resolves from an unrelated folder (no repository beside it)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    repo = PACKAGE.parent
    source = tmp_path / "source"  # a copy: building leaves build/ and egg-info where it runs
    skip = shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(repo, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    wheel = next(tmp_path.glob("rsdiff-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("rsdiff/configs/") and n.endswith(".yaml"))
    presets = (repo / "configs").rglob("*.yaml")
    expected = sorted(f"rsdiff/configs/{p.relative_to(repo / 'configs')}" for p in presets)
    assert shipped == expected and "rsdiff/sweep/run.py" in names
    modules = sorted(str(p.relative_to(repo)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert [m for m in modules if m not in names] == []  # every subpackage is listed in pyproject
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-c", "import rsdiff; print(rsdiff.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(site))
    # Installed inside some other project's git repository, rsdiff claims no commit of its own.
    git = ["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "a user's project"], check=True)
    probe = "from rsdiff.provenance import git_commit; print(git_commit())"
    commit = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )
    assert commit.stdout.strip() == "None", commit.stdout
    cases = [("pretrain", "tiny", "max_steps: 300"), ("sweep", "tiny", "num_samples"),
             ("extract", "tiny", "pixels_per_class"), ("ingest", "dubai", "name: water")]  # fmt: skip
    for job, name, needle in cases:
        proc = subprocess.run(
            [sys.executable, str(repo / "jobs" / f"{job}.py"), "--config", name, "--print-config",
             *(["inputs=[x]"] if job == "ingest" else []), *(["features=x"] if job == "sweep" else []),
             *(["checkpoint=x", "shards=x"] if job == "extract" else [])],
            cwd=elsewhere, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0 and needle in proc.stdout, (job, proc.stderr[-2000:])
