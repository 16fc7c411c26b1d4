"""Where a run came from, as MLflow tags: the rsdiff version, the git commit of the code (when it
runs from a checkout), the command line and the data URIs, all without credentials.

Tags use MLflow's own names where it has them (``mlflow.source.git.commit``, ``mlflow.source.name``)
so the UI shows them in a run's header; the rest are ``rsdiff.*``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import rsdiff
from rsdiff.config import REDACTED, is_secret_key, redact_uri

MAX_TAG_CHARS = 5000  # MLflow's tag value limit is 8000; keep a margin


@functools.cache
def git_commit() -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout rsdiff's code is imported from, or None: an installed
    wheel (even one inside some other repository's virtualenv: the package's own files must be
    tracked), a Ray working-dir upload without ``.git``, or no ``git`` on the machine."""
    from importlib.resources import files

    package = str(files("rsdiff"))

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", package, *args], capture_output=True, text=True, timeout=5)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip(), bool(status.stdout.strip())


def command_line(argv: list[str] | None = None) -> str:
    """The process's command line (``sys.argv``) with secrets masked: values of secret-looking
    ``key=value`` overrides and passwords inside URIs."""
    words = []
    for word in sys.argv if argv is None else argv:
        key, eq, _ = word.partition("=")
        words.append(f"{key}={REDACTED}" if eq and is_secret_key(key) else redact_uri(word))
    return " ".join(words)


def provenance_tags(data: dict[str, Any] | None = None, argv: list[str] | None = None) -> dict[str, str]:
    """Tags every rsdiff run carries: version, commit (and whether the checkout had local changes),
    command line, and ``rsdiff.data.<key>`` for each data URI in ``data`` (lists joined by commas)."""
    tags = {
        "rsdiff.version": rsdiff.__version__,
        "rsdiff.command": command_line(argv)[:MAX_TAG_CHARS],
        "mlflow.source.name": Path((sys.argv if argv is None else argv)[0] or "python").name,
    }
    found = git_commit()
    if found:
        tags["mlflow.source.git.commit"] = found[0]
        tags["rsdiff.git_dirty"] = str(found[1]).lower()
    for key, value in (data or {}).items():
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        tags[f"rsdiff.data.{key}"] = redact_uri(text)[:MAX_TAG_CHARS]
    return tags
