"""The denoiser: an ADM-family UNet (diffusers' ``UNet2DModel``) built from a config.

Input and output are ``(B, C, H, W)`` images scaled to about [-1, 1]; the output is the predicted
noise epsilon. Attention is placed ADM-style at the feature resolutions listed in
``attention_resolutions`` (in pixels, e.g. ``[32, 16, 8]`` for 256 px inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelConfig:
    """UNet hyperparameters. ``in_channels`` null = the manifest's band count."""

    in_channels: int | None = None
    image_size: int | None = None  # training crop in px; null = the manifest's tile size
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    head_channels: int = 32
    dropout: float = 0.0
    norm_groups: int = 8


def unet_kwargs(cfg: ModelConfig, in_channels: int, image_size: int) -> dict[str, Any]:
    """The ``UNet2DModel`` constructor arguments a model config describes."""
    levels = len(cfg.channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size={image_size} must be divisible by 2^{levels - 1} for {levels} levels")
    channels = [int(cfg.base_channels * m) for m in cfg.channel_mult]
    if any(c % cfg.norm_groups for c in channels):
        raise ValueError(f"channels {channels} must be divisible by norm_groups={cfg.norm_groups}")
    resolutions = [image_size // 2**i for i in range(levels)]
    attn = [r in set(cfg.attention_resolutions) for r in resolutions]
    return {
        "sample_size": image_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": tuple(channels),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "attention_head_dim": cfg.head_channels,
        "norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout,
        "resnet_time_scale_shift": "scale_shift",  # ADM's adaptive group norm
    }


def build_unet(cfg: ModelConfig, in_channels: int, image_size: int) -> torch.nn.Module:
    """A freshly initialised UNet for ``in_channels``-band images of ``image_size`` px."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_kwargs(cfg, in_channels, image_size))


def num_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
