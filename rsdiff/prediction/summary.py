"""``predictions.json``: the index of a prediction folder, published last by ``jobs/predict.py``
and read by ``jobs/evaluate.py``. Output paths in it are relative to the folder, so a moved
folder keeps working and nothing outside it can be named."""

from __future__ import annotations

from typing import Any

from rsdiff import storage
from rsdiff.artifacts import read_sidecar
from rsdiff.errors import DataError

SUMMARY = "predictions.json"
KIND = "rsdiff-predictions"
FORMAT_VERSION = 1


OUTPUT_KEYS = ("class_map", "probabilities", "uncertainty", "quicklook")


def relative_record(record: dict[str, Any], out: str) -> dict[str, Any]:
    """``record`` with its output paths relative to the prediction folder ``out``."""
    rel = dict(record)
    for key in OUTPUT_KEYS:
        if rel.get(key):
            rel[key] = rel[key][len(out) :].lstrip("/") if rel[key].startswith(out + "/") else rel[key]
    return rel


def resolve_output(folder: str, value: str, key: str = "class_map") -> str:
    """The URI of an output named in ``folder``'s ``predictions.json`` (relative names resolve
    against ``folder``).

    Raises:
        DataError: an absolute path or URI outside ``folder`` (a moved folder of an older rsdiff,
            or an edited file): it would score maps other than the ones in the folder.
    """
    if not (storage.is_s3(value) or value.startswith("/") or "://" in value):
        if ".." in value.split("/"):
            raise DataError(
                f"{SUMMARY} in {storage.display(folder)} names {key} {value!r} outside the folder"
            )
        return storage.join(folder, value)
    if value.startswith(folder.rstrip("/") + "/"):
        return value
    raise DataError(
        f"{SUMMARY} in {storage.display(folder)} names {key} {storage.display(value)}, outside that folder "
        "(written by an older rsdiff and moved, or edited); re-run jobs/predict.py into this folder"
    )


def read_summary(folder: str) -> dict[str, Any]:
    """The ``predictions.json`` of the prediction folder ``folder``.

    Raises:
        DataError: absent (not a finished prediction folder), damaged, or another kind of file.
    """
    return read_sidecar(
        folder, SUMMARY, kind=KIND, max_format=FORMAT_VERSION, error=DataError, what="finished predictions",
        missing_hint="pass the output folder of jobs/predict.py", legacy_without_kind=True,
    )  # fmt: skip
