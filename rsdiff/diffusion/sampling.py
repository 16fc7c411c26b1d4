"""Sampling from a trained denoiser and pictures of it: DDIM sample grids, denoising strips."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
        eps = model(x, t.to(device).expand(shape[0])).sample
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
    eps = model(xt, t).sample
    abar = scheduler.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    x0_hat = ((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    return xt.clamp(-1, 1), x0_hat


def to_rgb(x: torch.Tensor, rgb_bands: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 display images (first three bands)."""
    x = x.float().cpu()
    x = x[:, list(rgb_bands)] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(B, H, W, 3)`` uint8 images into one ``(rows*(H+pad), cols*(W+pad), 3)`` picture."""
    b, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return out
