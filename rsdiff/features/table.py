"""The per-pixel feature table: sampled labeled pixels, fp16 feature vectors, streamed from storage.

Layout at a local folder or ``s3://`` prefix::

    parts/{split}-{id}.npz   features (N, D) float16, labels (N,) uint8, image (N,) str,
                             rows (N,) int32, cols (N,) int32
    table.json               written last (its presence marks the table complete): channel index,
                             checkpoint URI, timesteps, blocks, classes, parts and row counts

Readers stream part by part, so memory is bounded by a few parts whatever the table's size.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.errors import DataError
from rsdiff.features.index import ChannelIndex

TABLE_META = "table.json"
KIND = "rsdiff-features"
FORMAT_VERSION = 1


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


@dataclass
class FeatureTable:
    """A complete feature table, opened from its URI."""

    root: str
    meta: dict[str, Any]
    index: ChannelIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = ChannelIndex.from_json(self.meta["channel_index"])

    @classmethod
    def open(cls, uri: str) -> FeatureTable:
        """Open the table at ``uri``.

        Raises:
            DataError: no ``table.json`` there (extraction missing or incomplete).
        """
        from rsdiff.artifacts import read_sidecar

        meta = read_sidecar(
            uri, TABLE_META, kind=KIND, max_format=FORMAT_VERSION, error=DataError, what="feature table",
            missing_hint="run jobs/extract.py with output=<that URI> first",
        )  # fmt: skip
        return cls(storage.absolute(uri), meta)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.meta["classes"]]

    def parts(self, split: str) -> list[dict[str, Any]]:
        return [p for p in self.meta["parts"] if p["split"] == split]

    def rows(self, split: str) -> int:
        return sum(p["rows"] for p in self.parts(split))

    def class_rows(self, split: str) -> np.ndarray:
        out = np.zeros(self.num_classes, np.int64)
        for p in self.parts(split):
            out += np.asarray(p["class_rows"], np.int64)
        return out

    def iter_batches(
        self,
        split: str,
        channels: np.ndarray | None = None,
        batch_rows: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        mix_parts: int = 4,
        images: set[str] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(features (n, d) float32, labels (n,) int64)`` batches of one split.

        ``channels`` selects feature columns (from :meth:`ChannelIndex.select`); ``shuffle`` mixes
        rows across ``mix_parts`` parts at a time; ``images`` keeps only rows of those image ids.
        """
        parts = [p["name"] for p in self.parts(split)]
        if not parts:
            raise DataError(f"feature table {storage.display(self.root)} has no rows for split {split!r}")
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(parts)
        step = mix_parts if shuffle else 1
        for i in range(0, len(parts), step):
            loaded = [self._load(n, channels, images) for n in parts[i : i + step]]
            x = np.concatenate([a for a, _ in loaded])
            y = np.concatenate([b for _, b in loaded])
            order = rng.permutation(len(y)) if shuffle else np.arange(len(y))
            for j in range(0, len(y), batch_rows):
                sel = order[j : j + batch_rows]
                yield x[sel].astype(np.float32), y[sel].astype(np.int64)

    def _load(
        self, name: str, channels: np.ndarray | None, images: set[str] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        part = read_part(self.root, name)
        x, y = part["features"], part["labels"]
        if images is not None:
            keep = np.isin(part["image"], list(images))
            x, y = x[keep], y[keep]
        return (x if channels is None else x[:, channels]), y
