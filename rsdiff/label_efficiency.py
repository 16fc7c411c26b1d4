"""``jobs/label_efficiency.py``: test-scene mIoU vs number of labeled scenes, DDPM features vs scratch.

For each ``k`` in ``ks`` and each of ``draws`` seeded draws of ``k`` labeled training scenes (or,
with ``unit=tiles``, ``k`` training tiles) from the feature table's ``train`` split, the same draw
for every method:

- ``residual``: rsdiff's residual MLP head on the frozen DDPM features (the selected timesteps,
  blocks and head settings, by default those of the sweep's best head: chosen on val);
- ``ensemble``: DDPM-Seg's 10-member MLP ensemble on the same features;
- ``scratch_unet``: a UNet trained from scratch on the **dense** masks of the same tiles, with
  flips/rotations, its best weights kept by mIoU on the validation scenes.

The heads learn from the table's sampled pixels of those tiles and stop early on the table's
``val`` rows; nothing looks at the test scenes until every model is trained. Then each model
predicts the **whole test scenes** (the ingest's ``test`` split) through ``jobs/predict.py``'s
sliding-window path and is scored by ``jobs/evaluate.py`` against their masks. Output under
``output``: ``results.json`` (every run: what was drawn, its scenes and tile count, test mIoU,
per-class IoU, per-scene scores, val mIoU, parameters, seconds), ``table.md`` (mean ± std test
mIoU per method and k, and per-class IoU), ``label_efficiency.png`` (test mIoU vs k with std
bands), the heads under ``heads/`` and the maps under ``predictions/``; all logged to one MLflow
run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from omegaconf import MISSING

from rsdiff import storage
from rsdiff.config import build, redact, require, to_container
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.errors import ConfigError, DataError
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.cache import check_numbers as check_table_numbers
from rsdiff.heads.config import HeadConfig, HeadKind, ScratchUNetConfig
from rsdiff.ray_config import RayConfig
from rsdiff.tracking import StageTracking

log = logging.getLogger(__name__)
METHODS = ("residual", "ensemble", "scratch_unet")


class CountUnit(Enum):
    scenes = "scenes"  # k labeled scenes (images with a mask), all their tiles
    tiles = "tiles"  # k training tiles (tile_size px each), drawn from any scene


@dataclass
class LabelEfficiencyConfig:
    """Config of ``jobs/label_efficiency.py``."""

    features: str = MISSING  # a feature table (jobs/extract.py output) with train and val rows
    selection: str | None = None  # a head artifact (e.g. the sweep's best) whose timesteps/blocks/head to use
    timesteps: list[int] = field(default_factory=list)  # without `selection`: empty = all in the table
    blocks: list[str] = field(default_factory=list)
    unit: CountUnit = CountUnit.scenes  # what k counts
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])
    draws: int = 3
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    test_split: str = "test"  # the ingest split whose whole scenes are predicted and scored
    input_noise: float = 0.1
    head: HeadConfig = field(default_factory=HeadConfig)  # residual head (overridden by `selection`'s)
    ensemble: HeadConfig = field(default_factory=lambda: HeadConfig(kind=HeadKind.ensemble))
    unet: ScratchUNetConfig = field(default_factory=lambda: ScratchUNetConfig(patience=4))
    # [row, col, height, width] px of every test scene to predict and score (a CPU budget); null: all
    test_region: list[int] | None = None
    window: int | None = None  # prediction windows (see jobs/predict.py); default: the tile size
    overlap: int | None = None  # default: jobs/predict.py's
    table: TableCacheConfig = field(default_factory=TableCacheConfig)  # how the draws read the table
    output: str = "runs/label_efficiency"
    tracking: StageTracking = field(
        default_factory=lambda: StageTracking(experiment="rsdiff-label-efficiency")
    )
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class LabelEfficiencyResult:
    rows: list[dict[str, Any]]  # one per (method, k, draw)
    table: str
    output: str
    mlflow_run_id: str | None


def draw_units(pool: list[str], k: int, draw: int, seed: int) -> list[str]:
    """``k`` distinct members of ``pool`` for draw ``draw`` (reproducible, independent of method).

    Draws ``0..draw`` of one ``(seed, k)`` are different subsets while ``pool`` has that many:
    independent draws of 1 scene in 9 repeat a scene in a third of 3-draw runs, which would
    understate the spread over draws. Once every subset was drawn, subsets repeat.
    """
    members = sorted(pool)
    total = math.comb(len(members), k)
    rng = np.random.default_rng([seed, k])
    drawn: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(drawn) <= draw:
        subset = sorted(rng.choice(members, size=k, replace=False).tolist())
        if tuple(subset) not in seen or len(seen) == total:
            seen.add(tuple(subset))
            drawn.append(subset)
    return drawn[draw]


def scene_of(tile_key: str) -> str:
    """The scene id of a shard sample key ``<scene>/<row>_<col>``."""
    return tile_key.split("/", 1)[0]


def _table_images(table: Any, split: str) -> list[str]:
    """Image (tile) keys with sampled rows in ``split`` of the table."""
    keys: set[str] = set()
    for part in table.parts(split):
        keys.update(str(i) for i in np.unique(table.part(part["name"])["image"]))
    return sorted(keys)


def _dense_tiles(shards: str, keys: set[str], normalizer: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``key -> (normalised (C, H, W) float32 tile, (H, W) uint8 labels)`` of the given samples."""
    from rsdiff.data.manifest import read_manifest
    from rsdiff.data.shards import iter_shard

    out = {}
    for uri in read_manifest(shards).shard_uris():
        for s in iter_shard(uri):
            if s.key in keys and s.label is not None:
                out[s.key] = (normalizer(s.image), np.asarray(s.label, np.uint8))
    missing = keys - out.keys()
    if missing:
        raise DataError(
            f"{len(missing)} labeled tile(s) of the feature table are not in its shards "
            f"{storage.display(shards)}: {sorted(missing)[:3]}"
        )
    return out


@dataclass
class _TestScenes:
    """The whole scenes every model is scored on, and how their masks read."""

    ids: list[str]
    images: list[str]
    labels: Any  # LabelConfig


def _test_scenes(shards: str, split: str) -> _TestScenes:
    """The ingest's ``split`` scenes with their image/mask files and label config.

    Raises:
        DataError: no such split, or a manifest from before scene files were recorded.
    """
    from rsdiff.data.labels import LabelConfig
    from rsdiff.data.manifest import read_manifest

    manifest = read_manifest(shards)
    ids = manifest.scenes.get(split, [])
    if not ids:
        raise DataError(
            f"the shards {storage.display(shards)} have no {split!r} split (they have "
            f"{sorted(manifest.scenes)}): re-ingest with test_fraction=... or test_scenes=[...] so "
            "some scenes are held out for the final score"
        )
    if not manifest.labels or any(i not in manifest.scene_files for i in ids):
        raise DataError(
            f"the manifest of {storage.display(shards)} does not record its scenes' files and label config "
            "(an older ingest); re-run jobs/ingest.py"
        )
    return _TestScenes(
        ids, [manifest.scene_files[i]["image"] for i in ids], build(LabelConfig, manifest.labels)
    )


def _check(cfg: LabelEfficiencyConfig) -> None:
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown or not cfg.methods:
        raise ConfigError(f"methods={list(cfg.methods)}: choose among {list(METHODS)}")
    require("draws", cfg.draws, ge=1)
    require("input_noise", cfg.input_noise, ge=0)
    check_table_numbers(cfg.table)


def run_label_efficiency(cfg: LabelEfficiencyConfig) -> LabelEfficiencyResult:
    """Train every (k, draw, method), predict and score the test scenes, write the report.

    Raises:
        RsdiffError: missing table/val rows/test split, k larger than the pool, bad selection.
    """
    import torch

    from rsdiff import tracking
    from rsdiff.features.table import FeatureTable
    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.train.checkpoint import load_pretrained

    _check(cfg)
    table = FeatureTable.open(str(cfg.features)).cached(cfg.table)
    if not table.parts("val"):
        raise DataError(f"feature table {storage.display(table.root)} has no val rows to select on")
    shards = str(table.meta["shards"])
    test = _test_scenes(shards, cfg.test_split)
    head_cfg = cfg.head
    if cfg.selection:
        sel = TrainedHead.load(str(cfg.selection))
        timesteps, blocks = sel.timesteps, sel.blocks
        head_cfg = build(HeadConfig, sel.config, {"kind": "residual"})
    else:
        timesteps = list(cfg.timesteps) or table.index.timesteps
        blocks = list(cfg.blocks) or table.index.blocks
    table.index.select(list(timesteps), list(blocks))  # validates the selection
    if cfg.tracking.enabled:
        tracking.client(tracking.resolve_uri(cfg.tracking.uri))  # a bad store fails before the work
    unit = CountUnit(cfg.unit)
    train_tiles = _table_images(table, "train")
    val_tiles = _table_images(table, "val")
    pool = sorted({scene_of(t) for t in train_tiles}) if unit is CountUnit.scenes else train_tiles
    ks = sorted({int(k) for k in cfg.ks})
    if not ks or ks[0] < 1 or ks[-1] > len(pool):
        raise ConfigError(f"ks={ks} must be in [1, {len(pool)}] (the table's labeled train {unit.value})")
    leaked = sorted({scene_of(t) for t in train_tiles + val_tiles} & set(test.ids))
    if leaked:
        raise DataError(
            f"test scenes {leaked[:5]} also have rows in the feature table; re-extract without them"
        )
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    ddpm = load_pretrained(str(table.meta["checkpoint"]))
    tiles = _dense_tiles(shards, set(train_tiles) | set(val_tiles), ddpm.normalizer)
    val_x = torch.from_numpy(np.stack([tiles[k][0] for k in val_tiles]))
    val_y = torch.from_numpy(np.stack([tiles[k][1] for k in val_tiles]))
    ctx = _Context(cfg, table, timesteps, blocks, head_cfg, test, out, val_x, val_y, tiles)
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    jobs = [(k, d) for k in ks for d in range(cfg.draws)]
    for k, d in tqdm(jobs, desc="label-efficiency", unit="draw"):
        units = draw_units(pool, k, d, cfg.seed)
        chosen = [t for t in train_tiles if (scene_of(t) if unit is CountUnit.scenes else t) in units]
        for method in cfg.methods:
            row = _one_run(ctx, method, k, d, chosen)
            scenes = sorted({scene_of(t) for t in chosen})
            rows.append({"method": method, "k": k, "draw": d, "drawn": units, "scenes": scenes, **row})
        log.info(
            "k=%d draw=%d: test mIoU %s",
            k,
            d,
            {r["method"]: round(r["test_miou"], 3) for r in rows[-len(cfg.methods) :]},
        )
    return _report(cfg, ctx, rows, ks, ddpm.meta)


@dataclass
class _Context:
    """What every run of a report shares."""

    cfg: LabelEfficiencyConfig
    table: Any
    timesteps: list[int]
    blocks: list[str]
    head_cfg: HeadConfig
    test: _TestScenes
    out: str
    val_x: Any  # (N, C, H, W) normalised val tiles
    val_y: Any  # (N, H, W) their dense labels
    tiles: dict[str, tuple[np.ndarray, np.ndarray]]


def _one_run(ctx: _Context, method: str, k: int, draw: int, chosen: list[str]) -> dict[str, Any]:
    """Train ``method`` on the ``chosen`` tiles, predict and score the test scenes."""
    import torch

    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.heads.fit import fit_head
    from rsdiff.heads.scratch_unet import fit_scratch_unet

    cfg = ctx.cfg
    t0 = time.perf_counter()
    if method == "scratch_unet":
        ucfg = build(ScratchUNetConfig, cfg.unet, {"seed": cfg.seed + draw})
        x = torch.from_numpy(np.stack([ctx.tiles[t][0] for t in chosen]))
        y = torch.from_numpy(np.stack([ctx.tiles[t][1] for t in chosen]))
        model, facts = fit_scratch_unet(
            x, y, ctx.val_x, ctx.val_y, ctx.table.num_classes, ucfg, cfg.input_noise
        )
        head = TrainedHead.from_pixel_unet(
            model,
            ucfg,
            int(x.shape[1]),
            list(ctx.table.meta["classes"]),
            str(ctx.table.meta["checkpoint"]),
            {"val_miou": facts["val_miou"], "best_step": facts["best_step"]},
        )
        extra = {
            "val_miou": facts["val_miou"],
            "best_step": facts["best_step"],
            "steps": facts["steps"],
            "labeled_pixels": int((y != IGNORE_INDEX).sum()),
        }
    else:
        base = ctx.head_cfg if method == "residual" else cfg.ensemble
        hc = build(HeadConfig, base, {"input_noise": cfg.input_noise, "seed": cfg.seed + draw})
        head = fit_head(
            ctx.table,
            ctx.timesteps,
            ctx.blocks,
            hc,
            train_images=set(chosen),
            val_split="val",
            memory_mb=cfg.table.memory_mb,
        )
        extra = {
            "val_miou": head.metrics.get("miou"),
            "best_epoch": head.metrics.get("best_epoch"),
            "labeled_pixels": ctx.table.count_rows("train", set(chosen)),
        }
    train_seconds = time.perf_counter() - t0
    name = f"{method}-k{k}-d{draw}"
    head_uri = head.save(storage.join(ctx.out, "heads", name))
    scores, predict_seconds = _score_on_test(ctx, head_uri, name)
    return {
        "tiles": len(chosen),
        "test_miou": scores["miou"],
        "test_overall_accuracy": scores["overall_accuracy"],
        "test_iou": scores["iou"],
        "test_scenes": scores["scenes"],
        "params": sum(p.numel() for p in head.module.parameters()),
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "head": head_uri,
        **extra,
    }


def _score_on_test(ctx: _Context, head_uri: str, name: str) -> tuple[dict[str, Any], float]:
    """Predict the test scenes with the head at ``head_uri`` and evaluate them: ``(metrics, seconds)``."""
    from rsdiff.evaluate import EvaluateConfig, run_evaluate
    from rsdiff.prediction.config import PredictConfig
    from rsdiff.prediction.run import run_predict

    cfg = ctx.cfg
    t0 = time.perf_counter()
    pred = run_predict(
        build(
            PredictConfig,
            {
                "head": head_uri,
                "inputs": ctx.test.images,
                "output": storage.join(ctx.out, "predictions", name),
                "overwrite": True,
                "quicklook": False,
                "window": cfg.window,
                "overlap": cfg.overlap,
                "region": cfg.test_region,
                "tracking": {"enabled": False},
                "ray": cfg.ray,
            },
        )
    )
    ev = run_evaluate(
        build(
            EvaluateConfig,
            {"predictions": pred.output, "labels": ctx.test.labels, "tracking": {"enabled": False}},
        )
    )
    return ev.metrics, time.perf_counter() - t0


def format_table(rows: list[dict[str, Any]], ks: list[int], methods: list[str], unit: str) -> str:
    """Markdown: mean ± std test mIoU (one row per method, one column per k), then per-class IoU."""
    lines = ["| test mIoU | " + " | ".join(f"k={k} {unit}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in methods:
        cells = []
        for k in ks:
            v = [r["test_miou"] for r in rows if r["method"] == m and r["k"] == k]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    classes = list(rows[0]["test_iou"]) if rows else []
    lines += [
        "",
        "| test IoU per class (mean over draws) | k | " + " | ".join(classes) + " |",
        "|---|---|" + "---|" * len(classes),
    ]
    for m in methods:
        for k in ks:
            sel = [r for r in rows if r["method"] == m and r["k"] == k]
            if sel:
                cells = [_fmt(np.nanmean([_num(r["test_iou"][c]) for r in sel])) for c in classes]
                lines.append(f"| {m} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.3f}"


def _plot(rows: list[dict[str, Any]], ks: list[int], methods: list[str], unit: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        v = [[r["test_miou"] for r in rows if r["method"] == m and r["k"] == k] for k in ks]
        mean, std = np.array([np.mean(x) for x in v]), np.array([np.std(x) for x in v])
        ax.plot(ks, mean, marker="o", label=m)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel(f"labeled training {unit} (k)")
    ax.set_ylabel("test mIoU (mean ± std over draws)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _report(
    cfg: LabelEfficiencyConfig,
    ctx: _Context,
    rows: list[dict[str, Any]],
    ks: list[int],
    ddpm_meta: dict[str, Any],
) -> LabelEfficiencyResult:
    """Write table.md and the plot, log everything to MLflow, then results.json (last: complete)."""
    from rsdiff import tracking

    unit = CountUnit(cfg.unit).value
    methods = list(cfg.methods)
    table_md = format_table(rows, ks, methods, unit)
    pre = ddpm_meta.get("config", {}) or {}
    per_step = int(pre.get("data", {}).get("batch_size", 0)) * int(
        pre.get("scaling", {}).get("num_workers", 1)
    )
    results = {
        "features": ctx.table.root,
        "checkpoint": ctx.table.meta["checkpoint"],
        "pretraining": {
            "step": ddpm_meta.get("step"),
            "images_seen": (ddpm_meta.get("step") or 0) * per_step,
        },
        "timesteps": list(ctx.timesteps),
        "blocks": list(ctx.blocks),
        "unit": unit,
        "test_scenes": ctx.test.ids,
        "test_region": None if cfg.test_region is None else list(cfg.test_region),
        "validation_tiles": len(ctx.val_y),
        "runs": rows,
        "table": table_md,
        "config": redact(to_container(cfg)),
    }
    out = ctx.out
    storage.write_text(storage.join(out, "table.md"), table_md + "\n")
    fig = _plot(rows, ks, methods, unit)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(storage.join(out, "label_efficiency.png"), buf.getvalue())
    run = tracking.start_stage_run(
        cfg.tracking,
        f"label-efficiency-{unit}-k{'-'.join(map(str, ks))}",
        {"rsdiff.stage": "label-efficiency"},
        cfg,
        {"features": storage.absolute(str(cfg.features)), "selection": cfg.selection, "output": out},
    )
    with tracking.ends_run(run):
        if run is not None:
            run.log_params(
                {
                    "selection.timesteps": json.dumps(list(ctx.timesteps)),
                    "selection.blocks": json.dumps(list(ctx.blocks)),
                    "test_scenes": json.dumps(ctx.test.ids),
                }
            )
            for m in methods:
                for k in ks:
                    v = [r["test_miou"] for r in rows if r["method"] == m and r["k"] == k]
                    run.log_metrics(
                        {f"test_miou_{m}_mean": float(np.mean(v)), f"test_miou_{m}_std": float(np.std(v))},
                        step=k,
                    )
            run.log_figure(fig, "label_efficiency.png")
            run.log_dict(results, "results.json")
            run.client.log_text(run.run_id, table_md + "\n", "table.md")
        # results.json marks a complete report: written last, after MLflow has everything
        storage.write_text(storage.join(out, "results.json"), json.dumps(results, indent=1))
    import matplotlib.pyplot as plt

    plt.close(fig)
    if run is not None:
        run.finish()
    return LabelEfficiencyResult(rows, table_md, out, run.run_id if run else None)
