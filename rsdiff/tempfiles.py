"""Temporary folders of long-running tasks, and the removal of those whose process was killed.

A job stops its Ray tasks (Ctrl-C, SIGTERM, a failed sibling scene) by interrupting them first, so
their ``finally`` blocks remove their temporary folders (:func:`rsdiff.raytools.stop_tasks`). A task
that does not stop in time is killed, and so is every task of a job whose driver died; their
temporary folders (a scene's maps being written, a shard being filled) stay behind in the node's
temp folder. Such folders are named ``rsdiff-{kind}-{pid}-*`` after the process that made them:
:func:`remove_orphans` deletes those whose process no longer exists. The job's driver calls it after
stopping its tasks, and every task calls it when it starts (on other nodes, the next job's first
task tidies up).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def task_tempdir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder ``rsdiff-{kind}-{pid}-*`` for this process's task."""
    return tempfile.TemporaryDirectory(prefix=f"rsdiff-{kind}-{os.getpid()}-")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and can still run (a zombie cannot)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here (macOS): it exists


def _task_folders(kinds: tuple[str, ...]) -> dict[Path, int]:
    """This user's ``rsdiff-{kind}-{pid}-*`` temp folders and the pid each was made by."""
    found = {}
    for kind in kinds:
        for folder in Path(tempfile.gettempdir()).glob(f"rsdiff-{kind}-*-*"):
            pid = folder.name[len(f"rsdiff-{kind}-") :].split("-", 1)[0]
            try:
                mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
            except OSError:
                continue
            if mine and pid.isdigit():
                found[folder] = int(pid)
    return found


def remove_orphans(kinds: tuple[str, ...] = ("predict", "shard"), settle_s: float = 0.0) -> int:
    """Delete this user's ``rsdiff-{kind}-{pid}-*`` temp folders whose process is gone; returns how
    many were removed.

    With ``settle_s`` > 0, folders whose process is still alive are watched for up to ``settle_s``
    seconds and removed as soon as it is gone: a killed Ray worker can outlive its task's result by
    a moment. Those of processes alive after that (another job's tasks) are kept.
    """
    removed = 0
    deadline = time.monotonic() + settle_s
    while True:
        alive = 0
        for folder, pid in _task_folders(kinds).items():
            if _alive(pid):
                alive += 1
            else:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if removed:
        log.info("removed %d temporary folder(s) left by stopped tasks", removed)
    return removed
