"""Stable names for the UNet's feature blocks.

Names follow the decoder (DDPM-Seg reads decoder blocks): ``mid`` is the bottleneck and
``up{i}.res{j}`` the output of unit ``j`` (res block, plus its attention where the level has
attention) of decoder level ``i``, counted from the coarsest level. ``list_blocks`` gives them
in forward order; configs may use names or indexes into that list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rsdiff.errors import ConfigError


def block_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{name: module}`` in forward order; a module's forward output is the block's activation."""
    out: dict[str, torch.nn.Module] = {"mid": model.mid_block}
    for i, up in enumerate(model.up_blocks):
        attentions = getattr(up, "attentions", None)
        for j, res in enumerate(up.resnets):
            out[f"up{i}.res{j}"] = attentions[j] if attentions is not None else res
    return out


def list_blocks(model: torch.nn.Module) -> list[str]:
    """Block names in forward order (``mid``, ``up0.res0``, ...)."""
    return list(block_modules(model))


def resolve_blocks(model: torch.nn.Module, blocks: Sequence[str | int]) -> list[str]:
    """Names for ``blocks`` given as names or indexes into :func:`list_blocks`, in forward order.

    Raises:
        ConfigError: an unknown name or an index out of range; the message lists the valid names.
    """
    names = list_blocks(model)
    out = []
    for b in blocks:
        if isinstance(b, int) or (isinstance(b, str) and b.lstrip("-").isdigit()):
            k = int(b)
            if not 0 <= k < len(names):
                raise ConfigError(f"block index {k} is out of range; valid: 0..{len(names) - 1} = {names}")
            out.append(names[k])
        elif b in names:
            out.append(str(b))
        else:
            raise ConfigError(f"unknown block {b!r}; valid blocks: {names}")
    if not out:
        raise ConfigError(f"no blocks selected; valid blocks: {names}")
    return sorted(set(out), key=names.index)


@torch.no_grad()
def block_channels(model: torch.nn.Module, in_channels: int, size: int) -> dict[str, tuple[int, int]]:
    """``{name: (channels, resolution_px)}`` from one dry forward pass at ``size`` px."""
    shapes: dict[str, tuple[int, int]] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, _shape(o)))
        for n, m in block_modules(model).items()
    ]
    try:
        p = next(model.parameters())
        x = torch.zeros(1, in_channels, size, size, device=p.device, dtype=p.dtype)
        model(x, torch.zeros(1, device=p.device, dtype=torch.long))  # timestep on the model's device
    finally:
        for h in handles:
            h.remove()
    return shapes


def _shape(output: object) -> tuple[int, int]:
    t = output[0] if isinstance(output, tuple) else output
    return int(t.shape[1]), int(t.shape[-1])
