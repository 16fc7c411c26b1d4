"""A journal of a long job's finished runs, so a stopped job keeps them and a re-run resumes.

``journal.json`` beside a job's outputs holds a digest of the settings that decide the results and
one entry per finished run (a label-efficiency run: one method on one draw, trained, predicted and
scored). It is rewritten whole after each run (temp + rename), so it never holds a half-written
entry; it is not the completion marker (``results.json`` is). A re-run with the same settings takes
the entries whose artifacts still exist and runs the rest; a re-run with other settings starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from rsdiff import storage

log = logging.getLogger(__name__)
JOURNAL = "journal.json"


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 of ``settings`` as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """The finished runs under ``folder`` for ``settings``.

    Args:
        folder: the job's output folder (local path or ``s3://``).
        settings: what decides a run's result (not where it is written or tracked).
    """

    def __init__(self, folder: str, settings: dict[str, Any]) -> None:
        self.uri = storage.join(folder, JOURNAL)
        self.digest = settings_digest(settings)
        self.entries: dict[str, dict[str, Any]] = {}
        if not storage.exists(self.uri):
            return
        try:
            data = json.loads(storage.read_text(self.uri))
        except (ValueError, storage.NotFoundError):
            log.warning("%s is unreadable: starting over", storage.display(self.uri))
            return
        if data.get("settings") != self.digest:
            log.info("%s was made with other settings: starting over", storage.display(self.uri))
            return
        self.entries = dict(data.get("runs", {}))

    def get(self, key: str, artifact: str) -> dict[str, Any] | None:
        """The entry of run ``key`` when it finished and the file ``artifact`` (a URI relative to the
        journal's folder, e.g. ``heads/<key>/head.json``) still exists."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        uri = storage.join(storage.parent(self.uri), artifact)
        if not storage.exists(uri):
            log.warning("%s finished before, but %s is gone: running it again", key, storage.display(uri))
            return None
        return entry

    def add(self, key: str, entry: dict[str, Any]) -> None:
        """Record run ``key`` as finished (the journal is rewritten at once)."""
        self.entries[key] = entry
        storage.write_text(self.uri, json.dumps({"settings": self.digest, "runs": self.entries}, indent=1))
