"""The pretrained denoiser as a segmenter: the two ways beyond a per-pixel MLP to make pretraining
pay (the clean test of it is the same network from random initialisation, trained the same way).

- ``readout=output`` (fine-tuning): the denoiser's UNet with its output convolution replaced by a
  ``classes``-wide one; every layer trains, the pretrained ones at a lower learning rate.
- ``readout=decoder`` (a dense decoder on frozen features): the frozen UNet's decoder-block
  activations, upsampled to the input size and concatenated (as the feature heads see them, but
  every pixel and its neighbours), through a light convolutional decoder.

Either way the UNet reads the clean image with the timestep embedding of a fixed small ``t``
(at small ``t`` the noise a denoiser expects is a few percent of the signal; a clean input keeps
prediction deterministic and windows independent of their place in the scene).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsdiff.features.blocks import block_channels, block_modules, list_blocks, resolve_blocks
from rsdiff.heads.config import Readout, SegmenterConfig

TIMESTEP_SCALE = "timestep_scale"  # rsdiff's key beside the diffusers config of a saved segmenter


class DenoiserSegmenter(nn.Module):
    """``(B, C_in, H, W)`` normalised pixels -> ``(B, classes, H, W)`` logits.

    Args:
        unet: a diffusers ``UNet2DModel`` (pretrained or freshly initialised); taken over.
        num_classes: output classes.
        cfg: readout, timestep, blocks and decoder width.
    """

    def __init__(self, unet: nn.Module, num_classes: int, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.readout = Readout(cfg.readout)
        self.unet = unet
        self.register_buffer("timestep", torch.tensor([int(cfg.timestep)]), persistent=False)
        if self.readout is Readout.output:
            conv = unet.conv_out
            unet.conv_out = nn.Conv2d(conv.in_channels, num_classes, 3, padding=1)
            self.blocks: list[str] = []
            return
        self.blocks = resolve_blocks(unet, list(cfg.blocks) or _decoder_res_blocks(unet))
        for p in unet.parameters():
            p.requires_grad_(False)
        modules = block_modules(unet, upsamplers=True)
        self._acts: dict[str, torch.Tensor] = {}
        for name in self.blocks:
            modules[name].register_forward_hook(self._keep(name))
        shapes = block_channels(unet, int(unet.config.in_channels), int(unet.config.sample_size or 64))
        dim = sum(shapes[name][0] for name in self.blocks)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, cfg.width, 1, bias=False),
            nn.BatchNorm2d(cfg.width),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.width, cfg.width, 3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.width),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.width, num_classes, 1),
        )

    def _keep(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._acts[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def train(self, mode: bool = True) -> DenoiserSegmenter:
        super().train(mode)
        if self.readout is Readout.decoder:
            self.unet.eval()  # frozen: its normalisation and dropout stay in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.timestep.expand(x.shape[0])
        if self.readout is Readout.output:
            return self.unet(x, t).sample
        self._acts.clear()
        with torch.no_grad():
            self.unet(x, t)
        size = x.shape[-2:]
        feats = [
            F.interpolate(self._acts[n].float(), size=size, mode="bilinear", align_corners=False)
            for n in self.blocks
        ]
        self._acts.clear()
        return self.decoder(torch.cat(feats, 1))

    def param_groups(self, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
        """Optimiser groups: the new layers at ``lr``, the denoiser's own at ``lr * backbone_lr_scale``
        (``readout=output``); only the decoder for ``readout=decoder``."""
        if self.readout is Readout.decoder:
            return [{"params": list(self.decoder.parameters()), "lr": lr}]
        head = list(self.unet.conv_out.parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in self.unet.parameters() if id(p) not in ids]
        return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]


def _decoder_res_blocks(unet: nn.Module) -> list[str]:
    return [name for name in list_blocks(unet) if name.startswith("up")]


def build_segmenter(unet: nn.Module, num_classes: int, cfg: SegmenterConfig) -> DenoiserSegmenter:
    """A segmenter over a copy of ``unet`` (the loaded denoiser, left untouched); with
    ``cfg.pretrained`` false the copy's weights are drawn afresh (the same architecture from random
    initialisation, seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    net = copy.deepcopy(unet).float()
    if cfg.pretrained:
        for p in net.parameters():
            p.requires_grad_(True)
    else:
        from diffusers import UNet2DModel

        from rsdiff.diffusion.unet import finish_unet, timestep_scale_of

        net = finish_unet(UNet2DModel.from_config(net.config), timestep_scale_of(unet))
    net.train()
    return DenoiserSegmenter(net, num_classes, cfg)


def segmenter_from_config(
    unet_config: dict[str, Any], num_classes: int, cfg: SegmenterConfig
) -> DenoiserSegmenter:
    """An untrained segmenter of the architecture a saved head records (``unet_config``: the
    denoiser's diffusers config, plus rsdiff's ``timestep_scale`` where it is not 1), for loading
    its weights; only layouts rsdiff builds are accepted.

    Raises:
        ValueError: a config rsdiff's UNet cannot express.
    """
    from rsdiff.diffusion.unet import build_unet, model_config_from_diffusers

    unet_config = dict(unet_config)
    scale = float(unet_config.pop(TIMESTEP_SCALE, 1.0))
    model_cfg, in_channels = model_config_from_diffusers(unet_config)
    model_cfg.timestep_scale = scale
    unet = build_unet(model_cfg, in_channels, int(unet_config.get("sample_size") or 64))
    return DenoiserSegmenter(unet, num_classes, cfg)


def unet_config_of(segmenter: DenoiserSegmenter) -> dict[str, Any]:
    """The JSON-ready diffusers config of the segmenter's UNet (without its output layer's change),
    with ``timestep_scale`` where the denoiser scales its timesteps."""
    from rsdiff.diffusion.unet import timestep_scale_of

    config = {k: v for k, v in dict(segmenter.unet.config).items() if not k.startswith("_")}
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    scale = timestep_scale_of(segmenter.unet)
    return out | ({TIMESTEP_SCALE: scale} if scale != 1.0 else {})
