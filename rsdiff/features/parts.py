"""One part of a feature table: an ``.npz`` of equal-length columns under ``parts/``, written
atomically and read without pickles. The table (:mod:`rsdiff.features.table`) lists its parts;
the node-local cache (:mod:`rsdiff.features.cache`) concatenates them.

Columns: features (N, D) float16, labels (N,) uint8, image (N,) str, rows (N,) int32, cols (N,) int32.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import numpy as np

from rsdiff import storage

COLUMNS = ("features", "labels", "image", "rows", "cols")


@dataclass
class PartInfo:
    """One written part: its file name (under ``parts/``), split, row count and per-class rows."""

    name: str
    split: str
    rows: int
    images: int
    class_rows: list[int]


def write_part(root: str, split: str, arrays: dict[str, np.ndarray], num_classes: int) -> PartInfo:
    """Write one part atomically; ``arrays`` holds features/labels/image/rows/cols of equal length."""
    name = f"{split}-{uuid.uuid4().hex[:12]}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(storage.join(root, "parts", name), buf.getvalue())
    labels = arrays["labels"]
    return PartInfo(
        name=name,
        split=split,
        rows=int(labels.shape[0]),
        images=len(set(arrays["image"].tolist())),
        class_rows=np.bincount(labels, minlength=num_classes)[:num_classes].tolist(),
    )


def read_part(root: str, name: str) -> dict[str, np.ndarray]:
    """Arrays of one part (no pickles)."""
    with np.load(io.BytesIO(storage.read_bytes(storage.join(root, "parts", name))), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
