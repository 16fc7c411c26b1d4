"""Streaming per-band statistics (mean, std, min, max) that merge across parallel workers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BandStats:
    """Running count/mean/M2 per band (Chan et al.'s parallel variance), in float64.

    ``update`` takes ``(C, N)`` pixel values; ``merge`` combines the stats of two workers
    exactly as if one had seen all pixels.
    """

    bands: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.bands, np.float64)
        self.mean = np.zeros(self.bands, np.float64)
        self.m2 = np.zeros(self.bands, np.float64)
        self.min = np.full(self.bands, np.inf)
        self.max = np.full(self.bands, -np.inf)

    def update(self, pixels: np.ndarray) -> None:
        """Add ``(C, N)`` valid pixel values."""
        if pixels.shape[1] == 0:
            return
        x = pixels.astype(np.float64)
        n = x.shape[1]
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        self._combine(np.full(self.bands, float(n)), mean, m2)
        self.min = np.minimum(self.min, x.min(axis=1))
        self.max = np.maximum(self.max, x.max(axis=1))

    def merge(self, other: BandStats) -> None:
        """Fold another worker's stats into these."""
        self._combine(other.count, other.mean, other.m2)
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def _combine(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        safe = np.where(n > 0, n, 1.0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / safe
        self.m2 = self.m2 + m2_b + delta**2 * n_a * n_b / safe
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per band."""
        return np.sqrt(self.m2 / np.where(self.count > 0, self.count, 1.0))

    def to_json(self) -> dict[str, list[float | None]]:
        """Plain lists; a statistic of a band with no pixel (infinite min/max) is None."""

        def plain(a: np.ndarray) -> list[float | None]:
            return [float(v) if np.isfinite(v) else None for v in a]

        return {
            "count": self.count.tolist(),
            "mean": plain(self.mean),
            "std": plain(self.std),
            "min": plain(self.min),
            "max": plain(self.max),
        }
