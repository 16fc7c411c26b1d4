"""The eight symmetries of a square tile (quarter turns, then an optional mirror), one function
for NumPy arrays and torch tensors alike, so training streams and dense heads augment the same way.
Overhead imagery has no "up": every one of them is as plausible as the original.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def dihedral(x: Any, turns: int, flip: bool) -> Any:
    """``x`` (``(..., H, W)``, a NumPy array or a torch tensor) turned by ``turns`` quarter turns in
    its last two axes (counter-clockwise, as ``rot90``), then mirrored left-right when ``flip``.
    NumPy results are views (make them contiguous before handing them to torch)."""
    if isinstance(x, np.ndarray):
        x = np.rot90(x, turns, axes=(-2, -1))
        return x[..., ::-1] if flip else x
    import torch

    x = torch.rot90(x, turns, (-2, -1))
    return x.flip(-1) if flip else x
