"""Band adaptation: a checkpoint trained on one band set (e.g. RGB) used on imagery with another.

Only the first convolution (``conv_in``, which reads the bands) and the last (``conv_out``, which
predicts one noise channel per band, twice for ``learn_sigma`` models) depend on the band count.
A **band map** has one entry per band of the new imagery:

- an integer ``i``: the band takes source band ``i``'s weights, unchanged (input filters of
  ``conv_in``, output filters and bias of ``conv_out``);
- ``mean``: the mean of the source bands' weights; in ``conv_in`` scaled by ``new_band_scale``
  (1.0 = a new band contributes like an average source band; 0 = it starts ignored);
- ``zero``: zero weights (the band is ignored on input, its noise predicted as 0 at first).

The default map keeps the shared bands in order and gives extra bands ``mean``: for RGB -> RGBN,
``[0, 1, 2, mean]``. Fewer bands than the source need an explicit map (``[mean]`` for one band).
Whatever the map, bands mapped to a source band by index keep that band's output on an input
whose extra bands are 0: the new input filters see zeros, and the output filters are copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rsdiff.errors import ConfigError

MEAN, ZERO = "mean", "zero"


def band_rule(source_bands: int, bands: int, band_map: Sequence[str | int] | None) -> list[int | str]:
    """The band map to apply: ``band_map`` checked, or the default (see the module doc).

    Raises:
        ConfigError: a map of the wrong length, an entry out of range or unknown, or fewer bands
            than the source without a map.
    """
    if band_map is None:
        if bands >= source_bands:
            return [*range(source_bands), *([MEAN] * (bands - source_bands))]
        raise ConfigError(
            f"the checkpoint reads {source_bands} bands but the imagery has {bands}: give band_map with one "
            f"entry per band (a source band index 0..{source_bands - 1}, mean or zero), e.g. "
            f"band_map=[{', '.join(['0'] * bands) if bands < 4 else '...'}] or [mean]"
        )
    rule: list[int | str] = []
    for entry in band_map:
        text = str(entry).strip().lower()
        if text.lstrip("-").isdigit():
            k = int(text)
            if not 0 <= k < source_bands:
                raise ConfigError(
                    f"band_map entry {k} is out of range: the checkpoint has bands 0..{source_bands - 1}"
                )
            rule.append(k)
        elif text in (MEAN, ZERO):
            rule.append(text)
        else:
            raise ConfigError(f"band_map entry {entry!r} must be a source band index, mean or zero")
    if len(rule) != bands:
        raise ConfigError(
            f"band_map has {len(rule)} entries but the imagery has {bands} bands: give one per band"
        )
    return rule


def _pick(weight: torch.Tensor, dim: int, rule: Sequence[int | str], scale: float) -> torch.Tensor:
    """``weight`` with its ``dim`` (source bands) rebuilt per ``rule``."""
    parts = []
    for entry in rule:
        if isinstance(entry, int):
            parts.append(weight.narrow(dim, entry, 1))
        elif entry == MEAN:
            parts.append(weight.mean(dim, keepdim=True) * scale)
        else:
            parts.append(torch.zeros_like(weight.narrow(dim, 0, 1)))
    return torch.cat(parts, dim)


def adapt_bands(
    state: dict[str, torch.Tensor],
    source_bands: int,
    rule: Sequence[int | str],
    new_band_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A copy of the diffusers-layout ``state`` whose ``conv_in``/``conv_out`` read and predict the
    bands of ``rule`` (:func:`band_rule`) instead of ``source_bands`` bands. ``conv_in.weight`` is
    ``(C0, bands, 3, 3)``; ``conv_out.weight`` is ``(k * bands, C0, 3, 3)`` with k = 1, or 2 for
    ``learn_sigma`` (epsilon rows, then variance rows, each mapped alike)."""
    if list(rule) == list(range(source_bands)):
        return dict(state)
    out = dict(state)
    out["conv_in.weight"] = _pick(state["conv_in.weight"], 1, rule, new_band_scale)
    halves = state["conv_out.weight"].shape[0] // source_bands
    for key in ("conv_out.weight", "conv_out.bias"):
        chunks = state[key].split(source_bands, 0)
        out[key] = torch.cat([_pick(c, 0, rule, 1.0) for c in chunks[:halves]], 0)
    return out
