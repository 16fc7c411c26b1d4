"""The pretraining-compute curve: test mIoU of the residual head vs images seen in pretraining.

For each checkpoint of one pretraining run: extract features of the labeled shards (train and val
splits only), then ``run_label_efficiency`` with the residual head (timesteps/blocks fixed for every
checkpoint, so only the weights change), scored on the shards' test scenes. The scratch UNet does
not depend on the checkpoint: it is trained once (with the first checkpoint's run) and drawn as a
band (mean ± std over draws) per k. Prints one JSON line; writes ``curve.json`` and ``curve.png``
under ``--out``.

    python tests/benchmarks/bench_pretrain_curve.py --shards runs/dubai/shards \\
        --checkpoints runs/curve/ray/curve/checkpoint_00000250 ... --ks 1 2 5 --draws 3 \\
        --timesteps 50 --blocks up0.res1 up1.res1 up2.res1 --test-region 0 0 256 256 \\
        --set head.width=128 head.class_weighting=balanced unet.steps=1000 --out runs/curve/report

``--set`` takes ``jobs/label_efficiency.py`` overrides (key=value), applied to every comparison.

``--sweep CONFIG`` chooses the timesteps, blocks and head per checkpoint instead: a
``jobs/sweep.py`` config (e.g. ``configs/sweep/tiny-grid.yaml``) run on that checkpoint's features,
selecting on val only, whose best head is the comparison's ``selection``. Extract the timesteps and
blocks the search space names (``--timesteps 50 150 250 400``, no ``--blocks`` = every block).
``--replot CURVE_JSON --out DIR`` only draws ``curve.png`` again from a ``curve.json``.
``--reuse-features`` keeps a ``features-<checkpoint>`` table already under ``--out`` when it was
extracted from that checkpoint with the same timesteps and blocks. ``--scratch-from CURVE_JSON``
takes the scratch UNet's band from an earlier run's ``curve.json`` with the same shards, k, draws,
test region and overrides (the UNet does not depend on the checkpoint) instead of training it again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from rsdiff.config import build, preset
from rsdiff.curve_figure import compute_curve_figure
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import run_extract
from rsdiff.features.table import FeatureTable
from rsdiff.label_efficiency import LabelEfficiencyConfig, run_label_efficiency
from rsdiff.sweep.config import SweepConfig
from rsdiff.sweep.run import run_sweep


def _stats(rows: list[dict], method: str, k: int) -> tuple[float, float]:
    v = [r["test_miou"] for r in rows if r["method"] == method and r["k"] == k]
    return float(np.mean(v)), float(np.std(v))


def _features(args: argparse.Namespace, ckpt: str, folder: Path) -> FeatureTable:
    """The checkpoint's feature table: extracted now, or (``--reuse-features``) the one already in
    ``folder`` when its checkpoint, timesteps and blocks are the ones asked for."""
    if args.reuse_features and (folder / "table.json").exists():
        table = FeatureTable.open(str(folder))
        meta = json.loads((folder / "table.json").read_text())
        same_blocks = not args.blocks or sorted(meta["blocks"]) == sorted(args.blocks)
        if (
            Path(meta["checkpoint"]).resolve() == Path(ckpt).resolve()
            and same_blocks
            and (sorted(meta["timesteps"]) == sorted(args.timesteps))
        ):
            return table
        raise SystemExit(f"{folder} holds other features (checkpoint, timesteps or blocks); remove it")
    return run_extract(
        build(
            ExtractConfig,
            preset("extract", "tiny"),
            {"checkpoint": ckpt, "shards": args.shards, "output": str(folder), "timesteps": args.timesteps,
             "blocks": args.blocks, "max_images": args.max_images, "pixels_per_class": args.pixels_per_class,
             "concurrency": args.extract_concurrency, "overwrite": True},
        )
    )  # fmt: skip


def _selection(args: argparse.Namespace, table: FeatureTable, out: Path, step: str) -> dict | None:
    """``--sweep``: run the sweep config on this checkpoint's features (val only); its best head."""
    if not args.sweep:
        return None
    sweep = run_sweep(
        build(
            SweepConfig,
            preset("sweep", args.sweep),
            {"features": table.root, "output": str(out / f"sweep-{step}"), "name": f"curve-{step}",
             "storage": str(out / "tune"), "tracking": {"uri": f"sqlite:///{(out / 'mlflow.db').resolve()}"}},
        )
    )  # fmt: skip
    keys = ("timesteps", "blocks", "best_val_miou", "width", "depth", "lr", "class_weighting")
    ranking = [{k: t[k] for k in ("timesteps", "blocks", "best_val_miou")} for t in sweep.trials]
    return {"head": sweep.best_head, **{k: sweep.best.get(k) for k in keys}, "val_ranking": ranking}


def _draws(rows: list[dict], method: str) -> dict[str, list[list[str]]]:
    """The scenes (or tiles) each draw of ``method`` trained on, per k."""
    out: dict[str, list[list[str]]] = {}
    for r in sorted((r for r in rows if r["method"] == method), key=lambda r: (r["k"], r["draw"])):
        out.setdefault(str(r["k"]), []).append(r["drawn"])
    return out


def _scratch_from(path: str, args: argparse.Namespace) -> tuple[dict[int, tuple[float, float]], dict]:
    """The scratch UNet band of an earlier ``curve.json`` and its draws, refused unless it scored the
    same thing (the draws themselves are compared once this run has drawn them)."""
    old = json.loads(Path(path).read_text())
    if "scratch_unet_draws" not in old:
        raise SystemExit(f"--scratch-from {path} does not record the UNet's draws; train it again")
    same = {"shards": args.shards, "ks": args.ks, "draws": args.draws, "test_region": args.test_region}
    changed = [k for k, v in same.items() if old.get(k) != v]
    unet = sorted(x for x in args.set if x.startswith("unet."))
    if unet != sorted(x for x in old.get("label_efficiency_overrides", []) if x.startswith("unet.")):
        changed.append("unet overrides")
    if changed:
        raise SystemExit(f"--scratch-from {path} was measured with other {', '.join(changed)}")
    return {int(k): tuple(v) for k, v in old["scratch_unet"].items()}, old["scratch_unet_draws"]


def _save_figure(curve: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig = compute_curve_figure(curve)
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="labeled ingest output with train, val and test splits")
    ap.add_argument("--checkpoints", nargs="+")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 5])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--timesteps", nargs="+", type=int, default=[50, 150, 250])
    ap.add_argument("--blocks", nargs="*", default=[])
    ap.add_argument("--max-images", type=int, default=None, help="tiles per split (default: every tile)")
    ap.add_argument("--pixels-per-class", type=int, default=64)
    ap.add_argument("--extract-concurrency", type=int, default=1, help="feature actors (one CPU each)")
    ap.add_argument("--test-region", nargs=4, type=int, default=None)
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="jobs/label_efficiency.py overrides, key=value")
    ap.add_argument(
        "--sweep", default=None, help="a jobs/sweep.py config run per checkpoint (selects on val)"
    )
    ap.add_argument("--reuse-features", action="store_true", help="keep matching feature tables under --out")
    ap.add_argument(
        "--scratch-from", default=None, help="an earlier curve.json whose scratch UNet band to use"
    )
    ap.add_argument("--replot", default=None, help="only draw curve.png again from this curve.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.replot:
        _save_figure(json.loads(Path(args.replot).read_text()), Path(args.out))
        return
    if not args.shards or not args.checkpoints:
        ap.error("--shards and --checkpoints are required (or --replot CURVE_JSON)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    scratch, scratch_draws = _scratch_from(args.scratch_from, args) if args.scratch_from else ({}, {})
    for i, ckpt in enumerate(args.checkpoints):
        t0 = time.perf_counter()
        step = Path(ckpt).name
        table = _features(args, ckpt, out / f"features-{step}")
        extract_s = time.perf_counter() - t0
        selection = _selection(args, table, out, step)
        sweep_s = time.perf_counter() - t0 - extract_s
        methods = ["residual", "scratch_unet"] if i == 0 and not scratch else ["residual"]
        le = run_label_efficiency(
            build(
                LabelEfficiencyConfig,
                {"features": table.root, "ks": args.ks, "draws": args.draws, "methods": methods,
                 "test_region": args.test_region, "head": {"epochs": args.head_epochs},
                 "output": str(out / f"le-{step}"), "tracking": {"enabled": False}},
                OmegaConf.from_dotlist(args.set),
                {"selection": selection["head"]} if selection else {},
            )
        )  # fmt: skip
        results = json.loads((Path(le.output) / "results.json").read_text())
        if "scratch_unet" in methods:
            scratch = {k: _stats(le.rows, "scratch_unet", k) for k in args.ks}
            scratch_draws = _draws(le.rows, "scratch_unet")
        elif _draws(le.rows, "residual") != scratch_draws:
            raise SystemExit(f"--scratch-from {args.scratch_from}: its UNet trained on other draws")
        points.append(
            {
                "checkpoint": ckpt,
                "step": results["pretraining"]["step"],
                "images_seen": results["pretraining"]["images_seen"],
                "residual": {str(k): _stats(le.rows, "residual", k) for k in args.ks},
                "selection": selection,
                "extract_seconds": round(extract_s, 1),
                "sweep_seconds": round(sweep_s, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    points.sort(key=lambda p: p["images_seen"])
    report = {
        "bench": "pretrain_curve",
        "shards": args.shards,
        "ks": args.ks,
        "draws": args.draws,
        "unit": results.get("unit", "scenes"),
        "test_region": args.test_region,
        "label_efficiency_overrides": args.set,
        "sweep": args.sweep,
        "scratch_from": args.scratch_from,
        "points": points,
        "scratch_unet": {str(k): v for k, v in scratch.items()},
        "scratch_unet_draws": scratch_draws,
        "residual_minus_scratch_points": {
            str(k): [round(100 * (p["residual"][str(k)][0] - scratch[k][0]), 1) for p in points]
            for k in args.ks
        },
    }
    (out / "curve.json").write_text(json.dumps(report, indent=1))
    _save_figure(report, out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
