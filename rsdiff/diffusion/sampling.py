"""Sampling from a trained denoiser: DDIM samples and denoising strips (pictures: rsdiff.viz)."""

from __future__ import annotations

from typing import Any

import torch

from rsdiff.diffusion.unet import epsilon


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module, scheduler: Any, shape: tuple[int, ...], steps: int, seed: int
) -> torch.Tensor:
    """Draw ``shape = (B, C, H, W)`` samples with ``steps`` deterministic DDIM steps, in [-1, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    for t in ddim.timesteps:
        eps = epsilon(model(x, t.to(device).expand(shape[0])).sample, shape[1])
        x = ddim.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def denoise_strip(
    model: torch.nn.Module, scheduler: Any, x0: torch.Tensor, timesteps: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one image ``x0 (C, H, W)``: noisy ``x_t`` and the model's one-step ``x0`` estimate per t.

    Returns two ``(len(timesteps), C, H, W)`` tensors.
    """
    device = next(model.parameters()).device
    t = torch.tensor(timesteps, device=device)
    x0 = x0.to(device).unsqueeze(0).expand(len(timesteps), *x0.shape)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    xt = scheduler.add_noise(x0, noise, t)
    eps = epsilon(model(xt, t).sample, xt.shape[1])
    abar = scheduler.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    x0_hat = ((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    return xt.clamp(-1, 1), x0_hat
