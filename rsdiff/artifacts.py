"""Reading the JSON sidecar every rsdiff artifact carries: shard manifests, checkpoints, feature
tables and heads each hold one (``manifest.json``, ``rsdiff.json``, ``table.json``, ``head.json``)
with its ``kind`` and ``format``. One reader checks both and names the artifact in every error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rsdiff import storage
from rsdiff.errors import RsdiffError


def read_sidecar(
    folder: str,
    name: str,
    *,
    kind: str,
    max_format: int,
    error: type[RsdiffError],
    what: str,
    missing_hint: str | Callable[[], str],
    legacy_without_kind: bool = False,
) -> dict[str, Any]:
    """The JSON object ``{folder}/{name}``, checked to be ``kind`` in a format this rsdiff reads.

    Args:
        folder: artifact folder or ``s3://`` prefix.
        name: sidecar file name.
        kind: the expected ``"kind"`` value.
        max_format: the newest ``"format"`` this version reads.
        error: exception type to raise (``DataError``, ``CheckpointError``).
        what: what the artifact is, for messages (``"feature table"``).
        missing_hint: how to make one, appended when the sidecar is absent (a function is called
            then only: a hint that looks around costs nothing on the way that finds the sidecar).
        legacy_without_kind: accept a sidecar with no ``"kind"`` (written before rsdiff stored it).

    Raises:
        error: absent, not a JSON object, another kind, or written by a newer rsdiff.
    """
    uri = storage.join(folder, name)
    try:
        text = storage.read_text(uri)
    except storage.NotFoundError as exc:
        hint = missing_hint() if callable(missing_hint) else missing_hint
        raise error(f"no {name} at {storage.display(folder)}: no {what} there; {hint}") from exc
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise error(f"{storage.display(uri)} is not valid JSON ({exc}); the {what} is damaged") from None
    if not isinstance(meta, dict):
        raise error(f"{storage.display(uri)} is not an rsdiff {what} (not a JSON object)")
    found = meta.get("kind", kind if legacy_without_kind else None)
    if found != kind:
        raise error(f"{storage.display(folder)} is not an rsdiff {what} ({name} says kind={found!r})")
    try:
        fmt = int(meta.get("format", 1))
    except (TypeError, ValueError):
        raise error(f"{storage.display(uri)} has format={meta.get('format')!r}, not a number") from None
    if fmt > max_format:
        raise error(
            f"{storage.display(uri)} has format {fmt}, newer than this rsdiff reads ({max_format}); "
            "upgrade rsdiff to read it"
        )
    return meta


# The sidecar (or marker) that says which rsdiff job wrote a folder, and what to call it.
_KINDS = (
    ("manifest.json", "an ingest output (a shard manifest and its shards)"),
    ("table.json", "a feature table"),
    ("checkpoint_manager_snapshot.json", "a pretraining run (its checkpoints)"),
    ("rsdiff.json", "a pretraining checkpoint"),
    ("head.json", "a trained head"),
    ("summary.json", "a sweep's output (its best head and trials)"),
    ("results.json", "a label-efficiency output"),
    ("predictions.json", "a prediction output"),
)


def describe_folder(uris: list[str], folder: str) -> str:
    """What the files ``uris`` under ``folder`` are, in words: the rsdiff artifact whose sidecar
    sits at the top of the folder, else a few of the file names (for messages that refuse to
    touch a folder a job does not own)."""
    uris = [u for u in uris if not storage.name(u).startswith(("rsdiff-lease", ".rsdiff-write-probe"))]
    top = {storage.name(u) for u in uris if storage.parent(u).rstrip("/") == folder.rstrip("/")}
    for sidecar, what in _KINDS:
        if sidecar in top:
            return f"{what} ({sidecar})"
    names = sorted(u[len(folder.rstrip("/")) + 1 :] for u in uris)
    return f"{len(names)} file(s) no rsdiff sweep wrote, e.g. {names[:3]}"
