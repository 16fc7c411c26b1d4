"""``jobs/sweep.py``'s config: the search space, the scheduler and where trials and results go.

Plain dataclasses without torch or Ray, so the job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.config import BlockNumbering
from rsdiff.heads.config import HeadConfig
from rsdiff.ray_config import RayConfig


@dataclass
class SearchSpace:
    """Choices per dimension; a trial draws one of each. Every list must be non-empty."""

    timesteps: list[list[int]] = field(default_factory=lambda: [[50], [150], [50, 150], [50, 150, 250]])
    blocks: list[list[str]] = field(
        default_factory=lambda: [["up1.res0", "up1.res1"], ["up2.res0", "up2.res1"], ["up1.res1", "up2.res1"]]
    )
    kind: list[str] = field(default_factory=lambda: ["residual"])
    width: list[int] = bounded(factory=lambda: [64, 128], ge=1)
    depth: list[int] = bounded(factory=lambda: [1, 2], ge=1)
    lr: list[float] = bounded(factory=lambda: [3e-4, 1e-3, 3e-3], gt=0, le=1)
    dropout: list[float] = bounded(factory=lambda: [0.0, 0.1], ge=0, lt=1)
    input_noise: list[float] = bounded(factory=lambda: [0.0, 0.1], ge=0)
    class_weighting: list[str] = field(default_factory=lambda: ["none", "balanced"])


class SearchMode(Enum):
    random = "random"  # num_samples settings drawn from seed, one choice per dimension each
    grid = "grid"  # every combination of the choices, once each; num_samples caps how many


class Scheduler(Enum):
    asha = "asha"  # asynchronous successive halving on val_miou
    fifo = "fifo"  # run every trial to the end


@dataclass
class SweepTracking:
    """MLflow: ``uri`` null = ``MLFLOW_TRACKING_URI`` or ``runs/mlflow.db``; one parent run per sweep."""

    uri: str | None = None  # null = MLFLOW_TRACKING_URI or runs/mlflow.db
    experiment: str = "rsdiff-sweep"
    parent_run_id: str | None = None  # nest the sweep's run under another (the demo's run does)


@dataclass
class SweepConfig:
    """Config of ``jobs/sweep.py``."""

    features: str = MISSING  # feature table from jobs/extract.py
    output: str = "runs/sweeps/sweep-tiny"  # best head + summary
    name: str = "sweep-tiny"  # Tune experiment name; the same name resumes
    storage: str = "runs/tune"
    search: SearchSpace = field(default_factory=SearchSpace)
    # integers in search.blocks: ddpm_seg = guided-diffusion's output_blocks numbers (DDPM-Seg's configs)
    block_numbering: BlockNumbering = BlockNumbering.rsdiff
    head: HeadConfig = field(default_factory=HeadConfig)  # fixed settings; epochs = max per trial
    table: TableCacheConfig = field(default_factory=TableCacheConfig)  # how trials read the table
    search_mode: SearchMode = SearchMode.random
    num_samples: int = bounded(8, ge=1)  # random: trials drawn; grid: the most combinations allowed
    max_concurrent_trials: int = bounded(2, ge=1)
    reuse_trial_processes: bool = True  # a finished trial's process runs the next (false: one per trial)
    cpus_per_trial: float = bounded(1.0, gt=0)
    gpus_per_trial: float = bounded(0.0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)
    fresh: bool = False  # delete an existing experiment of this name and start over
    scheduler: Scheduler = Scheduler.asha
    grace_period: int = 2  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = bounded(2, ge=2)
    seed: int = 0
    tracking: SweepTracking = field(default_factory=SweepTracking)
    ray: RayConfig = field(default_factory=RayConfig)
