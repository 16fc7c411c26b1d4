"""The per-pixel feature table: sampled labeled pixels, fp16 feature vectors, streamed from storage.

Layout at a local folder or ``s3://`` prefix::

    parts/{split}-{id}.npz   features (N, D) float16, labels (N,) uint8, image (N,) str,
                             rows (N,) int32, cols (N,) int32
    table.json               written last (its presence marks the table complete): channel index,
                             checkpoint URI, timesteps, blocks, classes, parts and row counts

Readers stream part by part, so memory is bounded by a few parts whatever the table's size, or
load a split's selected channels at once (:meth:`FeatureTable.load`) when they fit in memory.
:meth:`FeatureTable.cached` reads the parts from a node-local copy made once per node
(:mod:`rsdiff.features.cache`) instead of from storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.errors import DataError
from rsdiff.features.cache import LocalTable, TableCacheConfig, local_copy
from rsdiff.features.index import ChannelIndex
from rsdiff.features.parts import read_part

TABLE_META = "table.json"
KIND = "rsdiff-features"
FORMAT_VERSION = 1


@dataclass
class FeatureTable:
    """A complete feature table, opened from its URI."""

    root: str
    meta: dict[str, Any]
    local: LocalTable | None = None  # a node-local copy the parts are read from (see cached())
    index: ChannelIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = ChannelIndex.from_json(self.meta["channel_index"])

    def cached(self, cfg: TableCacheConfig) -> FeatureTable:
        """This table read from its node-local copy, made now if no process on this node made it
        yet (``cfg.node_cache`` off, or too large for the cache: this table, read from storage)."""
        if not cfg.node_cache or self.local is not None:
            return self
        local = local_copy(self.root, self.meta, cfg)
        return self if local is None else FeatureTable(self.root, self.meta, local)

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
        rows = {p["name"]: int(p["rows"]) for p in self.parts(split)}
        parts = list(rows)
        if not parts:
            raise DataError(f"feature table {storage.display(self.root)} has no rows for split {split!r}")
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(parts)
        step = mix_parts if shuffle else 1
        for i in range(0, len(parts), step):
            x, y = self._group({n: rows[n] for n in parts[i : i + step]}, channels, images)
            order = rng.permutation(len(y)) if shuffle else np.arange(len(y))
            for j in range(0, len(y), batch_rows):
                sel = order[j : j + batch_rows]
                yield x[sel].astype(np.float32), y[sel].astype(np.int64)
            del x, y, order  # freed before the next group is read: one group in memory at a time

    def _group(
        self, rows: dict[str, int], channels: np.ndarray | None, images: set[str] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the parts ``rows`` names (``{part: rows it holds}``): ``(features (n, d)
        float16, labels (n,) uint8)``, filled part by part into one array (no part is held twice),
        or, for an ``images`` subset (rows unknown until read), concatenated.

        Raises:
            DataError: a part holding another number of rows than ``table.json`` says.
        """
        names = list(rows)
        if images is not None:
            loaded = [self._load(n, channels, images) for n in names]
            return np.concatenate([a for a, _ in loaded]), np.concatenate([b for _, b in loaded])
        dim = int(self.meta["dim"]) if channels is None else len(channels)
        x = np.empty((sum(rows[n] for n in names), dim), np.float16)
        y = np.empty(len(x), np.uint8)
        at = 0
        for name in names:
            part = self.part(name)
            if len(part["labels"]) != rows[name]:
                raise DataError(
                    f"part {name} of {storage.display(self.root)} holds {len(part['labels'])} rows, its "
                    f"table.json says {rows[name]}: re-extract the table"
                )
            out = x[at : at + rows[name]]
            if channels is None:
                out[:] = part["features"]
            else:
                np.take(part["features"], channels, axis=1, out=out)
            y[at : at + rows[name]] = part["labels"]
            at += rows[name]
        return x, y

    def part(self, name: str) -> dict[str, np.ndarray]:
        """The columns of one part (see the module docstring), from the node-local copy if any."""
        return self.local.part(name) if self.local is not None else read_part(self.root, name)

    def count_rows(self, split: str, images: set[str] | None = None) -> int:
        """Rows of ``split`` (of those ``images``), exact: from the node-local copy's image column,
        else from each part's (read from storage)."""
        if images is None:
            return self.rows(split)
        wanted = list(images)
        if self.local is not None:
            return int(np.isin(self.local.column(split, "image"), wanted).sum())
        return sum(int(np.isin(self.part(p["name"])["image"], wanted).sum()) for p in self.parts(split))

    def load(
        self, split: str, channels: np.ndarray | None = None, images: set[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All rows of ``split`` (of ``images``) at once: ``(features (n, d) float16, labels (n,) uint8)``
        with ``d`` = the selected ``channels``; memory is ``n * d * 2`` bytes."""
        loaded = [self._load(p["name"], channels, images) for p in self.parts(split)]
        if not loaded:
            raise DataError(f"feature table {storage.display(self.root)} has no rows for split {split!r}")
        return np.concatenate([x for x, _ in loaded]), np.concatenate([y for _, y in loaded])

    def _load(
        self, name: str, channels: np.ndarray | None, images: set[str] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        part = self.part(name)
        x, y = part["features"], part["labels"]
        if images is not None:
            keep = np.isin(part["image"], list(images))
            x, y = x[keep], y[keep]
        return np.asarray(x if channels is None else x[:, channels]), np.asarray(y)
