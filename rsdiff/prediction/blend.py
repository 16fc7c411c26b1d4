"""Blending overlapping window predictions into one seamless map, row band by row band.

Windows of ``size`` px step by ``size - overlap`` (the last row/column shifted to the scene edge).
Each window's class probabilities are weighted by a linear ramp that rises from the window edge
over ``overlap`` px (``ramp``), so pixels near a window border, where the UNet sees padding,
count less than the same pixels seen near the centre of the neighbouring window. The blended
value is ``sum(w * p) / sum(w)``.

:class:`RowBlender` keeps only the rows that later windows can still touch: after the windows
whose top row is ``r_i`` are added, every row above ``r_{i+1}`` is final and is handed out. Memory
is ``O(classes x (size + stride) x scene width)``, independent of the scene's height.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def ramp(size: int, overlap: int) -> np.ndarray:
    """``(size, size)`` float32 weights: 1 inside, falling linearly to ``1/(overlap+1)`` at the edge."""
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    w1 = np.minimum(1.0, (d + 1.0) / (overlap + 1.0)) if overlap > 0 else np.ones(size, np.float32)
    return np.outer(w1, w1).astype(np.float32)


class RowBlender:
    """Accumulates weighted window probabilities for a ``height x width`` scene in row order.

    Args:
        height, width: scene size (px).
        channels: classes C.
        size, overlap: window size and overlap (px).
    """

    def __init__(self, height: int, width: int, channels: int, size: int, overlap: int) -> None:
        self.height, self.width, self.channels = height, width, channels
        self.size = size
        self.weights = ramp(size, overlap)
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
