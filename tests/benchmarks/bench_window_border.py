"""Window borders: how wide the degraded band is, and what blending recovers. Prints one JSON line.

W1: per-pixel agreement of a window's class with centred prediction (every pixel from a window
    centred within ``step / 2`` px of it), by distance to the window edge, on crops of held-out
    scenes; the band width is where agreement comes within 1 point of the window centre's.
W2: mIoU of ``jobs/predict.py`` + ``jobs/evaluate.py`` on a region of every scene of the split
    (``--w2-scenes`` caps them) with the defaults, plain ramps at overlaps of 1/4, 1/2, 5/8 and
    3/4 window, a border band (overlap window/2, border window/8), and centred prediction
    (overlap window - step, border (window - step)/2): the difference of each against centred
    prediction, with the windows each needed.

    python tests/benchmarks/bench_window_border.py --head runs/dubai/sweep/best \\
        --shards runs/dubai/shards --split test --scenes 3 --crop 192 --step 8 --region 256

The head's checkpoint normalises the scenes; labels come from the ingest's recorded label config.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsdiff.config import build
from rsdiff.data.labels import LabelConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.scenes import SceneReader, SceneRef
from rsdiff.evaluate import EvaluateConfig, run_evaluate
from rsdiff.prediction.border import band_width, border_profile
from rsdiff.prediction.config import PredictConfig
from rsdiff.prediction.run import run_predict
from rsdiff.prediction.scene import make_extractor
from rsdiff.prediction.tasks import load_head_and_checkpoint


def _miou(head: str, images: list[str], labels: LabelConfig, region: list[int], out: Path, **window) -> dict:
    t0 = time.perf_counter()
    pred = run_predict(
        build(
            PredictConfig,
            {
                "head": head,
                "inputs": images,
                "output": str(out),
                "region": region,
                "quicklook": False,
                "tracking": {"enabled": False},
                **window,
            },
        )
    )
    ev = run_evaluate(
        build(EvaluateConfig, {"predictions": pred.output, "labels": labels, "tracking": {"enabled": False}})
    )
    return {
        "miou": ev.metrics["miou"],
        "windows": sum(s["windows"] for s in pred.scenes),
        "seconds": round(time.perf_counter() - t0, 1),
        **window,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--crop", type=int, default=192, help="px square of each scene for W1")
    ap.add_argument("--step", type=int, default=4, help="centred reference stride for W1 (px)")
    ap.add_argument("--windows", type=int, default=24, help="random windows per scene for W1")
    ap.add_argument("--region", type=int, default=256, help="px square of each scene for W2")
    ap.add_argument("--centre-step", type=int, default=8, help="centred prediction stride for W2 (px)")
    ap.add_argument("--w2-scenes", type=int, default=None, help="scenes for W2 (default: all of the split)")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    head, ddpm = load_head_and_checkpoint(args.head)
    extractor = make_extractor(ddpm, head, "fp32")
    manifest = read_manifest(args.shards)
    ids = manifest.scenes[args.split][: args.scenes]
    images = [manifest.scene_files[i]["image"] for i in ids]
    size = int(ddpm.meta["image_size"])
    crops = []
    for i, image in zip(ids, images):
        with SceneReader(SceneRef(i, image)) as reader:
            pixels, _ = reader.read(0, 0, min(args.crop, reader.height), mask=False)
        crop = torch.from_numpy(pixels[:, : args.crop, : args.crop].astype(np.float32))
        crops.append(ddpm.normalizer.torch(crop[None])[0])  # (C, H, W)
    t0 = time.perf_counter()
    profile = border_profile(extractor, head, crops, size, args.step, args.windows)
    band = band_width(profile)
    w1_seconds = time.perf_counter() - t0

    labels = build(LabelConfig, manifest.labels)
    region = [0, 0, args.region, args.region]
    s = args.centre_step
    w2_images = [manifest.scene_files[i]["image"] for i in manifest.scenes[args.split][: args.w2_scenes]]
    settings = {
        "default": {},
        **{
            f"overlap_{o}": {"overlap": o, "border": 0}
            for o in (size // 4, size // 2, 5 * size // 8, 3 * size // 4)
        },
        "border_band": {"overlap": size // 2, "border": size // 8},
        "centred": {"overlap": size - s, "border": (size - s) // 2},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: _miou(args.head, w2_images, labels, region, Path(tmp) / name, **window)
            for name, window in settings.items()
        }
    centred = runs["centred"]["miou"]
    print(
        json.dumps(
            {
                "bench": "window_border",
                "head": args.head,
                "scenes": ids,
                "W1": {
                    **profile.to_json(),
                    "band_px": band,
                    "crop": args.crop,
                    "seconds": round(w1_seconds, 1),
                },
                "W2": {
                    "region": region,
                    "scenes": len(w2_images),
                    "centre_step": s,
                    **runs,
                    "minus_centred_miou_points": {
                        name: round(100 * (r["miou"] - centred), 2) for name, r in runs.items()
                    },
                    "windows_vs_centred": {
                        name: round(r["windows"] / runs["centred"]["windows"], 3) for name, r in runs.items()
                    },
                },
            }
        )
    )


if __name__ == "__main__":
    main()
