"""Whole-scene prediction, as ratios against a peer in the same process. Prints one JSON line.

P7: scene pixels/s of ``predict_scene`` (64 px windows, 16 px overlap, ramp blending, chunked
    features, COG + quicklook) vs a DDPM-Seg-style loop: non-overlapping windows, the full
    ``(D, H, W)`` feature volume per window, argmax, the whole map in RAM, one plain GeoTIFF
    write. Also rsdiff with overlap 0, to separate the cost of blending.
P8: peak RSS growth while predicting a 2048 x 512 px scene vs a 512 x 512 px one (rsdiff streams
    row bands, so this should stay near 1; the peer holds the whole map).

    python tests/benchmarks/bench_predict.py

Throughput does not depend on the weights: a fresh tiny UNet and a fresh residual head.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
import ray
import torch
from bench_features import PeakRSS, make_checkpoint

from rsdiff.config import load_config, to_container
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.scenes import SceneRef
from rsdiff.data.synthetic import write_sample_dataset, write_scene
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.features.blocks import list_blocks
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.heads.artifact import TrainedHead, build_head
from rsdiff.heads.config import HeadConfig
from rsdiff.ingest import run_ingest
from rsdiff.prediction.scene import SceneOutputs, WindowPlan, predict_scene

REPO = Path(__file__).resolve().parents[2]


def peer_predict(image: Path, head: TrainedHead, extractor: FeatureExtractor, size: int, out: Path) -> None:
    """DDPM-Seg style: non-overlapping windows, full feature volume, whole map in memory."""
    with rasterio.open(image) as src:
        h, w = src.height, src.width
        labels = np.zeros((h, w), np.uint8)
        for r in [*range(0, h - size + 1, size)]:
            for c in [*range(0, w - size + 1, size)]:
                px = src.read(window=((r, r + size), (c, c + size))).astype(np.float32)
                x = extractor.ddpm.normalizer.torch(torch.from_numpy(px)[None])
                feats = extractor.dense(x)[0]  # (D, size, size)
                pred, _ = head.predict(feats.flatten(1).T)
                labels[r : r + size, c : c + size] = pred.view(size, size).numpy()
        profile = {**src.profile, "count": 1, "dtype": "uint8"}
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(labels[None])


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sample_dataset(tmp / "sample", scenes=2)
        shards = str(tmp / "shards")
        run_ingest(
            load_config(IngestConfig, REPO / "configs/ingest/sample.yaml",
                        [f"inputs=[{tmp / 'sample'}/images/*.tif]", f"output={shards}", "ray.num_cpus=2"])
        )  # fmt: skip
        ray.shutdown()  # measure this process alone
        ckpt = make_checkpoint(shards, tmp / "ckpt")
        ddpm = load_pretrained(ckpt)
        blocks = [b for b in list_blocks(ddpm.model) if b.startswith("up")]
        extractor = FeatureExtractor(ddpm, [50, 150, 250], blocks)
        cfg = HeadConfig()
        head = TrainedHead(
            module=build_head(cfg, extractor.dim, 5).eval(),
            config=to_container(cfg),
            timesteps=extractor.timesteps,
            blocks=extractor.blocks,
            mean=np.zeros(extractor.dim, np.float32),
            std=np.ones(extractor.dim, np.float32),
            classes=read_manifest(shards).classes,
            checkpoint=ckpt,
        )
        small = write_scene(tmp / "scenes", "s512", height=512, width=512, seed=1).image
        tall = write_scene(tmp / "scenes", "s2048", height=2048, width=512, seed=2).image

        def ours(image: Path, overlap: int, tag: str) -> tuple[float, int]:
            outs = SceneOutputs(str(tmp / f"{tag}.tif"), None, str(tmp / f"{tag}.png"))
            base = psutil.Process().memory_info().rss
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                predict_scene(
                    SceneRef(tag, str(image)), head, extractor, WindowPlan(64, overlap), outs, batch_size=4
                )
                seconds = time.perf_counter() - t0
            return seconds, rss.peak - base

        ours(small, 16, "warmup")
        t_ours, _ = ours(small, 16, "ours")
        t_ours0, _ = ours(small, 0, "ours0")
        t0 = time.perf_counter()
        peer_predict(small, head, extractor, 64, tmp / "peer.tif")
        t_peer = time.perf_counter() - t0
        _, mem_small = ours(small, 16, "mem-small")
        _, mem_tall = ours(tall, 16, "mem-tall")
        px = 512 * 512
        out = {
            "P7_rsdiff_vs_ddpmseg_pixels_per_s": t_peer / t_ours,
            "rsdiff_overlap16_mpx_per_s": px / t_ours / 1e6,
            "rsdiff_overlap0_mpx_per_s": px / t_ours0 / 1e6,
            "ddpmseg_mpx_per_s": px / t_peer / 1e6,
            "P8_peak_rss_growth_2048_vs_512_rows": mem_tall / max(mem_small, 1),
            "peak_rss_growth_mb_512": mem_small / 2**20,
            "peak_rss_growth_mb_2048": mem_tall / 2**20,
            "feature_channels": extractor.dim,
        }
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
