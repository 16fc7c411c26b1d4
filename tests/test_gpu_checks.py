"""``tests/benchmarks/gpu_checks.sh``'s own logic, on any machine: each step says how it ended, the
exit status says whether all did, and ``RSDIFF_GPU_BUDGET_S`` stops a step at the budget and runs
none after it. The steps' commands are stood in for by a ``python`` on PATH that does what each
case needs (ends at once, fails, never ends), so no GPU, torch or Ray is involved."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

SCRIPT = REPO / "tests" / "benchmarks" / "gpu_checks.sh"
STEPS = ("test_gpu", "ray_gpu", "compile")


def _run(tmp_path: Path, python_body: str, budget: str | None) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\n{python_body}\n")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RSDIFF_GPU_WORK": str(tmp_path / "work")}  # fmt: skip
    env.pop("RSDIFF_GPU_BUDGET_S", None)
    if budget is not None:
        env["RSDIFF_GPU_BUDGET_S"] = budget
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def _said(proc: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split(":")[0]: line for line in proc.stdout.splitlines() if line.split(":")[0] in STEPS}


def test_every_step_says_how_it_ended_and_the_status_says_whether_all_did(tmp_path):
    done = _run(tmp_path / "ok", "exit 0", None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(" exit 0 after " in line for line in _said(done).values()) and len(_said(done)) == 3
    failed = _run(tmp_path / "bad", "exit 3", None)
    assert failed.returncode == 1
    assert all(" exit 3 after " in line for line in _said(failed).values()) and len(_said(failed)) == 3


def test_a_step_still_running_at_the_budget_is_stopped_and_none_runs_after_it(tmp_path):
    proc = _run(tmp_path, "exec sleep 600", "2")
    assert proc.returncode == 1
    said = _said(proc)
    assert said["test_gpu"].startswith("test_gpu: exit 124 after ")
    assert ", stopped at the budget (log: " in said["test_gpu"]
    assert said["ray_gpu"] == "ray_gpu: not run (RSDIFF_GPU_BUDGET_S=2 is spent)"
    assert said["compile"] == "compile: not run (RSDIFF_GPU_BUDGET_S=2 is spent)"
    assert not (tmp_path / "out" / "ray_gpu.log").exists()


def test_a_budget_that_is_not_whole_seconds_is_refused_in_one_line(tmp_path):
    proc = _run(tmp_path, "exit 0", "ten")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "RSDIFF_GPU_BUDGET_S=ten: give whole seconds (or leave it unset for no bound)\n"
