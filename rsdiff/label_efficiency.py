"""``jobs/label_efficiency.py``: mIoU vs number of labeled images, DDPM features vs from scratch.

For each ``k`` in ``ks`` and each of ``draws`` random draws of ``k`` training images from the
feature table's train split (the same draw for every method, seeded by ``(seed, k, draw)``):

- ``residual``: rsdiff's residual MLP head on the frozen DDPM features (the selected timesteps
  and blocks, by default those of the sweep's best head);
- ``ensemble``: DDPM-Seg's 10-member MLP ensemble on the same features;
- ``scratch_unet``: a small UNet trained from scratch on the same tiles.

All three are supervised at exactly the same pixels (the table's sampled rows of those images),
use the same augmentation (Gaussian noise of std ``input_noise`` on their inputs: standardised
features for the heads, normalised pixels for the UNet), select their best epoch/step on the same
validation pixels (the table's ``val`` rows) and are scored there. Output: ``results.json``,
``table.md`` (mean ± std mIoU per method and k) and ``label_efficiency.png``, written under
``output`` and logged to one MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import MISSING

from rsdiff import storage
from rsdiff.config import build, redact, to_container
from rsdiff.errors import ConfigError, DataError
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.cache import check_numbers as check_table_numbers
from rsdiff.heads.config import HeadConfig, HeadKind, ScratchUNetConfig
from rsdiff.tracking import StageTracking

log = logging.getLogger(__name__)
METHODS = ("residual", "ensemble", "scratch_unet")


@dataclass
class LabelEfficiencyConfig:
    """Config of ``jobs/label_efficiency.py``."""

    features: str = MISSING  # a feature table (jobs/extract.py output) with train and val rows
    selection: str | None = None  # a head artifact (e.g. the sweep's best) whose timesteps/blocks/head to use
    timesteps: list[int] = field(default_factory=list)  # without `selection`: empty = all in the table
    blocks: list[str] = field(default_factory=list)
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10])
    draws: int = 3
    seed: int = 0
    input_noise: float = 0.1
    head: HeadConfig = field(default_factory=HeadConfig)  # residual head (overridden by `selection`'s)
    ensemble: HeadConfig = field(default_factory=lambda: HeadConfig(kind=HeadKind.ensemble))
    unet: ScratchUNetConfig = field(default_factory=ScratchUNetConfig)
    table: TableCacheConfig = field(default_factory=TableCacheConfig)  # how the draws read the table
    output: str = "runs/label_efficiency"
    tracking: StageTracking = field(
        default_factory=lambda: StageTracking(experiment="rsdiff-label-efficiency")
    )


@dataclass
class LabelEfficiencyResult:
    rows: list[dict[str, Any]]  # one per (method, k, draw)
    table: str
    output: str
    mlflow_run_id: str | None


def draw_images(pool: list[str], k: int, draw: int, seed: int) -> list[str]:
    """``k`` distinct images of ``pool`` for draw ``draw`` (reproducible, independent of method)."""
    rng = np.random.default_rng([seed, k, draw])
    return sorted(rng.choice(sorted(pool), size=k, replace=False).tolist())


def _pixels_by_image(table: Any, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``image -> (rows, cols, labels)`` of the table's sampled pixels in ``split``."""
    acc: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for part in table.parts(split):
        p = table.part(part["name"])
        for img in np.unique(p["image"]):
            sel = p["image"] == img
            acc.setdefault(str(img), []).append((p["rows"][sel], p["cols"][sel], p["labels"][sel]))
    return {k: tuple(np.concatenate([v[i] for v in vs]) for i in range(3)) for k, vs in acc.items()}  # type: ignore[misc]


def _tiles(shards: str, keys: set[str], normalizer: Any) -> dict[str, np.ndarray]:
    """Normalised ``(C, H, W)`` float32 tiles of the given sample keys, read from the shards."""
    from rsdiff.data.manifest import read_manifest
    from rsdiff.data.shards import iter_shard

    out = {}
    for uri in read_manifest(shards).shard_uris():
        for s in iter_shard(uri):
            if s.key in keys:
                out[s.key] = normalizer(s.image)
    missing = keys - out.keys()
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of the feature table are not in its shards {shards}: "
            f"{sorted(missing)[:3]}"
        )
    return out


def format_table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    """Markdown: one row per method, one column per k, cells ``mean ± std`` mIoU over draws."""
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in METHODS:
        cells = []
        for k in ks:
            v = [r["miou"] for r in rows if r["method"] == m and r["k"] == k]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], ks: list[int]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        means = [np.mean([r["miou"] for r in rows if r["method"] == m and r["k"] == k]) for k in ks]
        stds = [np.std([r["miou"] for r in rows if r["method"] == m and r["k"] == k]) for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labeled training images (k)")
    ax.set_ylabel("val mIoU (mean ± std over draws)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def run_label_efficiency(cfg: LabelEfficiencyConfig) -> LabelEfficiencyResult:
    """Run every (k, draw, method) and write the table, plot and per-run JSON.

    Raises:
        RsdiffError: missing table/val rows, k larger than the pool, bad selection.
    """
    import torch

    from rsdiff import tracking
    from rsdiff.features.table import FeatureTable
    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.heads.fit import fit_head
    from rsdiff.heads.scratch_unet import fit_scratch_unet, sparse_labels
    from rsdiff.train.checkpoint import load_pretrained

    check_table_numbers(cfg.table)
    table = FeatureTable.open(str(cfg.features)).cached(cfg.table)
    if not table.parts("val"):
        raise DataError(f"feature table {storage.display(table.root)} has no val rows to score on")
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
    ks = sorted({int(k) for k in cfg.ks})
    train_px = _pixels_by_image(table, "train")
    val_px = _pixels_by_image(table, "val")
    pool = sorted(train_px)
    if not ks or ks[0] < 1 or ks[-1] > len(pool) or cfg.draws < 1:
        raise ConfigError(
            f"ks={ks} must be in [1, {len(pool)}] (the table's labeled train images) and draws >= 1"
        )
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    ddpm = load_pretrained(str(table.meta["checkpoint"]))
    tiles = _tiles(str(table.meta["shards"]), set(pool) | set(val_px), ddpm.normalizer)
    val_keys = sorted(val_px)
    val_x = torch.from_numpy(np.stack([tiles[k] for k in val_keys]))
    val_pixels = [val_px[k] for k in val_keys]
    size = val_x.shape[-2:]
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    jobs = [(k, d) for k in ks for d in range(cfg.draws)]
    for k, d in tqdm(jobs, desc="label-efficiency", unit="draw"):
        images = draw_images(pool, k, d, cfg.seed)
        for method, hc in (("residual", head_cfg), ("ensemble", cfg.ensemble)):
            t0 = time.perf_counter()
            hc = build(HeadConfig, hc, {"input_noise": cfg.input_noise, "seed": cfg.seed + d})
            fitted = fit_head(table, timesteps, blocks, hc, train_images=set(images), val_split="val",
                              memory_mb=cfg.table.memory_mb)  # fmt: skip
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "draw": d,
                    "images": images,
                    "miou": fitted.metrics["miou"],
                    "params": sum(p.numel() for p in fitted.module.parameters()),
                    "seconds": time.perf_counter() - t0,
                }
            )
        t0 = time.perf_counter()
        train_x = torch.from_numpy(np.stack([tiles[i] for i in images]))
        train_y = torch.from_numpy(
            np.stack([sparse_labels(tuple(size), *train_px[i]) for i in images])
        ).long()
        ucfg = build(ScratchUNetConfig, cfg.unet, {"seed": cfg.seed + d})
        miou, facts = fit_scratch_unet(
            train_x, train_y, val_x, val_pixels, table.num_classes, ucfg, cfg.input_noise
        )
        rows.append(
            {
                "method": "scratch_unet",
                "k": k,
                "draw": d,
                "images": images,
                "miou": miou,
                "params": facts["params"],
                "seconds": time.perf_counter() - t0,
            }
        )
        log.info("k=%d draw=%d: %s", k, d, {r["method"]: round(r["miou"], 3) for r in rows[-3:]})
    table_md = format_table(rows, ks)
    results = {
        "features": table.root,
        "checkpoint": table.meta["checkpoint"],
        "timesteps": list(timesteps),
        "blocks": list(blocks),
        "validation_images": val_keys,
        "validation_pixels": int(sum(len(p[2]) for p in val_pixels)),
        "runs": rows,
        "table": table_md,
        "config": redact(to_container(cfg)),
    }
    storage.write_text(storage.join(out, "table.md"), table_md + "\n")
    fig = _plot(rows, ks)
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(storage.join(out, "label_efficiency.png"), buf.getvalue())
    run_id = None
    run = tracking.start_stage_run(
        cfg.tracking,
        f"label-efficiency-k{'-'.join(map(str, ks))}",
        {"rsdiff.stage": "label-efficiency"},
        cfg,
        {"features": storage.absolute(str(cfg.features)), "selection": cfg.selection, "output": out},
    )
    with tracking.ends_run(run):
        if run is not None:
            _log_run(run, rows, ks, timesteps, blocks, fig, results, table_md)
        # results.json marks a complete report: written last, after MLflow has everything
        storage.write_text(storage.join(out, "results.json"), json.dumps(results, indent=1))
    if run is not None:
        run.finish()
        run_id = run.run_id
    plt.close(fig)
    return LabelEfficiencyResult(rows, table_md, out, run_id)


def _log_run(
    run: Any,
    rows: list[dict[str, Any]],
    ks: list[int],
    timesteps: list[int],
    blocks: list[str],
    fig: Any,
    results: dict[str, Any],
    table_md: str,
) -> None:
    """Selection, mean/std mIoU per method and k, the plot, results and table into ``run``."""
    run.log_params(
        {"selection.timesteps": json.dumps(list(timesteps)), "selection.blocks": json.dumps(list(blocks))}
    )
    for m in METHODS:
        for k in ks:
            v = [r["miou"] for r in rows if r["method"] == m and r["k"] == k]
            run.log_metrics({f"miou_{m}_mean": float(np.mean(v)), f"miou_{m}_std": float(np.std(v))}, step=k)
    run.log_figure(fig, "label_efficiency.png")
    run.log_dict(results, "results.json")
    run.client.log_text(run.run_id, table_md + "\n", "table.md")
