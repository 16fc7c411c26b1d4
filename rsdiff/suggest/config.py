"""``jobs/suggest.py``'s config: which scenes are candidates, how tiles are scored and ranked.

Plain dataclasses without torch or Ray, so the job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.prediction.config import Measure
from rsdiff.ray_config import RayConfig
from rsdiff.tracking import StageTracking


class Aggregate(Enum):
    mean = "mean"  # mean of the measure over the tile's valid pixels
    quantile = "quantile"  # the `quantile` of it (a small confusing patch counts)


@dataclass
class SuggestConfig:
    """Config of ``jobs/suggest.py``."""

    head: str = MISSING  # a head artifact (e.g. the sweep's {output}/best); it names its checkpoint
    inputs: list[str] = MISSING  # candidate scenes: globs, folders, files or s3:// prefixes
    masks: str | None = (
        None  # mask template, e.g. '{dir}/../masks/{stem}.png': scenes with a mask are labeled
    )
    labeled: list[str] = field(default_factory=list)  # labeled scenes: ingest outputs or image globs/files
    output: str = "runs/suggestions"
    budget: int = bounded(20, ge=1)  # tiles to suggest
    tile: int = bounded(256, ge=8)  # px, side of a candidate tile
    measure: Measure | None = None  # null: mutual_information where the head has members, else entropy
    aggregate: Aggregate = Aggregate.mean
    quantile: float = bounded(0.9, gt=0, le=1)  # with aggregate=quantile
    min_valid: float = bounded(
        0.5, gt=0, le=1
    )  # least fraction of valid (not nodata) pixels of a candidate tile
    min_distance: int | None = bounded(None, ge=0)  # px between centres of picks in one scene; null: 2 x tile
    max_similarity: float | None = bounded(
        0.9, ge=-1, le=1
    )  # cosine similarity of tile descriptors; null: no feature rule
    mc_samples: int = bounded(0, ge=0)  # residual head: dropout samples for mutual information
    sheet: int = bounded(24, ge=0)  # tiles shown in contact_sheet.png
    window: int | None = None  # px; default: the checkpoint's training tile size
    overlap: int | None = None  # px; default 5/8 of the window (see jobs/predict.py)
    border: int | None = None  # px; default 0 (see jobs/predict.py)
    batch_size: int = bounded(4, ge=1)
    precision: str = "auto"
    cpus_per_scene: float = bounded(1.0, gt=0)
    num_gpus: float = bounded(0.0, ge=0)
    overwrite: bool = False
    tracking: StageTracking = field(default_factory=lambda: StageTracking(experiment="rsdiff-suggest"))
    ray: RayConfig = field(default_factory=RayConfig)
