"""A per-rank GPU memory estimate for DDPM training, computed on PyTorch's ``meta`` device.

Nothing is allocated: the UNet is built on ``meta`` and run forward once on a ``meta`` batch,
with hooks summing the outputs of its leaf modules (what autograd keeps for the backward pass,
to first order). The estimate is

    params x 20 bytes  (fp32 weights, gradients, two AdamW moments, EMA copy)
  + leaf-module outputs x 2 bytes  (bf16 autocast activations)

and leaves out the CUDA context, allocator slack, NCCL buffers and attention workspace, so treat
it as a floor: a GPU should have some headroom above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.unet import build_unet, num_params

BYTES_PER_PARAM = 20  # weights + grads + AdamW exp_avg + exp_avg_sq + EMA, all fp32
BYTES_PER_ACTIVATION = 2  # bf16 autocast


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training rank needs, by part."""

    params: int
    static_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def estimate_training_memory(
    model_cfg: ModelConfig, in_channels: int, image_size: int, batch_size: int
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` for one rank training ``model_cfg`` on ``(batch_size, in_channels,
    image_size, image_size)`` batches (one micro-batch: gradient accumulation does not add to it)."""
    with torch.device("meta"):  # built without allocating or initialising weights
        model = build_unet(model_cfg, in_channels, image_size)
    outputs = [0]

    def count(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and next(module.children(), None) is None:
            outputs[0] += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            x = torch.zeros(batch_size, in_channels, image_size, image_size, device="meta")
            model(x, torch.zeros(batch_size, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    params = num_params(model)
    return MemoryEstimate(params, params * BYTES_PER_PARAM, outputs[0] * BYTES_PER_ACTIVATION)
