"""Pictures a person would rather look at: class maps over imagery."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rsdiff.data.classmap import IGNORE_INDEX, parse_colour


def palette(classes: Sequence[dict[str, Any]]) -> np.ndarray:
    """``(256, 3)`` uint8 colour per class id (the class map's colours; ignore stays black)."""
    lut = np.zeros((256, 3), np.uint8)
    for c in classes:
        lut[int(c["id"])] = parse_colour(c["colour"])
    return lut


def overlay(
    rgb: np.ndarray, labels: np.ndarray, classes: Sequence[dict[str, Any]], alpha: float = 0.5
) -> np.ndarray:
    """Blend ``(H, W)`` class ids over an ``(H, W, 3)`` uint8 image; ignore pixels stay untouched."""
    colours = palette(classes)[labels].astype(np.float32)
    out = rgb.astype(np.float32)
    mask = labels != IGNORE_INDEX
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
    return out.clip(0, 255).astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
    """Join ``(H, W, 3)`` uint8 pictures left to right with white gaps."""
    h = max(i.shape[0] for i in images)
    parts = []
    for i, img in enumerate(images):
        canvas = np.full((h, img.shape[1], 3), 255, np.uint8)
        canvas[: img.shape[0]] = img
        parts.append(canvas)
        if i < len(images) - 1:
            parts.append(np.full((h, pad, 3), 255, np.uint8))
    return np.concatenate(parts, 1)
