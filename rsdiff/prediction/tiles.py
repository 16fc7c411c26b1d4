"""Per-tile uncertainty statistics of one scene, accumulated from a prediction's row bands.

A scene is cut into a grid of ``tile`` px candidate tiles from its top-left corner (tiles at the
right and bottom edges are cut short by the scene). Rows of the uncertainty measure arrive top to
bottom in bands of any height (as :class:`~rsdiff.prediction.blend.RowBlender` releases them);
once a grid row of tiles is complete, each of its tiles is summarised over its valid pixels:
mean, the ``quantile`` of the measure, the valid fraction and the mean descriptor vector. Memory
is one grid row of tiles: ``O(tile x width x (1 + descriptor dims))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsdiff.prediction.config import Measure


@dataclass(frozen=True)
class TileOptions:
    """How candidate tiles are cut and summarised: ``size`` px tiles, scored by ``measure``, with
    the ``quantile`` kept next to the mean and ``descriptor_dims`` descriptor channels."""

    size: int
    measure: Measure = Measure.entropy
    quantile: float = 0.9
    descriptor_dims: int = 16


@dataclass(frozen=True)
class TileStats:
    """One candidate tile: where it is (px of the scene) and what the prediction says of it."""

    row: int
    col: int
    height: int
    width: int
    mean: float  # mean of the measure over valid pixels (nats)
    quantile: float  # the scorer's quantile of the measure over valid pixels (nats)
    valid_fraction: float  # valid pixels / tile pixels
    descriptor: np.ndarray  # (P,) float32 mean projected features (empty without descriptors)


class TileScorer:
    """Summarises a ``height x width`` scene's per-pixel measure into ``tile`` px tiles.

    Args:
        height, width: the scene (or predicted region) in px.
        tile: tile side in px.
        quantile: which quantile of each tile's values to keep (e.g. 0.9).
        descriptor_dims: P, channels of the descriptor rows passed to :meth:`add_rows`.
    """

    def __init__(self, height: int, width: int, tile: int, quantile: float, descriptor_dims: int = 0) -> None:
        if tile < 1:
            raise ValueError(f"tile must be >= 1 px, got {tile}")
        self.height, self.width, self.tile, self.q = height, width, tile, quantile
        self.dims = descriptor_dims
        self._values: list[np.ndarray] = []  # row bands of the current grid row
        self._desc: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []
        self._top = 0  # scene row of the current grid row's first row
        self._have = 0  # rows buffered
        self.tiles: list[TileStats] = []

    def add_rows(
        self, first_row: int, values: np.ndarray, valid: np.ndarray, descriptor: np.ndarray | None = None
    ) -> None:
        """Add ``(rows, width)`` measure values and validity (and ``(P, rows, width)`` descriptors)
        starting at scene row ``first_row`` (rows must arrive in order)."""
        if first_row != self._top + self._have:
            raise ValueError(f"rows must arrive in order: got {first_row}, expected {self._top + self._have}")
        if self.dims and (descriptor is None or descriptor.shape[0] != self.dims):
            raise ValueError(f"expected ({self.dims}, rows, width) descriptors")
        start = 0
        n = values.shape[0]
        while start < n:
            grid_stop = min(self._top + self.tile, self.height)
            take = min(n - start, grid_stop - (self._top + self._have))
            self._values.append(values[start : start + take])
            self._valid.append(valid[start : start + take])
            if self.dims:
                self._desc.append(descriptor[:, start : start + take])  # type: ignore[index]
            self._have += take
            start += take
            if self._top + self._have == grid_stop:
                self._close_grid_row()

    def _close_grid_row(self) -> None:
        values = np.concatenate(self._values, 0)
        valid = np.concatenate(self._valid, 0)
        desc = np.concatenate(self._desc, 1) if self.dims else None
        rows = values.shape[0]
        for col in range(0, self.width, self.tile):
            w = min(self.tile, self.width - col)
            v = valid[:, col : col + w]
            vals = values[:, col : col + w][v]
            frac = float(v.mean()) if v.size else 0.0
            if vals.size:
                mean, qv = float(vals.mean()), float(np.quantile(vals, self.q))
                d = desc[:, :, col : col + w][:, v].mean(1) if desc is not None else np.zeros(0)
            else:
                mean = qv = float("nan")
                d = np.full(self.dims, np.nan)
            self.tiles.append(TileStats(self._top, col, rows, w, mean, qv, frac, d.astype(np.float32)))
        self._top += rows
        self._have = 0
        self._values, self._valid, self._desc = [], [], []

    def finish(self) -> list[TileStats]:
        """The tiles, once every row was added.

        Raises:
            ValueError: rows are missing.
        """
        if self._top != self.height:
            raise ValueError(f"tile scorer got {self._top + self._have} of {self.height} rows")
        return self.tiles
