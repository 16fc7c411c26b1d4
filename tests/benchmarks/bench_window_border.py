"""Window borders: how wide the degraded band is, and what blending recovers. Prints one JSON line.

W1: per-pixel agreement of a window's class with centred prediction (every pixel from a window
    centred within ``step / 2`` px of it), by distance to the window edge, on crops of held-out
    scenes; the band width is where agreement comes within 1 point of the window centre's.
W2: mIoU of ``jobs/predict.py`` + ``jobs/evaluate.py`` on the same scenes (a region of each) with
    the defaults (overlap window/2, border window/8), the earlier defaults (overlap window/4, plain
    ramp) and centred prediction (overlap window - step, border (window - step)/2), as the ratio
    and difference against centred prediction, with the windows each needed.

    python tests/benchmarks/bench_window_border.py --head runs/dubai/sweep/best \\
        --shards runs/dubai/shards --split test --scenes 3 --crop 192 --region 256

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
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "default": _miou(args.head, images, labels, region, Path(tmp) / "d"),
            "earlier_default": _miou(
                args.head, images, labels, region, Path(tmp) / "e", overlap=size // 4, border=0
            ),
            "centred": _miou(
                args.head, images, labels, region, Path(tmp) / "c", overlap=size - s, border=(size - s) // 2
            ),
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
                    "centre_step": s,
                    **runs,
                    "default_minus_centred_miou_points": round(100 * (runs["default"]["miou"] - centred), 2),
                    "earlier_minus_centred_miou_points": round(
                        100 * (runs["earlier_default"]["miou"] - centred), 2
                    ),
                    "default_windows_vs_centred": round(
                        runs["default"]["windows"] / runs["centred"]["windows"], 3
                    ),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
