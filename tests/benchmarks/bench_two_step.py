"""Two-step pretraining on dubai-aerial: features of a DDPM trained from random init for N steps
vs one initialised from a checkpoint pretrained on *other* dubai tiles, then trained the same N
steps, compared by test mIoU of a residual head trained on k labeled scenes.

    python tests/benchmarks/bench_two_step.py --data ../shared/data/dubai-aerial --workdir runs/bench-two-step

Protocol (whole dubai tiles never mix between roles, since images of one tile correlate):

- source checkpoint: ``--source-tiles`` (default tile_4, tile_6), ``--source-steps`` steps from
  random init (the tiny preset, 64 px tiles);
- target imagery: ``--target-tiles`` (default tile_1, tile_2): both runs pretrain on it for
  ``--steps`` steps with the same seed and batches, (a) from random init, (b) ``init.from`` the
  source checkpoint; the same scenes, labeled, are the head's pool: a scene-level val split
  (``--val-fraction``) picks the head's best epoch, the rest are the training scenes;
- test: ``--test-tiles`` (default tile_8), never seen by any pretraining, selection or early
  stopping; scored once per head on its sampled labeled pixels (at most ``--test-pixels`` per class
  per 64 px tile), not by whole-scene prediction.

For k in ``--ks`` labeled scenes and ``--draws`` seeded draws of k training scenes (the same
scenes for both models), a residual head on fixed timesteps/blocks is fitted and scored. Prints one
JSON line (mean +- std test mIoU per model and k, compute per stage) and writes it, with every
draw, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _ingest(data: Path, tiles: list[str], out: Path, val_fraction: float) -> str:
    from rsdiff.config import load_config
    from rsdiff.data.ingest_config import IngestConfig
    from rsdiff.ingest import run_ingest

    if not (out / "manifest.json").exists():
        inputs = ",".join(f"{data}/{t}/images/*.jpg" for t in tiles)
        run_ingest(
            load_config(
                IngestConfig,
                REPO / "configs/ingest/dubai.yaml",
                [f"inputs=[{inputs}]", f"output={out}", "tile_size=64", f"val_fraction={val_fraction}"],
            )
        )
    return str(out)


def _pretrain(
    shards: str, name: str, steps: int, work: Path, args: argparse.Namespace, init: str | None
) -> dict:
    from rsdiff.config import load_config
    from rsdiff.pretrain import run_pretrain
    from rsdiff.train.config import PretrainConfig

    overrides = [
        f"data.shards={shards}",
        f"optim.max_steps={steps}",
        f"optim.warmup_steps={min(50, steps // 10)}",
        f"data.batch_size={args.batch}",
        "data.num_workers=1",
        f"checkpoint.every_steps={steps}",
        "tracking.sample_every=100000",
        f"tracking.log_every={max(1, steps // 10)}",
        f"scaling.cpus_per_worker={args.cpus}",
        f"run.storage={work / 'runs'}",
        f"run.name={name}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"seed={args.seed}",
    ]
    if init:
        overrides.append(f"init.from={init}")
    t0 = time.perf_counter()
    result = run_pretrain(load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", overrides))
    return {
        "checkpoint": result.checkpoint,
        "steps": result.step,
        "seconds": time.perf_counter() - t0,
        "images_seen": result.step * args.batch,
        "final_loss": result.metrics.get("loss"),
    }


def _extract(ckpt: str, shards: str, out: Path, splits: str, pixels: int, args: argparse.Namespace) -> Any:
    from rsdiff.config import load_config
    from rsdiff.features.config import ExtractConfig
    from rsdiff.features.extract import run_extract
    from rsdiff.features.table import FeatureTable

    if (out / "table.json").exists():
        return FeatureTable.open(str(out))
    return run_extract(
        load_config(
            ExtractConfig,
            REPO / "configs/extract/tiny.yaml",
            [
                f"checkpoint={ckpt}",
                f"shards={shards}",
                f"output={out}",
                f"splits={splits}",
                f"timesteps={args.timesteps}",
                f"blocks={args.blocks}",
                f"pixels_per_class={pixels}",
                "batch_size=16",
            ],
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/dubai-aerial")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs/bench-two-step")
    ap.add_argument("--source-tiles", default="tile_4,tile_6")
    ap.add_argument("--target-tiles", default="tile_1,tile_2")
    ap.add_argument("--test-tiles", default="tile_8")
    ap.add_argument("--source-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--timesteps", default="[50,150,250]")
    ap.add_argument("--blocks", default="[up1.res0,up1.res1,up2.res0,up2.res1]")
    ap.add_argument("--train-pixels", type=int, default=64)
    ap.add_argument("--test-pixels", type=int, default=64)
    ap.add_argument("--ks", default="1,5")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no dubai-aerial data at {args.data}: pass --data")
    import torch

    from rsdiff.config import build
    from rsdiff.heads.config import HeadConfig
    from rsdiff.heads.fit import evaluate, fit_head, head_rows

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    split = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    t0 = time.perf_counter()
    src_shards = _ingest(args.data, split(args.source_tiles), work / "shards-source", 0.0)
    tgt_shards = _ingest(args.data, split(args.target_tiles), work / "shards-target", args.val_fraction)
    test_shards = _ingest(args.data, split(args.test_tiles), work / "shards-test", 0.0)
    compute: dict = {"ingest_s": time.perf_counter() - t0}
    runs = {"source": _pretrain(src_shards, "source", args.source_steps, work, args, None)}
    runs["random_init"] = _pretrain(tgt_shards, "random-init", args.steps, work, args, None)
    runs["two_step"] = _pretrain(tgt_shards, "two-step", args.steps, work, args, runs["source"]["checkpoint"])
    compute["pretrain"] = runs
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    head_cfg = build(HeadConfig, {"epochs": args.epochs, "patience": 8, "input_noise": 0.1})
    for model in ("random_init", "two_step", "source"):
        t1 = time.perf_counter()
        table = _extract(
            runs[model]["checkpoint"],
            tgt_shards,
            work / f"features-{model}",
            "[train,val]",
            args.train_pixels,
            args,
        )
        test = _extract(
            runs[model]["checkpoint"], test_shards, work / f"test-{model}", "[train]", args.test_pixels, args
        )
        compute[f"extract_{model}_s"] = time.perf_counter() - t1
        images = sorted({i for p in table.parts("train") for i in np.unique(table.part(p["name"])["image"])})
        scenes = sorted({str(i).split("/")[0] for i in images})
        ts, blocks = table.index.timesteps, table.index.blocks
        channels = test.index.select(ts, blocks)
        test_rows = head_rows(test, "train", channels, None, 4096.0, torch.device("cpu"))
        for k in ks:
            for d in range(args.draws):
                rng = np.random.default_rng([args.seed, k, d])
                chosen = sorted(rng.choice(scenes, size=k, replace=False).tolist())
                train_images = {str(i) for i in images if str(i).split("/")[0] in chosen}
                t2 = time.perf_counter()
                head = fit_head(
                    table,
                    ts,
                    blocks,
                    build(HeadConfig, head_cfg, {"seed": args.seed + d}),
                    train_images=train_images,
                    val_split="val",
                )
                cm = evaluate(
                    head.module,
                    test_rows,
                    test.num_classes,
                    torch.from_numpy(head.mean),
                    torch.from_numpy(head.std),
                )
                rows.append(
                    {
                        "model": model,
                        "k": k,
                        "draw": d,
                        "scenes": chosen,
                        "val_miou": head.metrics["miou"],
                        "test_miou": cm.miou(),
                        "test_per_class_iou": cm.summary(test.class_names)["iou"],
                        "head_seconds": time.perf_counter() - t2,
                    }
                )
                print(
                    json.dumps({k2: rows[-1][k2] for k2 in ("model", "k", "draw", "test_miou")}),
                    file=sys.stderr,
                )
    summary = {
        m: {
            f"k={k}": {
                "test_miou_mean": float(np.mean(v)),
                "test_miou_std": float(np.std(v)),
                "draws": len(v),
            }
            for k in ks
            if (v := [r["test_miou"] for r in rows if r["model"] == m and r["k"] == k])
        }
        for m in ("random_init", "two_step", "source")
    }
    line = {
        "bench": "two_step_pretraining",
        "summary": summary,
        "compute": compute,
        "pool_scenes": scenes,
        "test_tiles": split(args.test_tiles),
        "test_pixels": int(test.rows("train")),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps({"bench": line["bench"], "summary": summary}))
    out = args.out or work / "two_step.json"
    out.write_text(json.dumps({**line, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
