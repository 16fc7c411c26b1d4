"""Feature extraction and heads, as ratios against peers in the same process. Prints one JSON line.

P3: images/s of the Ray Data extraction (1 actor, 1 CPU) vs a plain in-process loop with the same
    frozen UNet, sampling and part writing (torch limited to 1 thread), in steady state: the
    marginal rate between a 64- and a 512-image run, so the actor start-up (reported apart) cancels.
P4: peak RSS (driver + all Ray workers) of the extraction at 8 vs 64 labeled images.
P5: bytes stored per labeled image vs DDPM-Seg's in-RAM layout (D x H x W float32 per image).
P6: training time of the residual head vs the 10-member DDPM-Seg ensemble on the same rows and
    epochs (both in memory, as fit_head holds them within table.memory_mb), with both val mIoUs;
    for the default residual head and a small one (width 128, depth 1, no channel gate).
P9: sweep throughput in trials per hour on one S3 table (loopback) and search space: trials
    reading a node-local copy and training from in-memory rows vs streaming every pass from S3
    (table.node_cache=false table.memory_mb=0, rsdiff's behaviour before), same process; both
    with one process per trial.
P10: sweep throughput, trials reusing the process of a finished trial (reuse_trial_processes, the
    default) vs one fresh process per trial, node-local copy and in-memory rows in both.

    python tests/benchmarks/bench_features.py [--images 512] [--trials 6] [--sweeps-only]

Throughput does not depend on the weights, so the checkpoint is a freshly initialised tiny UNet.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch

from rsdiff import storage
from rsdiff.config import build, load_config, to_container
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.data.shards import iter_shard
from rsdiff.data.synthetic import write_sample_dataset
from rsdiff.diffusion import checkpoint
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.diffusion.unet import build_unet
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import _image_rng, run_extract, sample_pixels
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.features.parts import write_part
from rsdiff.heads.artifact import TrainedHead, build_head
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.ingest import run_ingest
from rsdiff.train.config import PretrainConfig

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


def fresh_head(extractor: FeatureExtractor, ckpt: str) -> TrainedHead:
    """A default residual head with fresh weights over ``extractor``'s features, for throughput."""
    cfg = build(HeadConfig, {})
    return TrainedHead(
        module=build_head(cfg, extractor.dim, len(extractor.ddpm.meta["classes"])).eval(),
        config=to_container(cfg), timesteps=extractor.timesteps, blocks=extractor.blocks,
        mean=np.zeros(extractor.dim, np.float32), std=np.ones(extractor.dim, np.float32),
        classes=extractor.ddpm.meta["classes"], checkpoint=ckpt,
    )  # fmt: skip


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


def sweep_trials_per_hour(table_uri: str, tmp: Path, trials: int, tag: str, *extra: str) -> float:
    """Trials per hour of a FIFO sweep of ``trials`` samples (2 at a time) over ``table_uri``."""
    from rsdiff.sweep.config import SweepConfig
    from rsdiff.sweep.run import run_sweep

    overrides = [
        f"features={table_uri}", f"output={tmp / tag}", f"storage={tmp / 'tune'}", f"name=bench-{tag}",
        f"tracking.uri=sqlite:///{tmp / 'sweep.db'}", "scheduler=fifo", f"num_samples={trials}",
        "max_concurrent_trials=2", "head.epochs=5", "head.patience=5", "search.width=[128,256]",
        "search.depth=[1,2]", f"table.cache_dir={tmp / 'node-cache'}", *extra,
    ]  # fmt: skip
    cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", overrides)
    t0 = time.perf_counter()
    run_sweep(cfg)
    return trials / (time.perf_counter() - t0) * 3600


def main() -> None:
    import argparse

    from _loopback_s3 import start_moto

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512, help="P3's long run (>= 512 for steady state)")
    parser.add_argument("--trials", type=int, default=6, help="P9's and P10's trials per sweep")
    parser.add_argument("--sweeps-only", action="store_true", help="P9 and P10 only (minutes, not an hour)")
    args = parser.parse_args()
    start_moto("bench")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, object] = {"bench": "features", "cpus": 2, "tile": 64}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        scenes = max(12, math.ceil(args.images / 16 / 0.8) + 2)  # 16 tiles per scene, 20% to val
        write_sample_dataset(t / "scenes", scenes=scenes, height=256, width=256)
        shards = str(t / "shards")
        ingest = [f"inputs=[{t}/scenes/images/*.tif]", f"output={shards}", "val_fraction=0.2"]
        run_ingest(load_config(IngestConfig, REPO / "configs/ingest/sample.yaml", ingest))
        ckpt = make_checkpoint(shards, t / "ckpt")
        if not args.sweeps_only:
            extraction_figures(ckpt, shards, t, args.images, out)
        # P6, P9 and P10 on a train + val table of 192 images per split, written to (loopback) S3.
        extract = [f"checkpoint={ckpt}", f"shards={shards}", "output=s3://bench/full", "max_images=192"]
        full = run_extract(load_config(ExtractConfig, REPO / "configs/extract/tiny.yaml", extract))
        if not args.sweeps_only:
            head_figures(full, t, out)
        sweep_figures(full, t, args.trials, out)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


def extraction_figures(ckpt: str, shards: str, t: Path, images: int, out: dict[str, object]) -> None:
    """P3, P4 and P5 into ``out``."""
    ray_extract(ckpt, shards, str(t / "warm"), 8)  # warm caches and imports
    _, rss8, _ = ray_extract(ckpt, shards, str(t / "f8"), 8)
    r64, rss64, table = ray_extract(ckpt, shards, str(t / "f64"), 64)
    r_long, _, _ = ray_extract(ckpt, shards, str(t / "flong"), images)
    t64, t_long = 64 / r64, images / r_long
    steady = (images - 64) / (t_long - t64)
    plain = plain_extract(ckpt, shards, str(t / "plain"), images)
    out.update(
        p3_images=images,
        p3_ray_data_steady_images_per_s=steady,
        p3_ray_data_startup_s=t64 - 64 / steady,
        p3_ray_data_images_per_s_incl_startup=r_long,
        p3_plain_images_per_s=plain,
        p3_ratio=steady / plain,
        p3_ratio_incl_startup=r_long / plain,
        p4_peak_rss_mb_8=rss8 / 2**20,
        p4_peak_rss_mb_64=rss64 / 2**20,
        p4_ratio=rss64 / rss8,
    )
    stored = sum(len(storage.read_bytes(u)) for u in storage.list_uris(str(t / "f64" / "parts")))
    per_image = stored / sum(p["images"] for p in table.meta["parts"])
    ddpmseg = table.meta["dim"] * 64 * 64 * 4
    out.update(
        p5_dim=table.meta["dim"],
        p5_bytes_per_image=per_image,
        p5_ddpmseg_bytes_per_image=ddpmseg,
        p5_ratio=per_image / ddpmseg,
        p5_ratio_at_256px_same_rows=per_image / (table.meta["dim"] * 256 * 256 * 4),
    )


def head_figures(full: Any, t: Path, out: dict[str, object]) -> None:
    """P6 into ``out``: the heads on ``full``'s rows, in memory."""
    out["p6_rows"] = full.rows("train")
    local = full.cached(TableCacheConfig(cache_dir=str(t / "p6-cache")))
    heads = {
        "residual": {"kind": "residual"},  # the defaults: width 256, depth 2, channel gate
        "residual_small": {"kind": "residual", "width": 128, "depth": 1, "gate": False},
        "ensemble": {"kind": "ensemble"},
    }
    for name, settings in heads.items():
        cfg = build(HeadConfig, {**settings, "epochs": 5, "patience": 5})
        t0 = time.perf_counter()
        head = fit_head(local, full.index.timesteps, full.index.blocks, cfg)
        out[f"p6_{name}_seconds"] = time.perf_counter() - t0
        out[f"p6_{name}_val_miou"] = head.metrics["miou"]
    for name in ("residual", "residual_small"):
        out[f"p6_time_ratio_{name}_vs_ensemble"] = out[f"p6_{name}_seconds"] / out["p6_ensemble_seconds"]


def sweep_figures(full: Any, t: Path, trials: int, out: dict[str, object]) -> None:
    """P9 and P10 into ``out``: three sweeps of ``trials`` over ``full``."""
    streamed = ["table.node_cache=false", "table.memory_mb=0", "reuse_trial_processes=false"]
    before = sweep_trials_per_hour(full.root, t, trials, "before", *streamed)
    fresh = sweep_trials_per_hour(full.root, t, trials, "fresh", "reuse_trial_processes=false")
    after = sweep_trials_per_hour(full.root, t, trials, "after")
    out.update(p9_trials=trials, p9_trials_per_hour_before=before, p9_trials_per_hour_after=fresh,
               p9_ratio=fresh / before, p10_trials_per_hour_one_process_per_trial=fresh,
               p10_trials_per_hour_reused=after, p10_ratio=after / fresh)  # fmt: skip


if __name__ == "__main__":
    main()
