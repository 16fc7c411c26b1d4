"""Stable names for the UNet's feature blocks, and DDPM-Seg's numbering of them.

Names follow the decoder (DDPM-Seg reads decoder blocks): ``mid`` is the bottleneck and
``up{i}.res{j}`` the output of unit ``j`` (res block, plus its attention where the level has
attention) of decoder level ``i``, counted from the coarsest level; ``up{i}.upsample`` is the
output of level ``i``'s upsampler (every level but the last has one). ``list_blocks`` gives the
``mid``/``res`` names in forward order; configs may use names or indexes into that list.

**DDPM-Seg numbering** (``block_numbering: ddpm_seg``): an integer ``k`` is guided-diffusion's
``output_blocks[k]``, as in DDPM-Seg's configs (``blocks: [5, 6, 7, 8, 12]``). With ``n`` res
blocks per level, ``output_blocks[k]`` is decoder level ``k // (n + 1)``, unit ``k % (n + 1)``;
the last unit of a level that upsamples ends with its upsampler, so there ``k`` is
``up{i}.upsample`` (at twice the resolution), elsewhere ``up{i}.res{j}``. rsdiff's UNet is laid out
as ADM's, so the numbering holds for converted checkpoints and rsdiff's own models alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rsdiff.errors import ConfigError
from rsdiff.features.config import BlockNumbering


def block_modules(model: torch.nn.Module, upsamplers: bool = False) -> dict[str, torch.nn.Module]:
    """``{name: module}`` in forward order; a module's forward output is the block's activation.
    With ``upsamplers``, each level's ``up{i}.upsample`` follows its last unit."""
    out: dict[str, torch.nn.Module] = {"mid": model.mid_block}
    for i, up in enumerate(model.up_blocks):
        attentions = getattr(up, "attentions", None)
        for j, res in enumerate(up.resnets):
            out[f"up{i}.res{j}"] = attentions[j] if attentions is not None else res
        if upsamplers and getattr(up, "upsamplers", None):
            out[f"up{i}.upsample"] = up.upsamplers[0]
    return out


def list_blocks(model: torch.nn.Module) -> list[str]:
    """Block names in forward order (``mid``, ``up0.res0``, ...), upsamplers left out."""
    return list(block_modules(model))


def ddpm_seg_blocks(model: torch.nn.Module) -> dict[int, str]:
    """``{k: name}``: the block that is guided-diffusion's ``output_blocks[k]``."""
    out: dict[int, str] = {}
    k = 0
    for i, up in enumerate(model.up_blocks):
        units = len(up.resnets)
        for j in range(units):
            last = j == units - 1 and getattr(up, "upsamplers", None)
            out[k] = f"up{i}.upsample" if last else f"up{i}.res{j}"
            k += 1
    return out


def resolve_blocks(
    model: torch.nn.Module,
    blocks: Sequence[str | int],
    numbering: BlockNumbering | str = BlockNumbering.rsdiff,
) -> list[str]:
    """Names for ``blocks`` given as names or integers (see :class:`BlockNumbering`), in forward order.

    Raises:
        ConfigError: an unknown name or an integer out of range; the message lists the valid ones.
    """
    numbering = BlockNumbering(numbering)
    order = list(block_modules(model, upsamplers=True))
    names = list_blocks(model)
    ddpm_seg = ddpm_seg_blocks(model)
    out = []
    for b in blocks:
        if isinstance(b, int) or (isinstance(b, str) and b.lstrip("-").isdigit()):
            k = int(b)
            if numbering is BlockNumbering.ddpm_seg:
                if k not in ddpm_seg:
                    raise ConfigError(
                        f"DDPM-Seg block {k} does not exist: this model has output_blocks "
                        f"0..{len(ddpm_seg) - 1} "
                        f"= {list(ddpm_seg.values())}"
                    )
                out.append(ddpm_seg[k])
            elif not 0 <= k < len(names):
                raise ConfigError(
                    f"block index {k} is out of range; valid: 0..{len(names) - 1} = {names} "
                    "(for DDPM-Seg's output_blocks numbers set block_numbering=ddpm_seg)"
                )
            else:
                out.append(names[k])
        elif b in order:
            out.append(str(b))
        else:
            raise ConfigError(f"unknown block {b!r}; valid blocks: {order}")
    if not out:
        raise ConfigError(f"no blocks selected; valid blocks: {names}")
    return sorted(set(out), key=order.index)


@torch.no_grad()
def block_channels(model: torch.nn.Module, in_channels: int, size: int) -> dict[str, tuple[int, int]]:
    """``{name: (channels, resolution_px)}`` from one dry forward pass at ``size`` px."""
    shapes: dict[str, tuple[int, int]] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, _shape(o)))
        for n, m in block_modules(model, upsamplers=True).items()
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
