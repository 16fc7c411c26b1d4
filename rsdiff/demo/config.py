"""The demo's config (the few knobs that matter) and what a finished demo returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rsdiff.data.labels import LabelConfig
from rsdiff.ray_config import RayConfig


@dataclass
class DemoConfig:
    """Config of ``jobs/demo.py``: the few knobs that matter; every stage keeps its preset otherwise."""

    data: str | None = None  # folder of image/mask pairs (e.g. dubai-aerial); null = generated sample
    images: list[str] = field(default_factory=lambda: ["*/images/*", "images/*"])  # globs under data
    labels: LabelConfig = field(default_factory=LabelConfig)  # mask template + classes for data
    labels_preset: str | None = None  # an ingest preset whose `labels` to use (configs/ingest/dubai.yaml)
    workdir: str = "runs/demo"
    fresh: bool = False  # delete workdir first
    tile_size: int = 64
    val_fraction: float = 0.17  # of all scenes (the generated sample: 2 of 6)
    test_fraction: float = 0.17  # held out for the final score (the generated sample: 2 of 6)
    test_scenes: list[str] = field(default_factory=list)  # instead: globs of test scene ids (tile_8-*)
    val_scenes: list[str] = field(default_factory=list)  # instead of val_fraction: globs of val scene ids
    pretrain_steps: int = 200
    batch_size: int = 8
    timesteps: list[int] = field(default_factory=lambda: [50, 150, 250])
    pixels_per_class: int = 64
    max_images: int | None = None  # labeled tiles per split to extract features from (null = all)
    trials: int = 4
    head_epochs: int = 8
    # px shared by neighbouring prediction windows; null = predict's default (5/8 of the tile), about
    # 3.5x the windows of 16 px on a 509 x 544 dubai scene (420 against 121)
    predict_overlap: int | None = None
    tracking_uri: str | None = None  # null = MLFLOW_TRACKING_URI or {workdir}/mlflow.db
    experiment: str = "rsdiff-demo"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class DemoResult:
    metrics: dict[str, Any]  # of the test scenes
    stages: dict[str, float]  # seconds per stage
    predictions: list[dict[str, Any]]
    metrics_json: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    run_ids: dict[str, str]
    test_scenes: list[str] = field(default_factory=list)
    data: str = ""  # what the data was (the generated sample says it is synthetic)
    winner: str = ""  # the sweep's winning timesteps, blocks and head, with its val mIoU, in one line
