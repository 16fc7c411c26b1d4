"""Blending overlapping window predictions into one seamless map, row band by row band.

Windows of ``size`` px step by ``size - overlap`` (the last row/column shifted to the scene edge).
Each window's class probabilities are weighted (``ramp``) by the product over rows and columns of
a 1-D weight of the pixel's distance ``d`` to the window edge: ``MIN_WEIGHT`` inside the degraded
``border`` band (where the UNet sees padding, see :mod:`rsdiff.prediction.border`), then a linear
ramp over the rest of the overlap, ``(d - border + 1) / (overlap - 2 border + 1)`` capped at 1. Two
neighbouring windows cross-fade over the part of their overlap that is clear of both borders, and
with ``overlap >= 2 border`` every pixel has a window in which it is clear of the band on both
axes (the one nearer its centre on each; at ``overlap = 2 border`` the ramp is a step and each
pixel comes from the one window whose central ``size - overlap`` px it is in), so border pixels
are (almost) never what the map shows. ``border = 0`` is the plain linear ramp over the overlap.
The blended value is ``sum(w * p) / sum(w)``.

:class:`RowBlender` keeps only the rows that later windows can still touch: after the windows
whose top row is ``r_i`` are added, every row above ``r_{i+1}`` is final and is handed out. Memory
is ``O(classes x (size + stride) x scene width)``, independent of the scene's height.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MIN_WEIGHT = 1e-4  # of a pixel inside a window's border band (> 0: scene edges have no better window)


def ramp(size: int, overlap: int, border: int = 0) -> np.ndarray:
    """``(size, size)`` float32 weights: ``MIN_WEIGHT`` within ``border`` px of the edge, then
    rising linearly to 1 over ``overlap - 2 * border`` px (with ``border=0``: 1 inside, falling to
    ``1/(overlap+1)`` at the edge; ``overlap=0``: all 1)."""
    if overlap and overlap < 2 * border:
        raise ValueError(f"overlap={overlap} must be at least 2 x border={border}")
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    if overlap > 0:
        w1 = np.clip((d - border + 1.0) / (overlap - 2 * border + 1.0), 0.0, 1.0)
    else:
        w1 = np.ones(size, np.float32)
    w1 = np.where(d < border, MIN_WEIGHT, np.maximum(w1, MIN_WEIGHT))
    return np.outer(w1, w1).astype(np.float32)


class RowBlender:
    """Accumulates weighted window probabilities for a ``height x width`` scene in row order.

    Args:
        height, width: scene size (px).
        channels: classes C.
        size, overlap: window size and overlap (px).
        border: px at each window edge given ``MIN_WEIGHT`` (see :func:`ramp`).
    """

    def __init__(
        self, height: int, width: int, channels: int, size: int, overlap: int, border: int = 0
    ) -> None:
        self.height, self.width, self.channels = height, width, channels
        self.size = size
        self.weights = ramp(size, overlap, border)
        self.top = 0  # scene row of buffer row 0
        self.num = np.zeros((channels, 0, width), np.float32)
        self.den = np.zeros((0, width), np.float32)

    def _ensure(self, stop: int) -> None:
        have = self.top + self.den.shape[0]
        if stop > have:
            extra = stop - have
            self.num = np.concatenate([self.num, np.zeros((self.channels, extra, self.width), np.float32)], 1)
            self.den = np.concatenate([self.den, np.zeros((extra, self.width), np.float32)], 0)

    def add(self, row: int, col: int, probs: np.ndarray) -> None:
        """Add a window's ``(C, size, size)`` probabilities at scene ``(row, col)``, cropped to the scene."""
        h = min(self.size, self.height - row)
        w = min(self.size, self.width - col)
        if row < self.top:
            raise ValueError(f"window at row {row} arrives after rows above {self.top} were released")
        self._ensure(row + h)
        r = row - self.top
        wt = self.weights[:h, :w]
        self.num[:, r : r + h, col : col + w] += probs[:, :h, :w] * wt
        self.den[r : r + h, col : col + w] += wt

    def release(self, upto: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, (C, rows, width) blended probabilities)`` for final rows below ``upto``."""
        n = min(upto, self.top + self.den.shape[0]) - self.top
        if n <= 0:
            return
        if (self.den[:n] <= 0).any():
            raise ValueError("rows released before any window covered them")
        out = self.num[:, :n] / self.den[None, :n]
        first = self.top
        self.num = self.num[:, n:]
        self.den = self.den[n:]
        self.top += n
        yield first, out
