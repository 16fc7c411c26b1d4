"""Band normalisation: source units -> the model's [-1, 1] range, from the manifest's band stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Normalizer:
    """``x -> clip((x - mean) / (scale * std), -1, 1)`` per band.

    With ``scale=2`` about 95% of a band's values map inside [-1, 1] untouched; the rest are
    clipped, as image DDPMs clip to the pixel range. ``mean``/``std`` are per band, source units.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 2.0

    @classmethod
    def from_stats(cls, band_stats: dict[str, list[float]], scale: float) -> Normalizer:
        std = tuple(max(float(s), 1e-6) for s in band_stats["std"])
        return cls(tuple(float(m) for m in band_stats["mean"]), std, float(scale))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Normalizer:
        """The inverse of :meth:`to_json` (``{"mean": [...], "std": [...], "scale": s}``)."""
        return cls(tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"]),
                   float(data.get("scale", 2.0)))  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(C, H, W)`` source dtype -> ``(C, H, W)`` float32 in [-1, 1]."""
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return np.clip((x.astype(np.float32) - mean) / (self.scale * std), -1.0, 1.0)

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        """The same for a ``(B, C, H, W)`` tensor in source units."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return ((x.float() - mean) / (self.scale * std)).clamp(-1, 1)

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}
