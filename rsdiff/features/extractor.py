"""Multi-timestep, multi-block features of a frozen DDPM (DDPM-Seg's representation).

For each selected timestep ``t``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with
``noise`` fixed by a seed (the same noise for every image; a window of a larger scene gets that
noise tiled over the scene, see :func:`window_noise`), one UNet pass that stops after the
deepest selected block, and the blocks' activations read by forward hooks. Activations are
bilinearly upsampled to the input resolution and concatenated in :class:`ChannelIndex` order
(timestep-major, blocks in forward order). ``sample`` reads the upsampled values only at given
pixels (``grid_sample`` with the same bilinear rule as ``F.interpolate``), so the full
``(D, H, W)`` volume is never built for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rsdiff.devices import Precision, autocast, autocast_dtype, tf32, tf32_allowed
from rsdiff.diffusion.checkpoint import PretrainedDDPM
from rsdiff.diffusion.schedule import fixed_noise
from rsdiff.errors import ConfigError
from rsdiff.features.blocks import block_channels, block_modules, ddpm_seg_blocks, resolve_blocks
from rsdiff.features.config import BlockNumbering
from rsdiff.features.index import ChannelIndex


def window_noise(noise: torch.Tensor, origins: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The fixed ``(C, S, S)`` noise tiled over a scene and cut at each window's ``(row, col)``
    origin (px): ``(B, C, S, S)``, where scene pixel ``(y, x)`` always gets ``noise[:, y % S, x % S]``.

    So every window that covers a pixel perturbs it with the same noise, and a pixel's features
    differ between windows only by what the UNet sees around it; windows on the ``S`` px grid (the
    ingest tiles the features were trained on) get ``noise`` itself.
    """
    h, w = int(noise.shape[-2]), int(noise.shape[-1])
    return torch.stack([torch.roll(noise, (-int(r) % h, -int(c) % w), dims=(-2, -1)) for r, c in origins])


class _Stop(Exception):
    """Raised by the deepest selected block's hook to end the forward pass early."""


class FeatureExtractor:
    """Frozen-UNet features for ``(B, C, H, W)`` inputs already normalised to [-1, 1].

    Args:
        ddpm: a loaded checkpoint (EMA weights, frozen).
        timesteps: diffusion steps ``0 <= t < T``.
        blocks: block names or integers (see :mod:`rsdiff.features.blocks`).
        noise_seed: seed of the fixed noise shared by every image.
        precision: ``auto`` (bf16 autocast on CUDA where supported), ``fp32`` (IEEE fp32: TF32
            off for the pass) or ``bf16``; activations are returned as float32 either way.
        numbering: what integers in ``blocks`` mean (rsdiff's indexes or DDPM-Seg's output_blocks).
    """

    def __init__(
        self,
        ddpm: PretrainedDDPM,
        timesteps: Sequence[int],
        blocks: Sequence[str | int],
        noise_seed: int = 0,
        precision: Precision | str = Precision.auto,
        numbering: BlockNumbering | str = BlockNumbering.rsdiff,
    ) -> None:
        self.ddpm = ddpm
        self.model = ddpm.model
        T = int(ddpm.scheduler.config.num_train_timesteps)
        bad = [t for t in timesteps if not 0 <= int(t) < T]
        if bad or not timesteps:
            raise ConfigError(f"timesteps {list(timesteps)}: each must be in [0, {T - 1}] (and at least one)")
        self.timesteps = sorted({int(t) for t in timesteps})
        self.blocks = resolve_blocks(self.model, blocks, numbering)
        self.noise_seed = noise_seed
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.tf32 = tf32_allowed(precision)
        self.in_channels = int(ddpm.meta["in_channels"])
        shapes = block_channels(self.model, self.in_channels, int(ddpm.meta["image_size"]))
        ddpm_seg = {name: k for k, name in ddpm_seg_blocks(self.model).items()}
        self.index = ChannelIndex.build(
            self.timesteps, self.blocks, {b: shapes[b][0] for b in self.blocks}, ddpm_seg
        )
        self._modules = block_modules(self.model, upsamplers=True)
        self._noise: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def dim(self) -> int:
        """Feature vector length D."""
        return self.index.dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _fixed_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if shape not in self._noise:
            self._noise[shape] = fixed_noise(shape, self.noise_seed, self.device)
        return self._noise[shape]

    @torch.no_grad()
    def activations(
        self, x: torch.Tensor, origins: Sequence[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """Raw activations in index order: one ``(B, c, h, w)`` tensor per (timestep, block).

        ``origins``: each window's ``(row, col)`` px in its scene, to noise it consistently with
        its neighbours (:func:`window_noise`); None: every input gets the fixed noise as it is.
        """
        x = x.to(self.device, torch.float32)
        noise = self._fixed_noise(tuple(x.shape[1:]))
        if origins is None:
            noise = noise.expand_as(x)
        elif len(origins) != x.shape[0]:
            raise ValueError(f"{len(origins)} origins for {x.shape[0]} windows")
        else:
            noise = window_noise(noise, origins)
        deepest = self.blocks[-1]
        out: list[torch.Tensor] = []
        for t in self.timesteps:
            tt = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
            xt = self.ddpm.scheduler.add_noise(x, noise, tt)
            found: dict[str, torch.Tensor] = {}

            def hook(_m, _i, output, name, found=found):
                found[name] = (output[0] if isinstance(output, tuple) else output).float()
                if name == deepest:
                    raise _Stop

            handles = [
                self._modules[b].register_forward_hook(lambda m, i, o, n=b: hook(m, i, o, n))
                for b in self.blocks
            ]
            try:
                with tf32(self.tf32), autocast(self.device, self.amp_dtype):
                    self.model(xt, tt)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            out += [found[b] for b in self.blocks]
        return out

    @torch.no_grad()
    def dense(
        self,
        x: torch.Tensor,
        size: tuple[int, int] | None = None,
        origins: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """``(B, D, H, W)`` features upsampled (bilinear) to ``size`` (default: the input's);
        ``origins`` as in :meth:`activations`."""
        size = size or (int(x.shape[-2]), int(x.shape[-1]))
        acts = self.activations(x, origins)
        return torch.cat([F.interpolate(a, size=size, mode="bilinear", align_corners=False) for a in acts], 1)

    @torch.no_grad()
    def dense_rows(
        self, acts: list[torch.Tensor], size: tuple[int, int], start: int, stop: int
    ) -> torch.Tensor:
        """Rows ``start:stop`` of ``dense`` from precomputed ``activations``: ``(B, D, stop - start, W)``.

        Equal to ``dense(x, size)[:, :, start:stop]`` (the same bilinear rule, via ``grid_sample``)
        without building the full ``(B, D, H, W)`` volume, so prediction memory is bounded by the
        chunk, not the window.
        """
        h, w = size
        rows = torch.arange(start, stop, device=self.device, dtype=torch.float32)
        cols = torch.arange(w, device=self.device, dtype=torch.float32)
        gy, gx = torch.meshgrid((2 * rows + 1) / h - 1, (2 * cols + 1) / w - 1, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        return torch.cat(
            [
                F.grid_sample(
                    a,
                    grid.expand(a.shape[0], -1, -1, -1),
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=False,
                )
                for a in acts
            ],
            1,
        )

    @torch.no_grad()
    def sample(
        self, x: torch.Tensor, rows: list[torch.Tensor], cols: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Features at chosen pixels: for image ``b``, ``(N_b, D)`` at ``(rows[b], cols[b])``.

        Values equal ``dense(x)[b, :, rows, cols]`` (same bilinear rule), without building it.
        """
        h, w = int(x.shape[-2]), int(x.shape[-1])
        acts = self.activations(x)
        out = []
        for b in range(x.shape[0]):
            r = rows[b].to(self.device, torch.float32)
            c = cols[b].to(self.device, torch.float32)
            grid = torch.stack([(2 * c + 1) / w - 1, (2 * r + 1) / h - 1], -1).view(1, 1, -1, 2)
            parts = [
                F.grid_sample(a[b : b + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
                for a in acts
            ]
            out.append(torch.cat(parts, 1)[0, :, 0].T.contiguous())
        return out
