"""What a sweep searches and the settings that decide its results: the config schema, its checks,
the seeded draw of trial settings and the digest a re-run must match."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.config import check_ranges, to_container
from rsdiff.errors import ConfigError
from rsdiff.features.table import FeatureTable
from rsdiff.sweep.config import SearchMode, SweepConfig

HEAD_KEYS = ("kind", "width", "depth", "lr", "dropout", "input_noise", "class_weighting")


SWEEP_SPEC = "rsdiff-sweep.json"  # in the experiment folder: the settings that decide its results


RESULT_KEYS = ("search", "head", "num_samples", "scheduler", "grace_period", "reduction_factor", "seed",
               "time_budget_s")  # fmt: skip


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
    combinations = int(np.prod([len(v) for v in space.values()]))
    if cfg.search_mode is SearchMode.grid and combinations > cfg.num_samples:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in space.items() if len(v) > 1) or "1"
        raise ConfigError(
            f"search_mode=grid has {combinations} combinations ({sizes}) but num_samples={cfg.num_samples}; "
            f"raise num_samples to {combinations} or give fewer choices"
        )
    if cfg.grace_period > cfg.head.epochs:
        raise ConfigError(f"grace_period={cfg.grace_period} exceeds head.epochs={cfg.head.epochs}")


def check_numbers(cfg: SweepConfig) -> None:
    """Every numeric setting of the sweep in range (declared with the config fields, the head's
    and the table cache's included), before any trial starts."""
    check_ranges(cfg)


def sweep_spec(cfg: SweepConfig, table: FeatureTable) -> dict[str, Any]:
    """The settings that decide a sweep's results, with their SHA-256 digest under ``digest``."""
    plain = to_container(cfg)
    spec: dict[str, Any] = {"features": table.root, **{k: plain[k] for k in RESULT_KEYS}}
    if cfg.search_mode is not SearchMode.random:  # absent for random, as in sweeps recorded before grids
        spec["search_mode"] = cfg.search_mode.value
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
            f"{where} holds a sweep's trial records without a readable {SWEEP_SPEC} (not started by this "
            f"rsdiff version, or damaged); {fix}"
        ) from None
    if old.get("digest") == spec["digest"]:
        return
    changed = sorted(k for k in {*spec, *old} if k != "digest" and old.get(k) != spec.get(k))
    detail = []
    for k in changed:
        if isinstance(spec.get(k), dict) and isinstance(old.get(k), dict):
            keys = sorted(j for j in {*spec[k], *old[k]} if spec[k].get(j) != old[k].get(j))
            detail += [f"{k}.{j}" for j in keys]
        else:
            detail.append(k)
    raise ConfigError(f"sweep {where} was started with other settings (changed: {', '.join(detail)}); {fix}")


def trial_settings(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The sweep's trial settings, one choice per search dimension each: ``num_samples`` drawn from
    ``seed`` (``search_mode=random``), or every combination once in a fixed order (``grid``)."""
    space = to_container(cfg.search)
    if cfg.search_mode is SearchMode.grid:
        return grid_samples(space)
    return draw_samples(space, int(cfg.num_samples), int(cfg.seed))


def grid_samples(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of one choice per dimension, the last dimension varying fastest."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


def draw_samples(space: dict[str, list[Any]], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's ``num_samples`` trial settings, one choice per dimension each, drawn from
    ``seed`` (the same list on every run, so a re-run knows which samples are already done)."""
    rng = np.random.default_rng(seed)
    return [{k: v[int(rng.integers(len(v)))] for k, v in space.items()} for _ in range(num_samples)]


def trial_name(choice: dict[str, Any]) -> str:
    """A trial's MLflow run name, from what it tried: ``t50-150 · up1.res0+up1.res1 · w128 d2 lr1e-3``
    (``ens`` for DDPM-Seg's ensemble, whose width and depth are fixed)."""
    steps = "-".join(str(t) for t in sorted(choice["timesteps"]))
    blocks = "+".join(str(b) for b in choice["blocks"])
    head = "ens" if choice["kind"] == "ensemble" else f"w{choice['width']} d{choice['depth']}"
    return f"t{steps} · {blocks} · {head} lr{float(choice['lr']):.0e}".replace("e-0", "e-")


def choice_params(choice: dict[str, Any]) -> dict[str, str]:
    """A trial's choices as MLflow params that read plainly in the compare view: lists as
    ``50,150`` and ``up1.res0,up1.res1`` (no brackets or quotes), the head settings as they are,
    and numbers to sort and plot by (``t_min``, ``t_max``, ``deepest_level``) with a short
    ``block_set`` id (the compare view cuts long values)."""
    return {
        "timesteps": ",".join(str(t) for t in sorted(choice["timesteps"])),
        "blocks": ",".join(str(b) for b in choice["blocks"]),
        **{k: str(choice[k]) for k in HEAD_KEYS},
        "t_min": str(min(choice["timesteps"])),
        "t_max": str(max(choice["timesteps"])),
        "deepest_level": str(deepest_level(choice["blocks"])),
        "block_set": block_set_id(choice["blocks"]),
    }


def _level_unit(block: str) -> tuple[int, str]:
    """``up1.res0`` -> ``(1, "0")``, ``up1.upsample`` -> ``(1, "U")``, ``mid`` -> ``(-1, "")``."""
    if block == "mid":
        return -1, ""
    level, _, unit = block.partition(".")
    return int(level[2:]), "U" if unit == "upsample" else unit[3:]


def deepest_level(blocks: list[str]) -> int:
    """The deepest decoder level the blocks read (0 = the coarsest level, -1 = the bottleneck)."""
    return min(_level_unit(b)[0] for b in blocks)


def block_set_id(blocks: list[str]) -> str:
    """A short id of a block set, by level: ``up1.res0,up1.res1,up2.res0`` -> ``u1:01+u2:0``
    (``mid`` -> ``mid``, an upsampler -> ``U``)."""
    units: dict[int, list[str]] = {}
    for b in blocks:
        level, unit = _level_unit(b)
        units.setdefault(level, []).append(unit)
    return "+".join(
        "mid" if level < 0 else f"u{level}:{''.join(sorted(u))}" for level, u in sorted(units.items())
    )


def head_params(cfg: SweepConfig) -> dict[str, str]:
    """The head settings the trials use, as the sweep's parent run records them: a searched setting
    shows its choices (``searched: 64 | 128``) instead of ``head.<key>``'s unused default."""
    space = to_container(cfg.search)
    out = {}
    for key in HEAD_KEYS:
        choices = space[key]
        out[f"head.{key}"] = (
            str(choices[0]) if len(choices) == 1 else "searched: " + " | ".join(map(str, choices))
        )
    return out
