"""Pretraining throughput, as ratios against peers run in the same process. Prints one JSON line.

P1: steps/s of rsdiff's Ray Train loop (1 worker, 1 CPU) vs a plain single-process PyTorch loop
    with the same model, batch, optimiser, EMA and shard stream (torch limited to 1 thread too).
P2: samples/s of the shard stream reading from a loopback S3 server vs raw ``tarfile`` iteration
    of the same bytes from local disk, and vs the samples/s the tiny model consumes.
GPU: with ``--gpu``, images/s and MFU of a preset in bf16 (FLOPs from torch.utils.flop_counter).

    python tests/benchmarks/bench_pretrain.py [--steps 60] [--gpu --preset configs/pretrain/adm256.yaml]
"""

from __future__ import annotations

import argparse
import copy
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _loopback_s3 import start_moto

from rsdiff.config import load_config
from rsdiff.data.manifest import read_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet, num_params
from rsdiff.pretrain import run_pretrain
from rsdiff.train.config import PretrainConfig
from rsdiff.train.loop import ema_update
from rsdiff.train.stream import ShardStream

REPO = Path(__file__).resolve().parents[2]


def _stream(cfg, shards: list[str], manifest) -> ShardStream:
    norm = Normalizer.from_stats(manifest.band_stats, cfg.data.norm_scale)
    size = cfg.model.image_size or manifest.tile_size
    return ShardStream(shards, 0, 1, norm, size, cfg.data.shuffle_buffer, augment=True, seed=0)


def plain_loop(cfg, shards: list[str], manifest, steps: int, warmup: int) -> float:
    """Steps/s of a plain PyTorch loop doing what the Ray Train worker does, minus Ray."""
    torch.set_num_threads(1)
    size = cfg.model.image_size or manifest.tile_size
    model = build_unet(cfg.model, manifest.num_bands, size)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    sched = make_scheduler(cfg.diffusion)
    loader = torch.utils.data.DataLoader(
        _stream(cfg, shards, manifest), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers
    )
    it = iter(loader)
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x0 = next(it)["x"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],))
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, cfg.optim.ema_decay)
    return steps / (time.perf_counter() - t0)


def ray_train_loop(cfg_overrides: list[str], tmp: Path, steps: int, warmup: int) -> tuple[float, float]:
    """(steady-state steps/s, wall seconds incl. startup) of run_pretrain with 1 worker."""
    from mlflow import MlflowClient

    total = warmup + steps
    cfg = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/tiny.yaml",
        [
            *cfg_overrides,
            f"optim.max_steps={total}",
            f"tracking.log_every={warmup}",
            f"checkpoint.every_steps={total}",
            "tracking.sample_every=1000000",
            f"run.storage={tmp}/runs",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        ],
    )
    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    hist = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(result.mlflow_run_id, "images_per_s")
    steady = [m.value for m in hist if m.step > warmup]
    return sum(steady) / len(steady) / cfg.data.batch_size, wall


def stream_vs_raw(shards_s3: list[str], shards_local: list[str], cfg, manifest, n: int) -> dict:
    """Samples/s: shard stream over S3 (decode + normalise + augment) vs raw tar iteration."""
    stream = _stream(cfg, shards_s3, manifest)
    stream.shuffle_buffer = 0
    it = iter(stream)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    stream_rate = n / (time.perf_counter() - t0)
    return {
        "stream_s3_samples_per_s": stream_rate,
        "raw_tar_s3_samples_per_s": _raw_tar_rate(shards_s3, n),
        "raw_tar_local_samples_per_s": _raw_tar_rate(shards_local, n),
    }


def _raw_tar_rate(shards: list[str], n: int) -> float:
    """Samples/s of bare ``tarfile`` streaming over the shards, reading each tile's bytes."""
    from rsdiff import storage

    count = 0
    t0 = time.perf_counter()
    while count < n:
        for uri in shards:
            with storage.open_stream(uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith("tile.npy"):
                        tar.extractfile(member).read()
                        count += 1
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--preset", default=str(REPO / "configs/pretrain/adm256.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.gpu:
        from bench_gpu import adm256_mfu  # one GPU step benchmark, shared with bench_gpu.py G2

        result = adm256_mfu(args.batch, args.steps, args.preset)
        print(json.dumps({"bench": "pretrain_gpu", "device": torch.cuda.get_device_name(), **result}))
        return
    import ray

    from rsdiff.data.ingest_config import IngestConfig
    from rsdiff.ingest import run_ingest

    start_moto("bench")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    overrides = ["data.batch_size=8", "data.num_workers=1", "model.image_size=64"]
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        from rsdiff.data.synthetic import write_sample_dataset

        write_sample_dataset(tmpd / "scenes", scenes=8, height=256, width=256)
        for out in (str(tmpd / "shards"), "s3://bench/shards"):
            run_ingest(
                load_config(
                    IngestConfig,
                    REPO / "configs/ingest/sample.yaml",
                    [f"inputs=[{tmpd}/scenes/images/*.tif]", f"output={out}", "val_fraction=0"],
                )
            )
        local, s3 = read_manifest(str(tmpd / "shards")), read_manifest("s3://bench/shards")
        cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", overrides)
        ray_sps, wall = ray_train_loop(
            [*overrides, "data.shards=s3://bench/shards"], tmpd, args.steps, args.warmup
        )
        plain_sps = plain_loop(cfg, s3.shard_uris(), s3, args.steps, args.warmup)
        io = stream_vs_raw(s3.shard_uris(), local.shard_uris(), cfg, s3, n=400)
    consumed = plain_sps * cfg.data.batch_size
    out = {
        "bench": "pretrain",
        "cpus": 2,
        "model_params_m": round(num_params(build_unet(cfg.model, 4, 64)) / 1e6, 3),
        "batch": cfg.data.batch_size,
        "image_size": 64,
        "p1_ray_train_steps_per_s": ray_sps,
        "p1_plain_steps_per_s": plain_sps,
        "p1_ratio": ray_sps / plain_sps,
        "p1_ray_wall_s_incl_startup": wall,
        **io,
        "p2_ratio_vs_raw_tar_s3": io["stream_s3_samples_per_s"] / io["raw_tar_s3_samples_per_s"],
        "p2_ratio_vs_raw_tar_local": io["stream_s3_samples_per_s"] / io["raw_tar_local_samples_per_s"],
        "p2_ratio_vs_model": io["stream_s3_samples_per_s"] / consumed,
    }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
