"""What a sweep searches and the settings that decide its results: the config schema, its checks,
the seeded draw of trial settings and the digest a re-run must match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from omegaconf import MISSING

from rsdiff import storage
from rsdiff.config import require, to_container
from rsdiff.errors import ConfigError
from rsdiff.features.blocks import BlockNumbering
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.cache import check_numbers as check_table_numbers
from rsdiff.features.table import FeatureTable
from rsdiff.heads.artifact import HeadConfig
from rsdiff.raytools import RayConfig

HEAD_KEYS = ("kind", "width", "depth", "lr", "dropout", "input_noise", "class_weighting")


SWEEP_SPEC = "rsdiff-sweep.json"  # in the experiment folder: the settings that decide its results


RESULT_KEYS = ("search", "head", "num_samples", "scheduler", "grace_period", "reduction_factor", "seed",
               "time_budget_s")  # fmt: skip


@dataclass
class SearchSpace:
    """Choices per dimension; a trial draws one of each. Every list must be non-empty."""

    timesteps: list[list[int]] = field(default_factory=lambda: [[50], [150], [50, 150], [50, 150, 250]])
    blocks: list[list[str]] = field(
        default_factory=lambda: [["up1.res0", "up1.res1"], ["up2.res0", "up2.res1"], ["up1.res1", "up2.res1"]]
    )
    kind: list[str] = field(default_factory=lambda: ["residual"])
    width: list[int] = field(default_factory=lambda: [64, 128])
    depth: list[int] = field(default_factory=lambda: [1, 2])
    lr: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1])
    input_noise: list[float] = field(default_factory=lambda: [0.0, 0.1])
    class_weighting: list[str] = field(default_factory=lambda: ["none", "balanced"])


class Scheduler(Enum):
    asha = "asha"  # asynchronous successive halving on val_miou
    fifo = "fifo"  # run every trial to the end


@dataclass
class SweepTracking:
    uri: str | None = None  # null = MLFLOW_TRACKING_URI or runs/mlflow.db
    experiment: str = "rsdiff-sweep"


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
    num_samples: int = 8
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    time_budget_s: float | None = None
    fresh: bool = False  # delete an existing experiment of this name and start over
    scheduler: Scheduler = Scheduler.asha
    grace_period: int = 2  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    seed: int = 0
    tracking: SweepTracking = field(default_factory=SweepTracking)
    ray: RayConfig = field(default_factory=RayConfig)


def validate(cfg: SweepConfig, table: FeatureTable) -> None:
    """Every choice must exist in the extracted superset; nothing may be empty."""
    space = to_container(cfg.search)
    empty = [k for k, v in space.items() if not v]
    if empty:
        raise ConfigError(f"search space {empty} is empty; give at least one choice for each dimension")
    for ts in space["timesteps"]:
        for bs in space["blocks"]:
            if not ts or not bs:
                raise ConfigError("search.timesteps / search.blocks choices must be non-empty lists")
            table.index.select(ts, bs)  # raises ConfigError listing what exists
    if cfg.num_samples < 1 or cfg.max_concurrent_trials < 1 or cfg.head.epochs < 1:
        raise ConfigError("num_samples, max_concurrent_trials and head.epochs must be >= 1")
    if cfg.grace_period > cfg.head.epochs:
        raise ConfigError(f"grace_period={cfg.grace_period} exceeds head.epochs={cfg.head.epochs}")


def check_numbers(cfg: SweepConfig) -> None:
    """Every numeric setting of the sweep in range, before any trial starts."""
    for value in cfg.search.lr:
        require("search.lr[...]", value, gt=0, le=1)
    for value in cfg.search.dropout:
        require("search.dropout[...]", value, ge=0, lt=1)
    for value in cfg.search.input_noise:
        require("search.input_noise[...]", value, ge=0)
    for key in ("width", "depth"):
        for value in getattr(cfg.search, key):
            require(f"search.{key}[...]", value, ge=1)
    require("head.lr", cfg.head.lr, gt=0, le=1)
    require("head.dropout", cfg.head.dropout, ge=0, lt=1)
    require("head.weight_decay", cfg.head.weight_decay, ge=0)
    for key in ("batch_rows", "patience", "members"):
        require(f"head.{key}", getattr(cfg.head, key), ge=1)
    require("cpus_per_trial", cfg.cpus_per_trial, gt=0)
    require("gpus_per_trial", cfg.gpus_per_trial, ge=0)
    require("reduction_factor", cfg.reduction_factor, ge=2)
    if cfg.time_budget_s is not None:
        require("time_budget_s", cfg.time_budget_s, gt=0)
    check_table_numbers(cfg.table)


def sweep_spec(cfg: SweepConfig, table: FeatureTable) -> dict[str, Any]:
    """The settings that decide a sweep's results, with their SHA-256 digest under ``digest``."""
    plain = to_container(cfg)
    spec: dict[str, Any] = {"features": table.root, **{k: plain[k] for k in RESULT_KEYS}}
    spec["digest"] = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return spec


def check_same_spec(experiment: str, spec: dict[str, Any]) -> None:
    """Refuse to resume the experiment at ``experiment`` with other settings than it started with.

    Raises:
        ConfigError: no spec recorded there, or a different one; the message names the changed
            settings and says to pick a new ``name`` or pass ``fresh=true``.
    """
    where = storage.display(experiment)
    fix = "pick a new name=... or pass fresh=true to delete it and start over"
    try:
        old = json.loads(storage.read_text(storage.join(experiment, SWEEP_SPEC)))
    except (storage.NotFoundError, ValueError):
        raise ConfigError(
            f"{where} holds a Ray Tune experiment without a readable {SWEEP_SPEC} (not started by this "
            f"rsdiff version); {fix}"
        ) from None
    if old.get("digest") == spec["digest"]:
        return
    changed = sorted(k for k in spec if k != "digest" and old.get(k) != spec[k])
    detail = []
    for k in changed:
        if isinstance(spec[k], dict) and isinstance(old.get(k), dict):
            keys = sorted(j for j in {*spec[k], *old[k]} if spec[k].get(j) != old[k].get(j))
            detail += [f"{k}.{j}" for j in keys]
        else:
            detail.append(k)
    raise ConfigError(f"sweep {where} was started with other settings (changed: {', '.join(detail)}); {fix}")


def draw_samples(space: dict[str, list[Any]], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's ``num_samples`` trial settings, one choice per dimension each, drawn from
    ``seed`` (the same list on every run, so a re-run knows which samples are already done)."""
    rng = np.random.default_rng(seed)
    return [{k: v[int(rng.integers(len(v)))] for k, v in space.items()} for _ in range(num_samples)]
