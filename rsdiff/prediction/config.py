"""``jobs/predict.py``'s config, and the uncertainty measures prediction and suggestion compute.

Plain dataclasses without torch or Ray, so the job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.ray_config import RayConfig
from rsdiff.tracking import StageTracking

# Window defaults, from the measurements in the README ("Window borders"; tests/benchmarks/
# bench_window_border.py): with each window's diffusion noise tiled over the scene, the plain linear
# ramp at an overlap of 5/8 window scored within 0.1 mIoU points of centred prediction on dubai and
# above it on the generated sample (half a window: 0.4-0.6 points below there), with about a
# seventh of its windows. A near-zero weight on a border band (``border``) did not help on either,
# so it is off by default.
DEFAULT_BORDER_FRACTION = 0.0
DEFAULT_OVERLAP_FRACTION = 5 / 8


class Measure(Enum):
    entropy = "entropy"  # of the mean class distribution
    mutual_information = "mutual_information"  # members' disagreement (ensemble or MC dropout)


@dataclass
class PredictTracking(StageTracking):
    """MLflow (see :class:`StageTracking`), plus how many quicklooks to log."""

    experiment: str = "rsdiff-predict"
    quicklooks: int = 8  # quicklook PNGs logged as artifacts (the first N scenes)


@dataclass
class PredictConfig:
    """Config of ``jobs/predict.py``."""

    head: str = MISSING  # a head artifact (e.g. the sweep's {output}/best); it names its checkpoint
    inputs: list[str] = MISSING  # scenes: globs, folders, files or s3:// prefixes (GeoTIFF, JPG, PNG)
    output: str = "runs/predictions"
    window: int | None = None  # px; default: the checkpoint's training tile size
    overlap: int | None = None  # px shared by neighbouring windows; default 5/8 of the window
    border: int | None = None  # px at each window edge given almost no weight; default 0 (plain ramp)
    batch_size: int = bounded(4, ge=1)  # windows per UNet pass
    probabilities: bool = False  # also write {scene}.proba.tif (uint8, 255 = 1.0)
    uncertainty: bool = False  # also write {scene}.uncertainty.tif (float32 nats: entropy[, mutual info])
    mc_samples: int = bounded(
        0, ge=0
    )  # residual head: dropout samples for mutual information (0 = entropy only)
    quicklook: bool = True
    quicklook_size: int = bounded(1024, ge=16)  # px, longest side
    overwrite: bool = False
    cpus_per_scene: float = bounded(1.0, gt=0)
    num_gpus: float = bounded(0.0, ge=0)  # per scene task (1 on GPU clusters)
    precision: str = "auto"  # UNet inference: auto (bf16 on CUDA where supported) | fp32 | bf16
    region: list[int] | None = None  # [row, col, height, width] px of every scene to predict; null = all
    tracking: PredictTracking = field(default_factory=PredictTracking)
    ray: RayConfig = field(default_factory=RayConfig)
