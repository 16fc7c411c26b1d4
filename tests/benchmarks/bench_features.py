"""Feature extraction and heads, as ratios against peers in the same process. Prints one JSON line.

P3: images/s of the Ray Data extraction (1 actor, 1 CPU) vs a plain in-process loop with the same
    frozen UNet, sampling and part writing (torch limited to 1 thread).
P4: peak RSS (driver + all Ray workers) of the extraction at 8 vs 64 labeled images.
P5: bytes stored per labeled image vs DDPM-Seg's in-RAM layout (D x H x W float32 per image).
P6: training time of the residual head vs the 10-member DDPM-Seg ensemble on the same rows, with
    both val mIoUs.

    python tests/benchmarks/bench_features.py

Throughput does not depend on the weights, so the checkpoint is a freshly initialised tiny UNet.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

from rsdiff import storage
from rsdiff.config import build, load_config, to_container
from rsdiff.data.manifest import read_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.data.shards import iter_shard
from rsdiff.data.synthetic import write_sample_dataset
from rsdiff.diffusion.unet import build_unet
from rsdiff.features.extract import ExtractConfig, _image_rng, run_extract, sample_pixels
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.features.table import write_part
from rsdiff.heads.artifact import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.ingest import IngestConfig, run_ingest
from rsdiff.pretrain import PretrainConfig
from rsdiff.train import checkpoint
from rsdiff.train.checkpoint import load_pretrained

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(shards: str, out: Path) -> str:
    """A tiny-preset checkpoint with fresh weights, as pretraining would write it."""
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [f"data.shards={shards}"])
    manifest = read_manifest(shards)
    model = build_unet(cfg.model, manifest.num_bands, 64)
    plain = to_container(cfg)
    meta = {
        "model": plain["model"],
        "diffusion": plain["diffusion"],
        "in_channels": manifest.num_bands,
        "image_size": 64,
        "normalization": Normalizer.from_stats(manifest.band_stats, 2.0).to_json(),
        "bands": manifest.bands,
        "dtype": manifest.dtype,
        "tile_size": manifest.tile_size,
        "classes": manifest.classes,
        "shards": shards,
        "step": 0,
    }
    checkpoint.save(out, {"model": model.state_dict(), "ema": model.state_dict(), "step": 0}, meta)
    return str(out)


class PeakRSS:
    """Samples the summed RSS of this process and every Ray worker process every 0.1 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    if (p.info["name"] or "").startswith("ray::"):
                        total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_extract(ckpt: str, shards: str, out: str, images: int) -> tuple[float, int, object]:
    cfg = load_config(
        ExtractConfig,
        REPO / "configs/extract/tiny.yaml",
        [f"checkpoint={ckpt}", f"shards={shards}", f"output={out}", f"max_images={images}", "splits=[train]"],
    )
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        table = run_extract(cfg)
        seconds = time.perf_counter() - t0
    return images / seconds, rss.peak, table


def plain_extract(ckpt: str, shards: str, out: str, images: int, batch: int = 8) -> float:
    torch.set_num_threads(1)
    ddpm = load_pretrained(ckpt)
    ext = FeatureExtractor(ddpm, [50, 150, 250], [b for b in ("up0.res0", "up0.res1", "up1.res0", "up1.res1",
                                                            "up2.res0", "up2.res1")])  # fmt: skip
    tiles = []
    for uri in read_manifest(shards).shard_uris("train"):
        tiles += list(iter_shard(uri))
    tiles = tiles[:images]
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch):
        chunk = tiles[i : i + batch]
        rc = [sample_pixels(s.label, 5, 64, _image_rng(s.key, 0)) for s in chunk]
        x = torch.from_numpy(np.stack([ddpm.normalizer(s.image) for s in chunk]))
        feats = ext.sample(x, [torch.from_numpy(r) for r, _ in rc], [torch.from_numpy(c) for _, c in rc])
        write_part(out, "train", {
            "features": torch.cat(feats).half().numpy(),
            "labels": np.concatenate([s.label[r, c] for s, (r, c) in zip(chunk, rc)]),
            "image": np.concatenate([np.full(len(r), s.key) for s, (r, _) in zip(chunk, rc)]),
            "rows": np.concatenate([r for r, _ in rc]), "cols": np.concatenate([c for _, c in rc]),
        }, 5)  # fmt: skip
    return len(tiles) / (time.perf_counter() - t0)


def main() -> None:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, object] = {"bench": "features", "cpus": 2, "tile": 64}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_sample_dataset(t / "scenes", scenes=12, height=256, width=256)
        shards = str(t / "shards")
        ingest = [f"inputs=[{t}/scenes/images/*.tif]", f"output={shards}", "val_fraction=0.34"]
        run_ingest(load_config(IngestConfig, REPO / "configs/ingest/sample.yaml", ingest))
        ckpt = make_checkpoint(shards, t / "ckpt")
        ray_extract(ckpt, shards, str(t / "warm"), 8)  # warm caches and imports
        _, rss8, _ = ray_extract(ckpt, shards, str(t / "f8"), 8)
        r64, rss64, table = ray_extract(ckpt, shards, str(t / "f64"), 64)
        plain = plain_extract(ckpt, shards, str(t / "plain"), 64)
        out.update(
            p3_ray_data_images_per_s=r64,
            p3_plain_images_per_s=plain,
            p3_ratio=r64 / plain,
            p4_peak_rss_mb_8=rss8 / 2**20,
            p4_peak_rss_mb_64=rss64 / 2**20,
            p4_ratio=rss64 / rss8,
        )
        stored = sum(len(storage.read_bytes(u)) for u in storage.list_uris(str(t / "f64" / "parts")))
        images = sum(p["images"] for p in table.meta["parts"])
        ddpmseg = table.meta["dim"] * 64 * 64 * 4
        out.update(
            p5_dim=table.meta["dim"],
            p5_bytes_per_image=stored / images,
            p5_ddpmseg_bytes_per_image=ddpmseg,
            p5_ratio=stored / images / ddpmseg,
            p5_ratio_at_256px_same_rows=stored / images / (table.meta["dim"] * 256 * 256 * 4),
        )
        # P6 on the full table (train + val) of a freshly extracted superset.
        extract = [f"checkpoint={ckpt}", f"shards={shards}", f"output={t / 'full'}"]
        full = run_extract(load_config(ExtractConfig, REPO / "configs/extract/tiny.yaml", extract))
        for kind in ("residual", "ensemble"):
            cfg = build(HeadConfig, {"kind": kind, "epochs": 5, "patience": 5})
            t0 = time.perf_counter()
            head = fit_head(full, full.index.timesteps, full.index.blocks, cfg)
            out[f"p6_{kind}_seconds"] = time.perf_counter() - t0
            out[f"p6_{kind}_val_miou"] = head.metrics["miou"]
        out["p6_time_ratio_residual_vs_ensemble"] = out["p6_residual_seconds"] / out["p6_ensemble_seconds"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
