"""Ranking candidate tiles for labeling: most uncertain first, kept apart in space and appearance.

Greedy selection over candidates sorted by score (descending): a candidate is taken unless

- its centre lies within ``min_distance`` px of a tile already taken *in the same scene*, or
- the cosine similarity of its descriptor (mean projected features, see
  :class:`~rsdiff.prediction.uncertainty.PixelOutputs`) to an already taken tile's exceeds
  ``max_similarity`` (so the list is not ten views of one confusing roof type).

When these rules leave fewer than ``budget`` tiles, the rest are filled by score with the
similarity rule dropped (the distance rule kept), and those picks are marked ``relaxed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """A tile that may be suggested: scene id, pixel window, score, descriptor."""

    scene: str
    row: int
    col: int
    height: int
    width: int
    score: float
    descriptor: np.ndarray  # (P,), may be empty

    @property
    def centre(self) -> tuple[float, float]:
        return self.row + self.height / 2, self.col + self.width / 2


@dataclass(frozen=True)
class Pick:
    rank: int  # 1 = label first
    candidate: Candidate
    relaxed: bool  # taken after the similarity rule was dropped


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def rank_tiles(
    candidates: Sequence[Candidate],
    budget: int,
    min_distance: float = 0.0,
    max_similarity: float | None = None,
) -> list[Pick]:
    """The ``budget`` tiles to label next, best first (fewer when there are fewer candidates).

    Args:
        candidates: scored tiles (NaN scores are never picked).
        budget: how many tiles to return (>= 1).
        min_distance: px between centres of two picks of one scene (0: no rule).
        max_similarity: cosine similarity of descriptors above which a candidate is skipped
            (None or >= 1: no rule).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    order = sorted(
        (c for c in candidates if np.isfinite(c.score)),
        key=lambda c: (-c.score, c.scene, c.row, c.col),
    )
    picks: list[Pick] = []
    taken: set[int] = set()
    units: list[np.ndarray] = []
    use_similarity = max_similarity is not None and max_similarity < 1

    def far_enough(c: Candidate) -> bool:
        if min_distance <= 0:
            return True
        cy, cx = c.centre
        for p in picks:
            if p.candidate.scene == c.scene:
                py, px = p.candidate.centre
                if (cy - py) ** 2 + (cx - px) ** 2 < min_distance**2:
                    return False
        return True

    for relaxed in (False, True):
        for i, c in enumerate(order):
            if len(picks) == budget:
                return picks
            if i in taken or not far_enough(c):
                continue
            if use_similarity and not relaxed and c.descriptor.size and units:
                u = _unit(c.descriptor)
                if max(float(u @ v) for v in units) > max_similarity:  # type: ignore[operator]
                    continue
            taken.add(i)
            picks.append(Pick(len(picks) + 1, c, relaxed))
            if c.descriptor.size:
                units.append(_unit(c.descriptor))
        if not use_similarity:
            break
    return picks
