"""Tile grids over a scene."""

from __future__ import annotations


def tile_origins(height: int, width: int, size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` pixel offsets of ``size``x``size`` tiles covering a scene.

    Tiles step by ``stride`` (default ``size``: no overlap); the last row/column of tiles is
    shifted back to end exactly at the scene edge, so every pixel is covered and no tile is
    padded. Requires ``height >= size`` and ``width >= size``.
    """
    stride = stride or size
    if height < size or width < size:
        raise ValueError(f"scene {height}x{width} is smaller than the tile size {size}")
    return [(r, c) for r in axis_origins(height, size, stride) for c in axis_origins(width, size, stride)]


def axis_origins(n: int, size: int, stride: int) -> list[int]:
    """Window starts along an axis of ``n`` px: ``0, stride, ...``, the last ending at ``n``.

    An axis shorter than the window gets one window at 0 (prediction pads the read).
    """
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts
