"""How a head is built and trained, as config: the pixel heads on diffusion features
(:class:`HeadConfig`) and the from-scratch UNet baseline (:class:`ScratchUNetConfig`).

Plain dataclasses without torch, so a job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rsdiff.config import bounded


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
    width: int = bounded(256, ge=1)
    depth: int = bounded(2, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)
    gate: bool = True
    members: int = bounded(10, ge=1)  # ensemble only
    lr: float = bounded(1e-3, gt=0, le=1)
    weight_decay: float = bounded(1e-4, ge=0)
    epochs: int = bounded(20, ge=1)
    batch_rows: int = bounded(2048, ge=1)
    patience: int = bounded(4, ge=0)  # epochs without a better val mIoU before stopping (0: run every epoch)
    # std of Gaussian noise added to standardised features while training
    input_noise: float = bounded(0.0, ge=0)
    class_weighting: ClassWeighting = ClassWeighting.none
    seed: int = 0


class LRSchedule(Enum):
    constant = "constant"
    cosine = "cosine"  # linear warm-up over the first 5% of steps, then cosine decay to 0


@dataclass
class DenseTrainConfig:
    """Training of a network on dense masks (the scratch UNet, the denoiser as a segmenter)."""

    lr: float = bounded(2e-3, gt=0)
    weight_decay: float = bounded(1e-4, ge=0)
    lr_schedule: LRSchedule = LRSchedule.constant
    steps: int = bounded(300, ge=1)
    batch_size: int = bounded(8, ge=1)
    eval_every: int = bounded(25, ge=1)  # steps between validation scores
    # evaluations without a better val mIoU before stopping (0: run all steps)
    patience: int = bounded(0, ge=0)
    class_weighting: ClassWeighting = ClassWeighting.none  # balanced: from the training masks' pixels
    seed: int = 0


@dataclass
class ScratchUNetConfig(DenseTrainConfig):
    """Size and training of the from-scratch UNet."""

    base_channels: int = bounded(16, ge=1)
    levels: int = bounded(3, ge=1)  # resolutions; input size must be divisible by 2 ** (levels - 1)


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
    timestep: int = bounded(10, ge=0)
    backbone_lr_scale: float = bounded(0.1, ge=0)  # readout=output: the denoiser's layers learn at lr * this
    blocks: list[str] = field(default_factory=list)  # readout=decoder; empty: every decoder res block
    width: int = bounded(64, ge=1)  # readout=decoder: channels of the decoder
    lr: float = bounded(1e-3, gt=0)
