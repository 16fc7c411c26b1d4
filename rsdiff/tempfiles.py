"""Temporary folders of long-running tasks, and the removal of those whose process was killed.

A Ray task stopped by the job (Ctrl-C, SIGTERM, a failed sibling scene: ``ray.cancel(force=True)``)
is killed, so its ``finally`` blocks never run and its temporary folder (a scene's maps being
written, a shard being filled) stays behind in the node's temp folder. Such folders are named
``rsdiff-{kind}-{pid}-*`` after the process that made them: :func:`remove_orphans` deletes those
whose process no longer exists. The job's driver calls it after stopping its tasks, and every
task calls it when it starts (on other nodes, the next job's first task tidies up).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def task_tempdir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder ``rsdiff-{kind}-{pid}-*`` for this process's task."""
    return tempfile.TemporaryDirectory(prefix=f"rsdiff-{kind}-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_orphans(kinds: tuple[str, ...] = ("predict", "shard")) -> int:
    """Delete this user's ``rsdiff-{kind}-{pid}-*`` temp folders whose process is gone; returns how
    many were removed."""
    removed = 0
    for kind in kinds:
        for folder in Path(tempfile.gettempdir()).glob(f"rsdiff-{kind}-*-*"):
            pid = folder.name[len(f"rsdiff-{kind}-") :].split("-", 1)[0]
            try:
                mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
            except OSError:
                continue
            if mine and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    if removed:
        log.info("removed %d temporary folder(s) left by stopped tasks", removed)
    return removed
