"""What to label next, simulated on dubai-aerial: uncertainty-guided tile picks vs random picks at
the same labeling budget, scored on test scenes no selection ever sees.

    python tests/benchmarks/bench_suggest.py --workdir runs/bench-two-step \\
        --out tests/benchmarks/results/suggest-dubai-2cpu-2026-11-26.json

It reuses ``bench_two_step.py``'s work folder (the same dubai roles: the checkpoint pretrained on
tiles 4 and 6 then 1 and 2, the pool's feature table with its scene-level val split, the tile_8
test table) and builds what is missing with the same helpers.

Protocol:

- **pool**: the train-split scenes of tiles 1 and 2; **val**: that ingest's val scenes (only early
  stopping looks at them); **test**: whole tile_8, scored once per fitted head on its sampled
  labeled pixels (at most 64 per class per 64 px tile).
- The labeling unit is a ``--tile`` px tile (default 128) of a pool scene; revealing it gives the
  head the feature table's sampled pixels of the 64 px shard tiles inside it (what extraction
  gives any labeled tile).
- Round 0: ``--start`` labeled scenes drawn per seed (both strategies share them and the first head).
  Each of ``--rounds`` rounds: fit the head (``--head``, default DDPM-Seg's 10-member ensemble) on
  all revealed labels -> pick ``--budget`` unlabeled tiles -> reveal them -> refit.
- ``uncertainty`` (or ``<measure>[/quantile][/nodiv]``, e.g. ``entropy``,
  ``mutual_information/nodiv``: without the feature-similarity rule) picks with rsdiff's
  suggestion code: per-pixel scores from
  :class:`~rsdiff.prediction.uncertainty.PixelOutputs` (``--measure``), aggregated per tile
  (``--aggregate``: mean or the 0.9 quantile), ranked by :func:`~rsdiff.suggest.rank.rank_tiles`
  with its default feature-space diversity. Scores come from a uniform grid of pixels (every
  ``--grid`` px) of each 64 px window's dense features, computed once (the UNet is frozen), not
  from label-aware samples. ``random`` picks uniformly among the same candidates.

Prints one JSON line (test mIoU mean +- std per strategy and round, labels per round, the budget
ratio at which uncertainty reaches random's final mIoU) and writes it, with every run, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tile_of(image_id: str, tile: int) -> tuple[str, int, int]:
    """``scene/row_col`` (a 64 px shard tile) -> ``(scene, label-tile row, label-tile col)`` origin px."""
    scene, origin = image_id.split("/")
    r, c = (int(v) for v in origin.split("_"))
    return scene, (r // tile) * tile, (c // tile) * tile


def _grid_features(ckpt: str, data: Path, scenes: list[str], ts: list[int], blocks: list[str], grid: int):
    """``{scene: (rows (n,), cols (n,), features (n, D) fp16)}`` on a uniform grid of pixels, from
    the dense features of 64 px windows on the ingest's tile grid."""
    import torch

    from rsdiff.data.scenes import SceneReader, discover
    from rsdiff.data.tiling import axis_origins
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.extractor import FeatureExtractor

    ddpm = load_pretrained(ckpt)
    ext = FeatureExtractor(ddpm, ts, blocks, 0, "fp32")
    size = int(ddpm.meta["image_size"])
    tiles = sorted({s.split("-images-")[0] for s in scenes})
    refs = {r.id: r for r in discover([f"{data}/{t}/images/*.jpg" for t in tiles])}
    off = grid // 2
    out = {}
    for sid in scenes:
        ref = next(r for k, r in refs.items() if k.endswith(sid) or sid.endswith(k))
        rows_all, cols_all, feats_all = [], [], []
        with SceneReader(ref) as reader:
            origins = [(r, c) for r in axis_origins(reader.height, size, size)
                       for c in axis_origins(reader.width, size, size)]  # fmt: skip
            for j in range(0, len(origins), 16):
                batch = origins[j : j + 16]
                px = np.stack([reader.read(r, c, size, size, mask=False)[0] for r, c in batch])
                x = ddpm.normalizer.torch(torch.from_numpy(px.astype(np.float32)))
                with torch.no_grad():
                    acts = ext.activations(x)
                    dense = ext.dense_rows(acts, (size, size), 0, size)  # (B, D, S, S)
                sub = dense[:, :, off::grid, off::grid]
                gy, gx = np.meshgrid(np.arange(off, size, grid), np.arange(off, size, grid), indexing="ij")
                for (r, c), f in zip(batch, sub):
                    rows_all.append((r + gy).ravel())
                    cols_all.append((c + gx).ravel())
                    feats_all.append(f.permute(1, 2, 0).reshape(-1, f.shape[0]).half().numpy())
        out[sid] = (np.concatenate(rows_all), np.concatenate(cols_all), np.concatenate(feats_all))
    return out


def plot(summary: dict[str, Any], path: Path, budget: int, tile: int) -> None:
    """Test mIoU vs labels added (tiles of ``tile`` px), one line per strategy with a +-std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in summary.items():
        mean, std = np.array(s["test_miou_mean"]), np.array(s["test_miou_std"])
        x = np.arange(len(mean)) * budget
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(f"tiles labeled after the start scenes ({tile} px each)")
    ax.set_ylabel("test mIoU (tile_8)")
    ax.set_title("What to label next: uncertainty vs random picks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/dubai-aerial")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs/bench-two-step")
    ap.add_argument("--model", default="two_step", help="which bench_two_step checkpoint's features")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--start", type=int, default=2, help="labeled scenes at round 0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=8, help="tiles revealed per round")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--head", default="ensemble")
    ap.add_argument("--measure", default="mutual_information")
    ap.add_argument("--aggregate", default="mean")
    ap.add_argument("--max-similarity", type=float, default=0.9)
    ap.add_argument("--strategies", default="random,uncertainty")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default: next to --out)")
    ap.add_argument(
        "--merge", type=Path, nargs="*", help="earlier result JSONs whose other strategies to report"
    )
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no dubai-aerial data at {args.data}: pass --data")
    import torch
    from bench_two_step import _extract, _ingest, _pretrain

    from rsdiff.config import build
    from rsdiff.heads.config import HeadConfig
    from rsdiff.heads.fit import evaluate, fit_head, head_rows
    from rsdiff.prediction.config import Measure
    from rsdiff.prediction.uncertainty import PixelOutputs, check_measure
    from rsdiff.suggest.rank import Candidate, rank_tiles

    torch.set_num_threads(2)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = work / "runs" / {"two_step": "two-step", "random_init": "random-init"}.get(args.model, args.model)
    ckpts = sorted(ckpt.glob("checkpoint_[0-9]*"))
    bench_args = argparse.Namespace(batch=8, cpus=2.0, seed=0, timesteps="[50,150,250]",
                                    blocks="[up1.res0,up1.res1,up2.res0,up2.res1]")  # fmt: skip
    tgt = _ingest(args.data, ["tile_1", "tile_2"], work / "shards-target", 0.25)
    test_shards = _ingest(args.data, ["tile_8"], work / "shards-test", 0.0)
    if not ckpts:
        src = _ingest(args.data, ["tile_4", "tile_6"], work / "shards-source", 0.0)
        source = _pretrain(src, "source", 600, work, bench_args, None)["checkpoint"]
        _pretrain(tgt, "two-step", 600, work, bench_args, source)
        ckpts = sorted(ckpt.glob("checkpoint_[0-9]*"))
    checkpoint = str(ckpts[-1])
    table = _extract(checkpoint, tgt, work / f"features-{args.model}", "[train,val]", 64, bench_args)
    test = _extract(checkpoint, test_shards, work / f"test-{args.model}", "[train]", 64, bench_args)
    ts, blocks = table.index.timesteps, table.index.blocks
    test_rows = head_rows(test, "train", test.index.select(ts, blocks), None, 4096.0, torch.device("cpu"))
    images = sorted({str(i) for p in table.parts("train") for i in np.unique(table.part(p["name"])["image"])})
    pool = sorted({i.split("/")[0] for i in images})
    units: dict[tuple[str, int, int], set[str]] = defaultdict(set)  # label tile -> its 64 px image ids
    for i in images:
        units[_tile_of(i, args.tile)].add(i)
    t1 = time.perf_counter()
    grid = _grid_features(checkpoint, args.data, pool, list(ts), list(blocks), args.grid)
    compute: dict[str, Any] = {"setup_s": t1 - t0, "grid_features_s": time.perf_counter() - t1}
    head_cfg = build(
        HeadConfig, {"kind": args.head, "epochs": args.epochs, "patience": 4, "input_noise": 0.1}
    )

    def fit(labeled: set[tuple[str, int, int]], seed: int):
        ids = set().union(*(units[u] for u in labeled))
        head = fit_head(table, ts, blocks, build(HeadConfig, head_cfg, {"seed": seed}), train_images=ids)
        cm = evaluate(head.module, test_rows, test.num_classes, torch.from_numpy(head.mean),
                      torch.from_numpy(head.std))  # fmt: skip
        return head, cm.miou()

    def pixels(labeled: set[tuple[str, int, int]]) -> int:
        """Labeled px: the label tiles' areas inside their scenes (whole scenes at round 0)."""
        return sum(len(units[u]) for u in labeled) * 64 * 64

    def score_tiles(
        head, candidates: list[tuple[str, int, int]], seed: int, measure: Measure, aggregate: str
    ) -> list[Candidate]:
        check_measure(head, measure, 0)
        outputs = PixelOutputs(head, mutual_information=measure is Measure.mutual_information,
                               descriptor_dims=16, seed=seed)  # fmt: skip
        by_scene: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for s, r, c in candidates:
            by_scene[s].append((r, c))
        out = []
        c_ = head.num_classes
        for s, tiles in by_scene.items():
            rows, cols, feats = grid[s]
            with torch.no_grad():
                ch = outputs(torch.from_numpy(feats.astype(np.float32))).numpy()
            from rsdiff.prediction.uncertainty import entropy

            value = (
                ch[:, outputs.mi_channel]
                if measure is Measure.mutual_information
                else entropy(torch.from_numpy(ch[:, :c_])).numpy()
            )
            desc = ch[:, outputs.descriptor_slice]
            key = (rows // args.tile) * 100000 + cols // args.tile
            for r, c in tiles:
                sel = key == (r // args.tile) * 100000 + c // args.tile
                if not sel.any():
                    continue
                v = value[sel]
                sc = float(v.mean() if aggregate == "mean" else np.quantile(v, 0.9))
                out.append(Candidate(s, r, c, args.tile, args.tile, sc, desc[sel].mean(0)))
        return out

    def rule(name: str) -> tuple[Measure, str, float | None] | None:
        """A strategy name -> (measure, aggregate, max_similarity); None for random picks.
        ``uncertainty``: --measure/--aggregate/--max-similarity; else ``<measure>[/quantile][/nodiv]``."""
        if name == "random":
            return None
        if name == "uncertainty":
            return Measure(args.measure), args.aggregate, args.max_similarity
        parts = name.split("/")
        agg = "quantile" if "quantile" in parts else "mean"
        return Measure(parts[0]), agg, None if "nodiv" in parts else args.max_similarity

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    rules = {s: rule(s) for s in strategies}
    runs = []
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, 17])
        start = sorted(rng.choice(pool, size=args.start, replace=False).tolist())
        labeled0 = {u for u in units if u[0] in start}
        t2 = time.perf_counter()
        head0, miou0 = fit(labeled0, seed)
        fit0_s = time.perf_counter() - t2
        for strategy in strategies:
            labeled, head, curve = set(labeled0), head0, [(pixels(labeled0), miou0)]
            t3 = time.perf_counter()
            pick_rng = np.random.default_rng([seed, 29])
            for _ in range(args.rounds):
                cands = sorted(u for u in units if u not in labeled)
                if (how := rules[strategy]) is None:
                    chosen = [cands[i] for i in pick_rng.choice(len(cands), size=args.budget, replace=False)]
                else:
                    scored = score_tiles(head, cands, seed, how[0], how[1])
                    picks = rank_tiles(scored, args.budget, 0.0, how[2])
                    chosen = [(p.candidate.scene, p.candidate.row, p.candidate.col) for p in picks]
                labeled |= set(chosen)
                head, miou = fit(labeled, seed)
                curve.append((pixels(labeled), miou))
                print(json.dumps({"seed": seed, "strategy": strategy, "labeled_px": curve[-1][0],
                                  "test_miou": miou}), file=sys.stderr)  # fmt: skip
            runs.append({"seed": seed, "strategy": strategy, "start_scenes": start, "curve": curve,
                         "seconds": time.perf_counter() - t3 + fit0_s})  # fmt: skip
    for earlier in args.merge or []:  # runs of strategies measured before, on the same seeds
        for r in json.loads(earlier.read_text())["runs"]:
            if r["strategy"] not in strategies and r["seed"] < args.seeds:
                runs.append(r)
    strategies += sorted({r["strategy"] for r in runs} - set(strategies))
    summary: dict[str, Any] = {}
    for s in strategies:
        curves = np.array([[m for _, m in r["curve"]] for r in runs if r["strategy"] == s])
        px = np.array([[p for p, _ in r["curve"]] for r in runs if r["strategy"] == s])
        summary[s] = {
            "test_miou_mean": curves.mean(0).round(4).tolist(),
            "test_miou_std": curves.std(0).round(4).tolist(),
            "labeled_px_mean": px.mean(0).round(0).tolist(),
        }
    verdict: dict[str, Any] = {}
    if {"random", "uncertainty"} <= set(strategies):
        rnd, unc = summary["random"], summary["uncertainty"]
        final = rnd["test_miou_mean"][-1]
        added = [p - unc["labeled_px_mean"][0] for p in unc["labeled_px_mean"]]
        reach = next((i for i, m in enumerate(unc["test_miou_mean"]) if m >= final), None)
        verdict = {
            "random_final_miou": final,
            "uncertainty_final_miou": unc["test_miou_mean"][-1],
            "gain_at_equal_budget_points": 100 * (unc["test_miou_mean"][-1] - final),
            "added_labels_to_reach_random_final": None if reach is None else added[reach] / added[-1],
        }
    line = {
        "bench": "suggest_simulation",
        "summary": summary,
        "verdict": verdict,
        "compute": {**compute, "total_s": time.perf_counter() - t0},
        "pool_scenes": pool,
        "label_tiles": len(units),
        "test_tiles": ["tile_8"],
        "checkpoint": checkpoint.replace(str(work), "{workdir}"),
        "args": {
            k: os.path.relpath(v, REPO) if isinstance(v, Path) else str(v) for k, v in vars(args).items()
        },
    }
    print(json.dumps({"bench": line["bench"], "summary": summary, "verdict": verdict}))
    out = args.out or work / "suggest.json"
    out.write_text(json.dumps({**line, "runs": runs}, indent=1))
    plot(summary, args.plot or out.with_suffix(".png"), args.budget, args.tile)


if __name__ == "__main__":
    main()
