"""Reading only what a stage uses, as ratios against the whole-object reads rsdiff did before.
Prints one JSON line.

S1: bytes transferred and wall time to predict one 512 x 512 px region of a 4096 x 4096 px
    3-band COG (512 px tiles, deflate) in loopback S3: ``predict_scene(region=...)`` reading by
    window through GDAL vs downloading the object and predicting the same region from local disk.
    Bytes are counted by a proxy between the client and the S3 server. Two regions: one on the
    tile grid (1 tile under it) and one straddling four tiles (the worst case for 512 px).
S2: bytes read to load a checkpoint for inference (an extraction actor's or prediction task's
    start): the EMA artifact ``ema/`` vs the whole ``model.pt`` (model, EMA, AdamW moments), for
    the ``adm256`` preset (and ``tiny``), counted at rsdiff's storage layer.

    python tests/benchmarks/bench_s3_reads.py [--skip-adm256]

Throughput does not depend on the weights: fresh UNets and a fresh residual head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import rasterio
import torch
from _loopback_s3 import start_moto
from bench_features import fresh_head
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage
from rsdiff.config import load_config, to_container
from rsdiff.data.scenes import SceneRef
from rsdiff.diffusion import checkpoint
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.features.blocks import list_blocks
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.prediction.scene import SceneOutputs, WindowPlan, predict_scene
from rsdiff.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
SCENE = 4096
REGIONS = {"aligned": [2048, 2048, 512, 512], "straddling": [1792, 1792, 512, 512]}
CLASSES = {"water": "#1f77b4", "land": "#d2b48c", "road": "#7f7f7f", "building": "#d62728", "veg": "#2ca02c"}


def write_cog(path: Path) -> None:
    """A 4096 px RGB COG of smooth texture (compresses like imagery, not like noise), with overviews."""
    yy, xx = np.mgrid[0:SCENE, 0:SCENE].astype(np.float32)
    rng = np.random.default_rng(0)
    bands = [
        (127 + 60 * np.sin(xx / (40 + 9 * b)) * np.cos(yy / (55 + 7 * b)) + rng.normal(0, 12, xx.shape))
        .clip(0, 255)
        .astype(np.uint8)
        for b in range(3)
    ]
    with rasterio.open(
        path, "w", driver="COG", width=SCENE, height=SCENE, count=3, dtype="uint8", crs="EPSG:32640",
        transform=from_origin(500000, 2800000, 0.5, 0.5), blocksize=512, compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(np.stack(bands))


def tiny_checkpoint(out: Path) -> str:
    """A tiny-preset RGB checkpoint with fresh weights (an EMA artifact beside model.pt)."""
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", ["data.shards=/nowhere"])
    return save_checkpoint(cfg, 64, out)


def save_checkpoint(cfg: PretrainConfig, size: int, out: Path) -> str:
    """Save a checkpoint as pretraining does: model, EMA, AdamW state after one step, schedule."""
    from rsdiff.diffusion.unet import build_unet

    model = build_unet(cfg.model, 3, size)
    ema = build_unet(cfg.model, 3, size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step's moments, without a forward pass at this size
        p.grad = torch.zeros_like(p)
    opt.step()
    plain = to_container(cfg)
    meta = {
        "model": plain["model"], "diffusion": plain["diffusion"], "in_channels": 3, "image_size": size,
        "normalization": {"mean": [120.0] * 3, "std": [40.0] * 3, "scale": 2.0},
        "bands": ["red", "green", "blue"], "dtype": "uint8", "tile_size": size,
        "classes": [{"name": n, "id": i, "colour": c} for i, (n, c) in enumerate(CLASSES.items())],
        "step": 1,
    }  # fmt: skip
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    checkpoint.save(out, state, meta)
    return str(out)


class ReadCounter:
    """Counts bytes rsdiff's storage layer returns (read_bytes/read_text) while active."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self) -> ReadCounter:
        self._orig = storage.read_bytes

        def counted(uri: str) -> bytes:
            data = self._orig(uri)
            self.bytes += len(data)
            return data

        storage.read_bytes = counted  # read_text goes through read_bytes
        return self

    def __exit__(self, *_: object) -> None:
        storage.read_bytes = self._orig


def checkpoint_bytes(ckpt: str) -> dict[str, float]:
    """Bytes and seconds to load ``ckpt`` for inference with and without its EMA artifact."""
    out: dict[str, float] = {}
    with ReadCounter() as new:
        t0 = time.perf_counter()
        load_pretrained(ckpt)
        out["ema_artifact_seconds"] = time.perf_counter() - t0
    os.rename(Path(ckpt) / "ema", Path(ckpt) / "ema.off")  # as a checkpoint of an older rsdiff
    with ReadCounter() as old:
        t0 = time.perf_counter()
        load_pretrained(ckpt)
        out["model_pt_seconds"] = time.perf_counter() - t0
    os.rename(Path(ckpt) / "ema.off", Path(ckpt) / "ema")
    out.update(ema_artifact_bytes=new.bytes, model_pt_bytes=old.bytes, bytes_ratio=new.bytes / old.bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-adm256", action="store_true", help="only the tiny checkpoint (fast)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    endpoint = start_moto("bench")
    out: dict[str, object] = {"bench": "s3_reads", "scene_px": SCENE, "regions": REGIONS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cog = tmp / "scene.tif"
        write_cog(cog)
        boto3.client("s3").upload_file(str(cog), "bench", "scenes/scene.tif")
        uri = "s3://bench/scenes/scene.tif"
        ckpt = tiny_checkpoint(tmp / "ckpt")
        ddpm = load_pretrained(ckpt)
        blocks = [b for b in list_blocks(ddpm.model) if b.startswith("up")][:2]
        extractor = FeatureExtractor(ddpm, [50, 150], blocks)
        head = fresh_head(extractor, ckpt)

        def predict(ref: SceneRef, tag: str, region: list[int]) -> None:
            outputs = SceneOutputs(str(tmp / f"{tag}.tif"), None, str(tmp / f"{tag}.png"))
            predict_scene(ref, head, extractor, WindowPlan(64, 16), outputs, batch_size=8, region=region)

        out["s1_object_bytes"] = cog.stat().st_size
        predict(SceneRef("warm", str(cog)), "warm", REGIONS["aligned"])  # imports, first calls; local
        proxy = FaultyS3Proxy(endpoint, max_faults=0).__enter__()  # counts; one for the whole run
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # (boto3's client keeps the endpoint it was made with)
        for name, region in REGIONS.items():
            proxy.body_bytes.clear()
            t0 = time.perf_counter()
            predict(SceneRef("windowed", uri), f"{name}-windowed", region)
            windowed_s = time.perf_counter() - t0
            windowed_bytes = sum(proxy.body_bytes.values())
            proxy.body_bytes.clear()
            t0 = time.perf_counter()
            with storage.local_copy(uri) as local:  # what rsdiff did before: fetch the object whole
                predict(SceneRef("whole", str(local)), f"{name}-whole", region)
            whole_s = time.perf_counter() - t0
            whole_bytes = sum(proxy.body_bytes.values())
            with (
                rasterio.open(tmp / f"{name}-windowed.tif") as a,
                rasterio.open(tmp / f"{name}-whole.tif") as b,
            ):
                same = bool((a.read() == b.read()).all()) and a.transform == b.transform
            out.update({
                f"s1_{name}_windowed_bytes": windowed_bytes, f"s1_{name}_whole_bytes": whole_bytes,
                f"s1_{name}_bytes_ratio": windowed_bytes / whole_bytes,
                f"s1_{name}_windowed_seconds": windowed_s, f"s1_{name}_whole_seconds": whole_s,
                f"s1_{name}_time_ratio": windowed_s / whole_s, f"s1_{name}_same_map": same,
            })  # fmt: skip
        out.update({f"s2_tiny_{k}": v for k, v in checkpoint_bytes(ckpt).items()})
        if not args.skip_adm256:
            adm = load_config(PretrainConfig, REPO / "configs/pretrain/adm256.yaml", ["data.shards=/nowhere"])
            big = save_checkpoint(adm, 256, tmp / "adm256")
            out.update({f"s2_adm256_{k}": v for k, v in checkpoint_bytes(big).items()})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
