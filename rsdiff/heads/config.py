"""How a head is built and trained, as config: the pixel heads on diffusion features
(:class:`HeadConfig`) and the from-scratch UNet baseline (:class:`ScratchUNetConfig`).

Plain dataclasses without torch, so a job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class HeadKind(Enum):
    residual = "residual"  # rsdiff's residual MLP with channel re-weighting
    ensemble = "ensemble"  # DDPM-Seg's 10-member MLP ensemble


class ClassWeighting(Enum):
    none = "none"
    balanced = "balanced"  # weight_c ~ 1 / frequency_c, normalised to mean 1


@dataclass
class HeadConfig:
    """Head architecture and training."""

    kind: HeadKind = HeadKind.residual
    width: int = 256
    depth: int = 2
    dropout: float = 0.1
    gate: bool = True
    members: int = 10  # ensemble only
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_rows: int = 2048
    patience: int = 4  # epochs without a better val mIoU before stopping
    input_noise: float = 0.0  # std of Gaussian noise added to standardised features while training
    class_weighting: ClassWeighting = ClassWeighting.none
    seed: int = 0


class LRSchedule(Enum):
    constant = "constant"
    cosine = "cosine"  # linear warm-up over the first 5% of steps, then cosine decay to 0


@dataclass
class DenseTrainConfig:
    """Training of a network on dense masks (the scratch UNet, the denoiser as a segmenter)."""

    lr: float = 2e-3
    weight_decay: float = 1e-4
    lr_schedule: LRSchedule = LRSchedule.constant
    steps: int = 300
    batch_size: int = 8
    eval_every: int = 25  # steps between validation scores
    patience: int = 0  # evaluations without a better val mIoU before stopping (0: run all steps)
    class_weighting: ClassWeighting = ClassWeighting.none  # balanced: from the training masks' pixels
    seed: int = 0


@dataclass
class ScratchUNetConfig(DenseTrainConfig):
    """Size and training of the from-scratch UNet."""

    base_channels: int = 16
    levels: int = 3  # resolutions; input size must be divisible by 2 ** (levels - 1)


class Readout(Enum):
    output = "output"  # the UNet's output convolution made classes-wide; every layer trains
    decoder = "decoder"  # a light convolutional decoder over frozen decoder-block activations


@dataclass
class SegmenterConfig(DenseTrainConfig):
    """The pretrained denoiser as a segmenter (or the same network from random initialisation).

    The UNet reads the clean image at a fixed small ``timestep`` (its timestep embedding); with
    ``readout=output`` it is fine-tuned whole, the denoiser's own layers at ``lr *
    backbone_lr_scale`` and the new output layer at ``lr`` (discriminative learning rates); with
    ``readout=decoder`` it stays frozen and only the decoder over ``blocks`` trains.
    """

    readout: Readout = Readout.output
    pretrained: bool = True  # false: the identical network from random initialisation
    timestep: int = 10
    backbone_lr_scale: float = 0.1  # readout=output: the denoiser's layers learn at lr * this
    blocks: list[str] = field(default_factory=list)  # readout=decoder; empty: every decoder res block
    width: int = 64  # readout=decoder: channels of the decoder
    lr: float = 1e-3
