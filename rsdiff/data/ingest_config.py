"""``jobs/ingest.py``'s config: which scenes, how they are cut into tiles, split and labelled.

A plain dataclass without Ray or rasterio, so the job's ``--help`` and ``--print-config`` answer at
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.data.labels import LabelConfig
from rsdiff.ray_config import RayConfig


@dataclass
class IngestConfig:
    """Config of ``jobs/ingest.py``."""

    inputs: list[str] = MISSING  # globs, folders, files or s3:// prefixes of scenes
    output: str = "runs/shards"  # local folder or s3://bucket/prefix
    tile_size: int = bounded(256, ge=8)
    stride: int | None = None  # default: tile_size (no overlap)
    bands: list[int] | None = bounded(None, ge=1)  # 1-based band indexes to keep; default all
    band_names: list[str] | None = None
    max_nodata_fraction: float = bounded(0.1, ge=0, le=1)  # tiles with more nodata are dropped and counted
    shard_max_mb: float = bounded(256.0, gt=0)
    # Scene-level splits. `test` is never read by pretraining, extraction or sweeps (their default
    # splits are train and val): it is scored once, at the end (jobs/label_efficiency.py).
    val_fraction: float = bounded(0.0, ge=0, lt=1)  # fraction of all scenes held out as the val split
    test_fraction: float = bounded(0.0, ge=0, lt=1)  # fraction of all scenes held out as the test split
    # Explicit splits instead of fractions: globs matched against scene ids (tile_8-images-*) or
    # image paths, e.g. whole dubai tiles, whose neighbouring images are correlated.
    val_scenes: list[str] = field(default_factory=list)
    test_scenes: list[str] = field(default_factory=list)
    split_seed: int = 0
    parallelism: int = bounded(0, ge=0)  # number of Ray tasks; 0 = 2 x cluster CPUs (at most one per scene)
    overwrite: bool = False
    labels: LabelConfig = field(default_factory=LabelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
