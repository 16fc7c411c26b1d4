"""What every job's command line tells a user: ``--help`` (with its examples, sections and
presets), ``--print-config`` before the required keys are given, presets by name, and every
example command in the README and in ``--help`` reading as a valid config."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import run_job_inline

from rsdiff.config import load_config, preset, preset_names, preview_yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_"))
HEAVY = ("torch", "ray", "mlflow", "webdataset", "rasterio")


def _job(name: str) -> typing.Any:
    if str(REPO / "jobs") not in sys.path:
        sys.path.insert(0, str(REPO / "jobs"))
    return importlib.import_module(name)


def _schema(name: str) -> type:
    """The config schema a job script hands to ``run_job`` (the type of its ``_run``'s ``cfg``)."""
    return typing.get_type_hints(_job(name)._run)["cfg"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.unit
@pytest.mark.parametrize("name", JOBS)
def test_help_keeps_examples_and_lists_sections_and_presets(name):
    """(That ``--help`` is fast is the import-hygiene check below: it loads no heavy library.)"""
    out = run_job_inline(f"{name}.py", "--help")
    assert out.returncode == 0, out.stderr
    doc = _job(name).__doc__
    examples = [line.strip() for line in doc.splitlines() if re.match(r"\s*(python|ray job) ", line)]
    assert examples, f"jobs/{name}.py's docstring shows no example command"
    shown = [line.strip() for line in out.stdout.splitlines()]
    for line in examples:
        assert line in shown, f"example line not kept as a line in --help: {line!r}"
    assert "config sections:" in out.stdout and "required keys:" in out.stdout
    assert not re.search(r"\w+\(\w+: '", out.stdout), "a section without a docstring (dataclass repr shown)"
    names = preset_names(name)
    assert "presets (--config NAME): " + (", ".join(names) if names else "none shipped") in out.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["pretrain", "sweep", "predict"])
def test_help_imports_no_heavy_library(name):
    """``--help`` and ``--print-config`` answer before torch, Ray or MLflow load."""
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, 'jobs'); sys.argv = ['jobs/{name}.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path('jobs/{name}.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = _cli("-c", code)
    assert "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


@pytest.mark.unit
def test_every_job_says_what_a_stop_keeps():
    """Ctrl-C / SIGTERM print what was kept: every job has that sentence (a missing one was a
    KeyError inside the signal handler)."""
    assert sorted(_job("_cli").KEPT) == JOBS


@pytest.mark.unit
def test_print_config_works_without_required_keys():
    out = run_job_inline("predict.py", "--print-config", "output=maps")
    assert out.returncode == 0, out.stderr
    assert "head: ???" in out.stdout and "inputs: ???" in out.stdout and "output: maps" in out.stdout
    bad = run_job_inline("predict.py", "--print-config", "outptu=maps")
    assert bad.returncode == 2 and "unknown config key 'outptu'" in bad.stderr
    secret = run_job_inline("predict.py", "--print-config", "tracking.uri=http://me:hunter2@mlflow:5000")
    assert "hunter2" not in secret.stdout and "http://***@mlflow:5000" in secret.stdout


@pytest.mark.unit
def test_preset_by_name_and_unknown_name_lists_presets():
    out = run_job_inline("pretrain.py", "--config", "tiny", "--print-config")
    assert out.returncode == 0, out.stderr
    assert out.stdout == preview_yaml(_schema("pretrain"), preset("pretrain", "tiny"))
    bad = run_job_inline("pretrain.py", "--config", "tinny", "--print-config")
    assert bad.returncode == 2
    assert "'tinny' is neither a file nor a preset of pretrain" in bad.stderr
    assert str(preset_names("pretrain")) in bad.stderr


def _commands(text: str) -> list[tuple[str, list[str], str]]:
    """``(job, argv, line)`` for every ``python jobs/NAME.py ...`` command in ``text``; continuation
    lines are joined and the command ends at a shell separator or comment."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for match in re.finditer(r"python jobs/(\w+)\.py", text):
        name, rest = match.group(1), _logical_line(text[match.end() :])
        tokens = shlex.split(rest, comments=True)
        argv = []
        for token in tokens:
            if token in ("&&", "||", "|", ";", ")"):
                break
            argv.append(token)
        found.append((name, argv, match.group(0) + rest))
    return found


def _logical_line(text: str) -> str:
    """``text`` up to the first newline or backtick outside quotes (a quoted value may span lines)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "\n`":
            return text[:i]
    return text


def _readme_and_help_commands() -> list[tuple[str, list[str], str]]:
    found = _commands((REPO / "README.md").read_text())
    for name in JOBS:
        found += _commands(_job(name).__doc__)
    return found


@pytest.mark.unit
def test_every_example_command_resolves():
    """Each README and ``--help`` example reads as a config: its preset exists, its keys and values
    fit the schema, and, unless it elides values with ``...``, every required key is given."""
    commands = _readme_and_help_commands()
    assert len(commands) >= 30 and {name for name, _, _ in commands} == set(JOBS)
    for name, argv, line in commands:
        assert name in JOBS, f"README names jobs/{name}.py, which does not exist: {line}"
        schema = _schema(name)
        config, overrides, elided = None, [], False
        args = iter(argv)
        for token in args:
            if token == "--config":
                config = preset(name, next(args))
            elif token.startswith("[") or token == "...":  # a usage synopsis: [key=VALUE] ...
                elided = True
            elif "..." in token:
                elided = True
                overrides.append(token.replace("...", "x"))
            else:
                assert "=" in token, f"{token!r} is not key=value in: {line}"
                overrides.append(token)
        if elided:
            preview_yaml(schema, config, [o for o in overrides if o.partition("=")[2] != "x"])
        else:
            load_config(schema, config, overrides)


@pytest.mark.unit
@pytest.mark.parametrize("name", JOBS)
def test_the_example_override_in_help_and_errors_is_one_this_job_accepts(name):
    """Every job's help and key=value error said ``tile_size=128``, which eight of ten reject."""
    shown = re.search(r"dotlist overrides such as (\S+)", run_job_inline(f"{name}.py", "--help").stdout)
    assert shown, f"jobs/{name}.py --help shows no example override"
    example = shown.group(1)
    preview_yaml(_schema(name), None, [example])  # accepted: no ConfigError
    bad = run_job_inline(f"{name}.py", "not-an-override")
    assert bad.returncode == 2 and f"(e.g. {example})" in bad.stderr, bad.stderr


@pytest.mark.unit
def test_a_misnamed_key_gets_a_did_you_mean_and_a_dashed_override_its_fix():
    wrong = run_job_inline("pretrain.py", "--print-config", "optim.learning_rate=1e-3")
    assert wrong.returncode == 2 and "did you mean 'optim.lr'?" in wrong.stderr, wrong.stderr
    typo = run_job_inline("sweep.py", "--print-config", "features=x", "head.widht=64")
    assert "did you mean 'head.width'?" in typo.stderr, typo.stderr
    unrelated = run_job_inline("sweep.py", "--print-config", "features=x", "zzz=1")
    assert "did you mean" not in unrelated.stderr and "valid keys at that level" in unrelated.stderr
    for argv in (["--optim.lr", "1e-3"], ["--optim.lr=1e-3"]):
        dashed = run_job_inline("pretrain.py", *argv)
        lines = dashed.stderr.strip().splitlines()
        assert dashed.returncode == 2 and len(lines) == 1, dashed.stderr
        assert "--optim.lr" in lines[0] and "e.g. optim.lr=1e-3" in lines[0]


@pytest.mark.unit
def test_a_missing_demo_folder_is_one_line_before_any_folder_store_or_ray_starts(tmp_path):
    """It was reported after Ray had started (12 s), leaving a workdir with an MLflow store."""
    import ray

    work = tmp_path / "demo"
    proc = run_job_inline("demo.py", f"data={tmp_path / 'no-such-folder'}", f"workdir={work}")
    assert proc.returncode == 2 and "match no image file" in proc.stderr.strip().splitlines()[-1]
    assert not work.exists() and not ray.is_initialized()


@pytest.mark.unit
def test_a_head_path_that_holds_no_head_says_where_the_heads_are(tmp_path):
    """A sweep's output folder points at its best/ head, a label-efficiency output at heads/<run>."""
    from rsdiff.errors import CheckpointError
    from rsdiff.heads.artifact import HEAD_META, TrainedHead

    sweep, le = tmp_path / "sweep", tmp_path / "le"
    (sweep / "best").mkdir(parents=True)
    (sweep / "best" / HEAD_META).write_text("{}")
    (le / "heads" / "residual-k1-d0").mkdir(parents=True)
    (le / "heads" / "residual-k1-d0" / HEAD_META).write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"pass its best head, head={sweep / 'best'}")):
        TrainedHead.load(str(sweep))
    with pytest.raises(
        CheckpointError, match=re.escape(f"head={le / 'heads' / 'residual-k1-d0'} (1 in heads/)")
    ):
        TrainedHead.load(str(le))
    with pytest.raises(CheckpointError, match=re.escape("({sweep output}/best)")):
        TrainedHead.load(str(tmp_path))


_LOST_CTRL_C = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background start ignores it)
sys.path.insert(0, sys.argv[1])
from dataclasses import dataclass
from _cli import run_job

@dataclass
class Nothing:
    steps: int = 1

def _run(cfg):
    # Python reports an exception raised in an at-fork hook as "Exception ignored" and drops it: a
    # Ctrl-C that lands while Ray forks its daemons is raised there.
    os.register_at_fork(after_in_parent=lambda: signal.default_int_handler(signal.SIGINT, None))
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(3)
    print("ran to the end")

sys.exit(run_job("evaluate", "", Nothing, _run, []))
"""


@pytest.mark.unit
def test_a_ctrl_c_that_lands_in_a_fork_hook_still_stops_the_job():
    """Python drops a KeyboardInterrupt raised in an at-fork hook (where a Ctrl-C during Ray's
    start-up lands): the job re-raises it in its own flow instead of running on and exiting 0."""
    done = subprocess.run([sys.executable, "-c", _LOST_CTRL_C, str(REPO / "jobs")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "ran to the end" not in done.stdout
    assert "rsdiff evaluate: stopped by SIGINT" in done.stderr
