"""How far into a window its border degrades the prediction, measured against centred windows.

A pixel near a window's edge is seen by the UNet (and by a pixel head's convolutions) next to
padding, not next to its real neighbours, so its features, and the class they give, differ from
those of the same pixel seen from a window centred on it. :func:`border_profile` measures that:
for windows placed at random in a scene, the per-pixel agreement of the window's class with the
class of a *centred* prediction (every pixel taken from a window whose centre is within
``step / 2`` px of it), as a function of the pixel's distance to the nearest window edge.
:func:`band_width` reads off how many edge pixels are degraded; prediction's default blending gives
those pixels (almost) no weight and overlaps windows by enough that every pixel has a window in
which it is clear of that band on both axes (see :mod:`rsdiff.prediction.blend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rsdiff.heads.artifact import TrainedHead


@dataclass
class BorderProfile:
    """Agreement with centred prediction by distance to the window edge.

    ``agreement[d]``: fraction of pixels at distance ``d`` px (0 = on the edge, along the nearer
    axis) whose window class equals the centred class; ``pixels[d]``: how many were compared.
    """

    agreement: np.ndarray  # (size // 2,) float
    pixels: np.ndarray  # (size // 2,) int
    size: int
    step: int

    def to_json(self) -> dict[str, object]:
        return {
            "window": self.size,
            "centre_step": self.step,
            "agreement_by_distance": [round(float(a), 5) for a in self.agreement],
            "pixels_by_distance": [int(n) for n in self.pixels],
        }


def _probs(
    extractor: object, head: TrainedHead, windows: torch.Tensor, origins: list[tuple[int, int]]
) -> np.ndarray:
    from rsdiff.prediction.scene import window_probabilities

    return window_probabilities(extractor, head, windows, origins=origins).cpu().numpy()


def centred_classes(
    extractor: object, head: TrainedHead, x: torch.Tensor, size: int, step: int, batch: int = 8
) -> tuple[np.ndarray, tuple[int, int]]:
    """Classes of a ``(C, H, W)`` normalised scene where every pixel comes from a window whose centre
    is within ``step / 2`` px of it (windows at stride ``step``, each keeping its central
    ``step x step`` block).

    Returns:
        ``(classes (h, w) int, (row0, col0))``: the covered block and its offset in the scene (the
        outer ``size/2 - step/2`` px of the scene cannot be centred and are left out).
    """
    _, h, w = x.shape
    lo = size // 2 - step // 2
    rows = list(range(0, h - size + 1, step))
    cols = list(range(0, w - size + 1, step))
    out = np.zeros((len(rows) * step, len(cols) * step), np.int64)
    origins = [(r, c) for r in rows for c in cols]
    for i in range(0, len(origins), batch):
        chunk = origins[i : i + batch]
        probs = _probs(
            extractor, head, torch.stack([x[:, r : r + size, c : c + size] for r, c in chunk]), chunk
        )
        for (r, c), p in zip(chunk, probs):
            out[r : r + step, c : c + step] = p[:, lo : lo + step, lo : lo + step].argmax(0)
    return out, (lo, lo)


def border_profile(
    extractor: object,
    head: TrainedHead,
    scenes: list[torch.Tensor],
    size: int,
    step: int = 4,
    windows_per_scene: int = 16,
    seed: int = 0,
) -> BorderProfile:
    """Agreement of window predictions with centred prediction, by distance to the window edge.

    Args:
        extractor, head: what predicts (a :class:`FeatureExtractor` and a feature head, or
            :class:`PixelInputs` and a pixel head).
        scenes: ``(C, H, W)`` normalised scenes, each at least ``2 * size`` px on both sides.
        size: window (px); ``step``: stride of the centred reference (px, divides nothing).
        windows_per_scene: random windows compared per scene (inside the centred block).
    """
    rng = np.random.default_rng(seed)
    half = size // 2
    agree = np.zeros(half, np.int64)
    count = np.zeros(half, np.int64)
    edge = np.arange(size)
    dist_1d = np.minimum(edge, size - 1 - edge)
    dist = np.minimum(dist_1d[:, None], dist_1d[None, :])
    for x in scenes:
        ref, (r0, c0) = centred_classes(extractor, head, x, size, step)
        rh, rw = ref.shape
        if rh < size or rw < size:
            raise ValueError(f"a scene of {tuple(x.shape[1:])} px is too small to compare {size} px windows")
        origins = [(int(rng.integers(0, rh - size + 1)), int(rng.integers(0, rw - size + 1)))
                   for _ in range(windows_per_scene)]  # fmt: skip
        for i in range(0, len(origins), 8):
            chunk = origins[i : i + 8]
            wins = torch.stack([x[:, r0 + r : r0 + r + size, c0 + c : c0 + c + size] for r, c in chunk])
            at = [(r0 + r, c0 + c) for r, c in chunk]
            for (r, c), p in zip(chunk, _probs(extractor, head, wins, at)):
                same = p.argmax(0) == ref[r : r + size, c : c + size]
                agree += np.bincount(dist.ravel(), weights=same.ravel(), minlength=half)[:half].astype(
                    np.int64
                )
                count += np.bincount(dist.ravel(), minlength=half)[:half]
    return BorderProfile(agree / np.maximum(count, 1), count, size, step)


def band_width(profile: BorderProfile, tolerance: float = 0.01) -> int:
    """The degraded band (px): the smallest distance ``d`` from which on the agreement stays within
    ``tolerance`` of its value at the window centre (the last quarter of distances)."""
    a = profile.agreement
    centre = float(np.mean(a[-max(1, len(a) // 4) :]))
    ok = a >= centre - tolerance
    for d in range(len(a)):
        if ok[d:].all():
            return d
    return len(a)
