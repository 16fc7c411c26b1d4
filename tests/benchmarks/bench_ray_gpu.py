"""Ray's overhead on a GPU, as ratios against peers run in the same process. Prints one JSON line.

P1-GPU: images/s of ``run_pretrain`` (Ray Train, 1 worker holding the GPU, bf16 autocast,
    channels_last) vs a plain loop on the same GPU running the worker's own pieces
    (``init_training``, ``RankData``, ``train_step``) on the same preset, shards, batch, loader
    workers and precision. Steady state: steps after ``--warmup``. Both report the fraction of step
    time spent waiting for a batch (Ray's from the loop's own ``data_wait_fraction`` metric).
P3-GPU: images/s of ``run_extract`` (Ray Data, one actor holding the GPU, bf16 autocast) vs the
    same actor class called in this process on the same batches, without Ray Data. Steady state:
    the marginal rate between a short and a long run, so the actor start-up (reported apart) cancels.

Goals (README, GPU rows): P1 >= 0.95, P3 >= 0.8 at a batch that keeps the GPU busy.

    python tests/benchmarks/bench_ray_gpu.py [--preset configs/pretrain/adm128.yaml] [--batch 64]
        [--steps 60] [--warmup 15] [--images 2048]
    python tests/benchmarks/bench_ray_gpu.py --dry-run    # CPU, tiny sizes: checks the script runs

The shards are generated (uint16, 4 bands); throughput does not depend on the pixels or weights.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.data.shards import iter_shard
from rsdiff.data.synthetic import write_sample_dataset
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import FeatureActor, _decoder_blocks, actor_plan, run_extract
from rsdiff.ingest import run_ingest
from rsdiff.pretrain import run_pretrain, validate
from rsdiff.train.config import PretrainConfig, TrainPlan
from rsdiff.train.loop import init_training, train_step
from rsdiff.train.rank_data import RankData

REPO = Path(__file__).resolve().parents[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pretrain_config(args: argparse.Namespace, shards: str, tmp: Path, name: str) -> PretrainConfig:
    """The one pretraining config both P1 peers run (Ray's writes its checkpoint and MLflow run)."""
    total = args.warmup + args.steps
    return load_config(
        PretrainConfig, args.preset,
        [f"data.shards={shards}", f"data.batch_size={args.batch}", f"data.num_workers={args.loader_workers}",
         f"model.image_size={args.size}", f"optim.max_steps={total}", f"optim.warmup_steps={args.warmup}",
         f"tracking.log_every={args.warmup}", f"checkpoint.every_steps={total}",
         "tracking.sample_every=1000000", f"run.storage={tmp / 'runs'}", f"run.name={name}",
         f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"scaling.use_gpu={str(args.gpu).lower()}",
         f"scaling.cpus_per_worker={args.cpus}", f"perf.bf16={str(args.gpu).lower()}",
         f"perf.channels_last={str(args.gpu).lower()}", "perf.compile=false"],
    )  # fmt: skip


def ray_train_rate(cfg: PretrainConfig, warmup: int) -> dict[str, float]:
    """Steady images/s and data-wait fraction of ``run_pretrain`` with one worker (MLflow history:
    one window of ``warmup`` steps, then windows of ``log_every`` steps)."""
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(result.tracking_uri)

    def steady(metric: str) -> float:
        values = [m.value for m in client.get_metric_history(result.mlflow_run_id, metric) if m.step > warmup]
        return float(np.mean(values))

    return {"images_per_s": steady("images_per_s"), "data_wait": steady("data_wait_fraction"), "wall_s": wall}


def plain_rate(cfg: PretrainConfig, warmup: int, device: torch.device) -> dict[str, float]:
    """Steady images/s and data-wait fraction of the worker's own pieces in this process."""
    _, facts = validate(cfg)
    plan = TrainPlan(
        model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim, data=cfg.data, perf=cfg.perf,
        tracking=cfg.tracking, checkpoint=cfg.checkpoint, seed=cfg.seed, run_dir="", shards=facts["shards"],
        in_channels=facts["in_channels"], image_size=facts["image_size"],
        normalizer=Normalizer.from_json(facts["normalization"]), meta={},
    )  # fmt: skip
    cuda = device.type == "cuda"
    model, ema, opt, sched, _ = init_training(
        plan.model, plan.optim, plan.in_channels, plan.image_size, device, seed=plan.seed,
        channels_last=plan.perf.channels_last,
    )  # fmt: skip
    noise = make_scheduler(plan.diffusion)
    noise.alphas_cumprod = noise.alphas_cumprod.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    data = RankData(plan, 0, 1, None, 0, 0, pin=cuda)
    amp = torch.bfloat16 if cuda and plan.perf.bf16 else None
    waited, t0 = 0.0, 0.0
    for step in range(cfg.optim.max_steps):
        if step == warmup:
            _sync(device)
            waited, t0 = 0.0, time.perf_counter()
        _, _, wait = train_step(
            model, ema, opt, sched, data.next_batch, noise, gen, timesteps=plan.diffusion.timesteps,
            grad_clip=plan.optim.grad_clip, ema_decay=plan.optim.ema_decay, amp_dtype=amp,
            channels_last=cuda and plan.perf.channels_last,
        )  # fmt: skip
        waited += wait
    _sync(device)
    seconds = time.perf_counter() - t0
    steps = cfg.optim.max_steps - warmup
    return {"images_per_s": steps * cfg.data.batch_size / seconds, "data_wait": waited / seconds}


def extract_config(args: argparse.Namespace, ckpt: str, shards: str, out: Path, images: int) -> ExtractConfig:
    return load_config(
        ExtractConfig, REPO / "configs/extract/tiny.yaml",
        [f"checkpoint={ckpt}", f"shards={shards}", f"output={out}", f"max_images={images}", "splits=[train]",
         f"batch_size={args.extract_batch}", f"num_gpus={1 if args.gpu else 0}", "precision=auto"],
    )  # fmt: skip


def ray_extract_seconds(cfg: ExtractConfig) -> tuple[float, int]:
    """Wall seconds of ``run_extract`` and the images it turned into features."""
    t0 = time.perf_counter()
    table = run_extract(cfg)
    seconds = time.perf_counter() - t0
    return seconds, sum(p["images"] for p in table.parts("train"))


def plain_extract_rate(cfg: ExtractConfig, images: int) -> float:
    """Images/s of :class:`FeatureActor` called in this process on batches of the same tiles (read
    up front, as Ray Data's readers would hand them over), writing the same parts."""
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.extractor import FeatureExtractor

    ddpm = load_pretrained(str(cfg.checkpoint))
    ext = FeatureExtractor(ddpm, list(cfg.timesteps), list(cfg.blocks) or _decoder_blocks(ddpm), 0, "fp32")
    manifest = read_manifest(str(cfg.shards))
    plan = actor_plan(cfg, str(cfg.checkpoint), ddpm, ext, len(manifest.classes or []), str(cfg.output))
    tiles = [s for uri in manifest.shard_uris("train") for s in iter_shard(uri)][:images]
    actor = FeatureActor(plan)
    b = int(cfg.batch_size)
    batches = [_batch(tiles[i : i + b]) for i in range(0, len(tiles), b)]
    actor(batches[0])  # warm: kernels, autocast caches
    t0 = time.perf_counter()
    for batch in batches[1:]:
        actor(batch)
    return (len(tiles) - len(batches[0]["key"])) / (time.perf_counter() - t0)


def _batch(tiles: list) -> dict[str, np.ndarray]:
    """Tiles as the batch Ray Data hands a feature actor (columns key, split, image, label)."""
    return {
        "key": np.array([s.key for s in tiles]),
        "split": np.array(["train"] * len(tiles)),
        "image": np.stack([s.image for s in tiles]),
        "label": np.stack([s.label for s in tiles]),
    }


def make_shards(tmp: Path, tiles: int, size: int) -> str:
    """Generated 4-band scenes of 4 x 4 tiles of ``size`` px, ingested; 10% of scenes to val."""
    scenes = max(4, math.ceil(tiles / 16 / 0.9) + 1)
    write_sample_dataset(tmp / "scenes", scenes=scenes, height=4 * size, width=4 * size)
    shards = str(tmp / "shards")
    run_ingest(load_config(
        IngestConfig, REPO / "configs/ingest/sample.yaml",
        [f"inputs=[{tmp}/scenes/images/*.tif]", f"output={shards}", f"tile_size={size}", "val_fraction=0.1"],
    ))  # fmt: skip
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=str(REPO / "configs/pretrain/adm128.yaml"))
    parser.add_argument("--size", type=int, default=128, help="tile side, px")
    parser.add_argument("--batch", type=int, default=64, help="P1 batch per step")
    parser.add_argument("--steps", type=int, default=60, help="P1 steps timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--loader-workers", type=int, default=6)
    parser.add_argument("--cpus", type=float, default=8, help="CPUs of the Ray Train worker")
    parser.add_argument("--images", type=int, default=2048, help="P3's long run (the short run: 1/8)")
    parser.add_argument("--extract-batch", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset and sizes")
    args = parser.parse_args()
    args.gpu = not args.dry_run
    if args.dry_run:
        args.preset, args.size, args.batch, args.steps, args.warmup = (
            REPO / "configs/pretrain/tiny.yaml",
            32,
            4,
            4,
            2,
        )
        args.loader_workers, args.cpus, args.images, args.extract_batch = 1, 1, 64, 8
    elif not torch.cuda.is_available():
        raise SystemExit("bench_ray_gpu.py: no CUDA device here; run it on a GPU host, or pass --dry-run")
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    device = torch.device("cuda" if args.gpu else "cpu")
    out: dict[str, object] = {
        "bench": "ray_gpu",
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "preset": Path(args.preset).stem,
        "size": args.size,
        "batch": args.batch,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = make_shards(tmp, max(args.images, args.batch * 4), args.size)
        ray_p1 = ray_train_rate(pretrain_config(args, shards, tmp, "p1-ray"), args.warmup)
        plain_p1 = plain_rate(pretrain_config(args, shards, tmp, "p1-plain"), args.warmup, device)
        out.update(p1_ray_images_per_s=ray_p1["images_per_s"], p1_plain_images_per_s=plain_p1["images_per_s"],
                   p1_ratio=ray_p1["images_per_s"] / plain_p1["images_per_s"],
                   p1_ray_data_wait=ray_p1["data_wait"], p1_plain_data_wait=plain_p1["data_wait"],
                   p1_ray_wall_s_incl_startup=ray_p1["wall_s"])  # fmt: skip
        ckpt = str(sorted((tmp / "runs" / "p1-ray").glob("checkpoint_0*"))[-1])
        short = max(args.extract_batch, args.images // 8)
        ray_extract_seconds(extract_config(args, ckpt, shards, tmp / "warm", short))  # imports, caches
        t_short, n_short = ray_extract_seconds(extract_config(args, ckpt, shards, tmp / "short", short))
        t_long, n_long = ray_extract_seconds(extract_config(args, ckpt, shards, tmp / "long", args.images))
        steady = (n_long - n_short) / (t_long - t_short)
        plain = plain_extract_rate(
            extract_config(args, ckpt, shards, tmp / "plain", args.images), args.images
        )
        out.update(p3_images=n_long, p3_ray_data_steady_images_per_s=steady,
                   p3_ray_data_startup_s=t_short - n_short / steady, p3_plain_images_per_s=plain,
                   p3_ratio=steady / plain, p3_ratio_incl_startup=n_long / t_long / plain)  # fmt: skip
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
