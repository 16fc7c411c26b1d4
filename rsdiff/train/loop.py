"""The DDPM training loop run by every Ray Train worker, top to bottom in one function.

Per step: draw ``grad_accum`` micro-batches from the shard stream, noise them at random
timesteps, regress the noise (MSE), clip, AdamW step, EMA update. Every ``log_every`` steps rank 0
logs metrics to the MLflow run its driver opened; every ``checkpoint.every_steps`` steps (and at
the end) rank 0 saves a checkpoint and all ranks hand it, with the metrics, to ``ray.train.report``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.sampling import ddim_sample, denoise_strip, grid, to_rgb
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet
from rsdiff.train import checkpoint
from rsdiff.train.stream import ShardStream

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _inject_fault(cfg: Any, step: int, rank: int) -> None:
    """Test hook: fail once (``raise`` or SIGKILL) at ``debug.fault_step`` on ``debug.fault_rank``."""
    d = cfg.debug
    if d.fault == "none" or step != d.fault_step or rank != d.fault_rank:
        return
    marker = Path(d.fault_marker)
    if marker.exists():
        return
    marker.write_text(f"fault at step {step}")
    if d.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point.

    ``config``: ``cfg`` (resolved PretrainConfig as a dict), ``data`` (shard URIs, bands, size,
    normalisation), ``meta`` (what checkpoints record), ``run_id``/``tracking_uri`` (MLflow).
    """
    import ray.train
    import ray.train.torch

    cfg = OmegaConf.create(config["cfg"])
    data = config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    in_channels, size = int(data["in_channels"]), int(data["image_size"])
    normalizer = Normalizer(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data["normalization"].items()}
    )

    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.model, in_channels, size)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.optim.max_steps)
    )
    start, rng = 0, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = checkpoint.load_state(Path(d))
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        start, rng = int(state["step"]), state.get("rng")
    if isinstance(rng, list) and len(rng) == world:
        torch.set_rng_state(rng[rank])  # continue each rank's noise stream exactly
    else:  # fresh start, or resumed with another world size: distinct, reproducible per rank
        torch.manual_seed(cfg.seed * 1000 + rank * 100_003 + start)

    if cuda and cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    ema.to(device)
    if cfg.perf.compile:
        model = torch.compile(model)
    noise_sched = make_scheduler(cfg.diffusion)
    noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    stream = ShardStream(
        data["shards"],
        rank,
        world,
        normalizer,
        size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=cfg.data.augment,
        seed=cfg.seed + 7919 * start,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cuda,
        persistent_workers=cfg.data.num_workers > 0,
    )
    batches = iter(loader)
    tracker = None
    if rank == 0 and config.get("run_id"):
        from rsdiff.tracking import RunHandle

        tracker = RunHandle(config["tracking_uri"], config["run_id"])
        tracker.log_metrics({"started_at_step": start}, step=start)
        log.info("[rank 0] %s step %d", "resuming from checkpoint at" if start else "starting at", start)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.perf.bf16 else contextlib.nullcontext()
    )
    accum = cfg.optim.grad_accum
    is_ddp = hasattr(model, "no_sync")

    window_loss = torch.zeros((), device=device)
    window_steps, window_data, window_t0 = 0, 0.0, time.perf_counter()
    for step in range(start, cfg.optim.max_steps):
        model.train()
        for micro in range(accum):
            t_wait = time.perf_counter()
            x0 = next(batches).to(device, non_blocking=True)
            if cuda and cfg.perf.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            window_data += time.perf_counter() - t_wait
            noise = torch.randn_like(x0)
            t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],), device=device)
            xt = noise_sched.add_noise(x0, noise, t)
            sync = model.no_sync() if is_ddp and micro < accum - 1 else contextlib.nullcontext()
            with sync, autocast:
                loss = F.mse_loss(model(xt, t).sample.float(), noise) / accum
            loss.backward()
            window_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema_update(ema, _unwrap(model), cfg.optim.ema_decay)
        done = step + 1
        window_steps += 1
        _inject_fault(cfg, done, rank)

        save = done % cfg.checkpoint.every_steps == 0 or done == cfg.optim.max_steps
        if done % cfg.tracking.log_every and not save:
            continue
        if world > 1:
            torch.distributed.all_reduce(window_loss, op=torch.distributed.ReduceOp.AVG)
        elapsed = time.perf_counter() - window_t0
        metrics = {
            "step": done,
            "loss": float(window_loss) / window_steps,
            "lr": sched.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "images_per_s": window_steps * accum * cfg.data.batch_size * world / elapsed,
            "data_wait_fraction": window_data / elapsed,
            "skipped_shard_errors": stream.errors,
        }
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
            if done % cfg.tracking.sample_every == 0 or done == cfg.optim.max_steps:
                _log_pictures(tracker, ema, noise_sched, x0[0].float(), cfg, done)
        log.info(
            "[rank %d] step %d/%d loss %.4f lr %.2e %.1f img/s data-wait %.0f%%",
            rank, done, cfg.optim.max_steps, metrics["loss"], metrics["lr"], metrics["images_per_s"],
            100 * metrics["data_wait_fraction"],
        )  # fmt: skip
        if save:
            rng_states: list[Any] = [torch.get_rng_state()]
            if world > 1:
                rng_states = [None] * world
                torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {
                        "model": _unwrap(model).state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": opt.state_dict(),
                        "lr_schedule": sched.state_dict(),
                        "step": done,
                        "rng": rng_states,  # every rank's torch RNG state
                    }
                    checkpoint.save(
                        Path(tmp), state, {**config["meta"], "step": done, "run_id": config.get("run_id")}
                    )
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{done:08d}")
        # Metrics between checkpoints go to MLflow only: Ray Train's report queue holds one result
        # and its controller drains it about once a second, so a report per log step would stall
        # fast steps for up to a second each.
        window_loss.zero_()
        window_steps, window_data, window_t0 = 0, 0.0, time.perf_counter()


def _log_pictures(
    tracker: Any, ema: torch.nn.Module, sched: Any, x0: torch.Tensor, cfg: Any, step: int
) -> None:
    """A DDIM sample grid from the EMA model and a denoising strip of one training tile."""
    ema.eval()
    shape = (cfg.tracking.sample_count, x0.shape[0], x0.shape[1], x0.shape[2])
    samples = ddim_sample(ema, sched, shape, cfg.tracking.sample_steps, seed=cfg.seed)
    tracker.log_image(grid(to_rgb(samples)), f"samples/step_{step:08d}.png")
    ts = [int(cfg.diffusion.timesteps * f) for f in (0.05, 0.15, 0.25, 0.5, 0.75)]
    xt, x0_hat = denoise_strip(ema, sched, x0, ts, seed=cfg.seed)
    rows = torch.cat([x0.unsqueeze(0).cpu(), xt.cpu(), x0.unsqueeze(0).cpu(), x0_hat.cpu()])
    tracker.log_image(grid(to_rgb(rows), cols=len(ts) + 1), f"denoising/step_{step:08d}.png")
