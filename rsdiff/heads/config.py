"""How a head is built and trained, as config: the pixel heads on diffusion features
(:class:`HeadConfig`) and the from-scratch UNet baseline (:class:`ScratchUNetConfig`).

Plain dataclasses without torch, so a job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class ScratchUNetConfig:
    """Size and training of the from-scratch UNet."""

    base_channels: int = 16
    levels: int = 3  # resolutions; input size must be divisible by 2 ** (levels - 1)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    steps: int = 300
    batch_size: int = 8
    eval_every: int = 25  # steps between validation scores
    patience: int = 0  # evaluations without a better val mIoU before stopping (0: run all steps)
    seed: int = 0
