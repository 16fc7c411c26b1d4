"""Band adaptation: a checkpoint trained on one band set (e.g. RGB) used on imagery with another.

Only the first convolution (``conv_in``, which reads the bands) and the last (``conv_out``, which
predicts one noise channel per band, twice for ``learn_sigma`` models) depend on the band count.
A **band map** has one entry per band of the new imagery:

- an integer ``i``: the band takes source band ``i``'s weights, unchanged (input filters of
  ``conv_in``, output filters and bias of ``conv_out``);
- ``mean``: the mean of the source bands' weights; in ``conv_in`` scaled by ``new_band_scale``
  (1.0 = a new band contributes like an average source band; 0 = it starts ignored);
- ``zero``: zero weights (the band is ignored on input, its noise predicted as 0 at first).

The default map follows band **names** where both sides have them (an rsdiff checkpoint records
its bands; public ADM and diffusers pixel models are RGB; imagery bands are named from their
descriptions or colour interpretation, Sentinel-2's ``B02``..``B08`` understood): each imagery band
takes the source band of its name, a band the source lacks takes ``mean``; RGB weights on
blue-green-red-NIR imagery map as ``[2, 1, 0, mean]``. A map that names cannot settle (two imagery
bands of one name, or no name in common) is refused; give ``band_map``. Where a side has no names
(``band_1``, ...), the map is positional: the shared bands in order, extra bands ``mean`` (RGB ->
4 bands: ``[0, 1, 2, mean]``); fewer bands than the source then need an explicit map.
Whatever the map, bands mapped to a source band by index keep that band's output on an input
whose extra bands are 0: the new input filters see zeros, and the output filters are copies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from rsdiff.errors import ConfigError

MEAN, ZERO = "mean", "zero"
RGB = ["red", "green", "blue"]
# other spellings of a band's name (lower case); Sentinel-2's 10 m bands by their band ids
ALIASES = {
    "r": "red", "g": "green", "b": "blue", "grey": "gray", "near_infrared": "nir", "near-infrared": "nir",
    "infrared": "nir", "b2": "blue", "b02": "blue", "b3": "green", "b03": "green", "b4": "red",
    "b04": "red", "b8": "nir", "b08": "nir",
}  # fmt: skip
_UNNAMED = re.compile(r"(band)?[_ ]?\d+")  # band_1, band 2, 3: a position, not a name


def canonical_names(names: Sequence[str] | None, count: int) -> list[str] | None:
    """``names`` lower-cased with :data:`ALIASES` applied, or None where they say nothing (absent,
    the wrong count, or any of them a bare position such as ``band_1``)."""
    if not names or len(names) != count:
        return None
    out = [ALIASES.get(str(n).strip().lower(), str(n).strip().lower()) for n in names]
    return None if any(_UNNAMED.fullmatch(n) for n in out) else out


def band_rule(
    source_bands: int,
    bands: int,
    band_map: Sequence[str | int] | None,
    source_names: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[int | str]:
    """The band map to apply: ``band_map`` checked, or the default by name or position (see the
    module doc).

    Raises:
        ConfigError: a map of the wrong length, an entry out of range or unknown; names that do
            not settle the map; fewer bands than the source without names or a map.
    """
    theirs, ours = canonical_names(source_names, source_bands), canonical_names(names, bands)
    if band_map is None and theirs and ours:
        return _by_name(theirs, ours, list(names or []))
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


def _by_name(theirs: list[str], ours: list[str], given: list[str]) -> list[int | str]:
    """Each imagery band the source band of its name, else ``mean``."""
    if len(set(ours)) < len(ours):
        twice = sorted({g for g, o in zip(given, ours) if ours.count(o) > 1})
        raise ConfigError(
            f"the imagery bands {twice} name the same band; give init.band_map with one entry per band "
            f"(a source band index 0..{len(theirs) - 1} of {theirs}, mean or zero)"
        )
    rule: list[int | str] = [theirs.index(o) if o in theirs else MEAN for o in ours]
    if all(r == MEAN for r in rule):
        raise ConfigError(
            f"no imagery band {given} is named like a band of the checkpoint {theirs}: give init.band_map "
            f"with one entry per band (a source band index 0..{len(theirs) - 1}, mean or zero)"
        )
    return rule


def describe(rule: Sequence[int | str], source_names: Sequence[str] | None, names: Sequence[str]) -> str:
    """``red<-red(0), nir<-mean``: the map in words, for the log."""

    def source(entry: int | str) -> str:
        if isinstance(entry, int) and source_names and len(source_names) > entry:
            return f"{source_names[entry]}({entry})"
        return str(entry)

    return ", ".join(f"{n}<-{source(r)}" for n, r in zip(names, rule))


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
