"""Noise schedules and the forward process q(x_t | x_0), via diffusers' schedulers."""

from __future__ import annotations

from typing import Any

import torch

from rsdiff.diffusion.config import BetaSchedule, DiffusionConfig


def make_scheduler(cfg: DiffusionConfig) -> Any:
    """A ``DDPMScheduler`` for the config: epsilon prediction. ``clip_sample=True`` acts only when
    sampling (each step's ``x0`` estimate is clipped to the data range [-1, 1]; DDIM sampling
    inherits it); training and feature extraction only noise (``add_noise``), which never clips."""
    from diffusers import DDPMScheduler

    linear = BetaSchedule(cfg.schedule) is BetaSchedule.linear
    ends = {}
    if linear and cfg.beta_start is not None:
        ends["beta_start"] = float(cfg.beta_start)
    if linear and cfg.beta_end is not None:
        ends["beta_end"] = float(cfg.beta_end)
    return DDPMScheduler(
        num_train_timesteps=int(cfg.timesteps),
        beta_schedule="linear" if linear else "squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        **ends,
    )


def fixed_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise fixed by ``seed`` (same on every machine: drawn on the CPU)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen).to(device)
