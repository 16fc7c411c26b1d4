"""A per-rank GPU memory estimate for DDPM training, computed on PyTorch's ``meta`` device.

Nothing is allocated: the UNet is built on ``meta`` and run forward once, with gradients, on a
``meta`` batch, counting the elements of every tensor autograd saves for the backward pass (each
tensor once, however many operations save it; activation checkpointing included, since the blocks
it covers save nothing but run again). The estimate is

    params x 20 bytes  (fp32 weights, gradients, two AdamW moments, EMA copy)
  + saved elements x 3.7 bytes

The 3.7 bytes per saved element is measured, not assumed: eager bf16 autocast keeps most of what
the backward pass needs in fp32 (GroupNorm runs in fp32 under autocast, and the SiLU after it too),
only the convolution and attention inputs in bf16. On one H200 the ``adm256`` preset at batch 32
peaked at 71.3 GiB (``tests/benchmarks/results/gpu-h200-2026-11-26.json``, eager, bf16,
channels_last) against 19.96 G saved elements here: (71.3 - 1.9 GiB of weights and optimiser)
/ 19.96 G = 3.7 bytes. A compiled step saves less (the compiler recomputes cheap pointwise
operations instead of keeping them), so for ``perf.compile`` this is an upper bound. Left out: the
CUDA context (~0.5 GiB), NCCL buffers and allocator fragmentation, so keep some headroom above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.unet import build_unet, checkpoint_activations, num_params

BYTES_PER_PARAM = 20  # weights + grads + AdamW exp_avg + exp_avg_sq + EMA, all fp32
BYTES_PER_SAVED_ELEMENT = 3.7  # eager bf16 autocast, measured (module docstring)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training rank needs, by part."""

    params: int
    static_bytes: int
    activation_bytes: int
    saved_elements: int  # what autograd keeps for the backward pass of one micro-batch

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def estimate_training_memory(
    model_cfg: ModelConfig,
    in_channels: int,
    image_size: int,
    batch_size: int,
    checkpoint_levels: list[int] | None = None,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` for one rank training ``model_cfg`` on ``(batch_size, in_channels,
    image_size, image_size)`` batches (one micro-batch: gradient accumulation does not add to it),
    with activation checkpointing at ``checkpoint_levels`` (see ``perf.checkpoint_levels``)."""
    with torch.device("meta"):  # built without allocating or initialising weights
        model = build_unet(model_cfg, in_channels, image_size)
    checkpoint_activations(model, list(checkpoint_levels or []))
    saved = saved_elements(model, batch_size, in_channels, image_size)
    params = num_params(model)
    return MemoryEstimate(params, params * BYTES_PER_PARAM, int(saved * BYTES_PER_SAVED_ELEMENT), saved)


def saved_elements(model: torch.nn.Module, batch_size: int, in_channels: int, image_size: int) -> int:
    """Elements of the tensors autograd saves in one training forward of a ``meta`` ``model`` on a
    ``(batch_size, in_channels, image_size, image_size)`` batch; parameters are not counted."""
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}  # base tensor id -> base tensor (held, so ids stay unique)

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            kept[id(base)] = base
        return t

    x = torch.zeros(batch_size, in_channels, image_size, image_size, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x, t)
    return sum(b.numel() for b in kept.values())
