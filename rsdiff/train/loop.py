"""The DDPM training loop run by every Ray Train worker.

Per step (:func:`train_step`): draw ``grad_accum`` micro-batches from the shard stream, noise them
at random timesteps, regress the noise (MSE), clip, AdamW step, EMA update. Noise and timesteps
come from a generator on the training device, seeded per rank; its state, the CPU and CUDA
default generators' states and each data slot's stream position are saved per rank in every
checkpoint and restored on resume, so an interrupted run sees the same batches and draws the same
noise as an uninterrupted one. Every ``log_every`` steps rank 0 logs metrics to the MLflow run its
driver opened (after a restart, the steps replayed from the checkpoint are not logged twice) and, at
every (re)start, which node each rank runs on; every ``checkpoint.every_steps`` steps (and at the
end) rank 0 saves a checkpoint and all ranks hand it, with the metrics, to ``ray.train.report``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rsdiff import devices
from rsdiff.diffusion import checkpoint
from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.sampling import ddim_sample, denoise_strip
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet, checkpoint_activations, epsilon
from rsdiff.train import names
from rsdiff.train.compiled import CompileWatch, compile_unet
from rsdiff.train.config import OptimConfig, TrainPlan
from rsdiff.train.rank_data import RankData
from rsdiff.train.upload import checkpoint_uploader
from rsdiff.viz import enlarge, grid, labelled, model_rgb

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters (one fused ``_foreach_lerp_``,
    ``ema`` kept in the model's memory format); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def diffusion_loss(
    model: torch.nn.Module,
    noise_sched: Any,
    x0: torch.Tensor,
    gen: torch.Generator | None,
    timesteps: int,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE of ``model`` on ``(B, C, H, W)`` images ``x0`` in [-1, 1].

    Noise and timesteps (uniform in ``[0, timesteps)``) are drawn from ``gen`` on ``x0``'s device.
    """
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, timesteps, (x0.shape[0],), generator=gen, device=x0.device)
    xt = noise_sched.add_noise(x0, noise, t)
    with devices.autocast(x0.device, amp_dtype):
        pred = epsilon(model(xt, t).sample, x0.shape[1])
    return F.mse_loss(pred.float(), noise)


def train_step(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    lr_sched: Any,
    next_batch: Callable[[], torch.Tensor],
    noise_sched: Any,
    gen: torch.Generator | None,
    *,
    timesteps: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser step over ``grad_accum`` micro-batches from ``next_batch()``.

    Everything is made on the device of ``model``'s parameters. Returns ``(loss, grad_norm,
    data_wait_s)``: the mean micro-batch loss and the pre-clip gradient norm as 0-d tensors on
    that device (no host sync here), and the seconds spent waiting for batches.
    """
    device = next(model.parameters()).device
    is_ddp = hasattr(model, "no_sync")
    model.train()
    total = torch.zeros((), device=device)
    waited = 0.0
    for micro in range(grad_accum):
        t_wait = time.perf_counter()
        x0 = next_batch().to(device, non_blocking=True)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        waited += time.perf_counter() - t_wait
        sync = model.no_sync() if is_ddp and micro < grad_accum - 1 else contextlib.nullcontext()
        with sync:
            loss = diffusion_loss(model, noise_sched, x0, gen, timesteps, amp_dtype) / grad_accum
            loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    lr_sched.step()
    ema_update(ema, _unwrap(model), ema_decay)
    return total, grad_norm, waited


def init_training(
    model_cfg: ModelConfig,
    optim: OptimConfig,
    in_channels: int,
    size: int,
    device: torch.device,
    state: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    channels_last: bool = False,
    initial: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, Any, int]:
    """``(model, ema, optimizer, lr_schedule, step)`` on ``device``, resumed from ``state`` if given,
    else starting from the weights ``initial`` (model and EMA alike) if given.

    The model moves to ``device`` (channels_last on CUDA when ``channels_last``) *before* the
    optimiser is built and its state loaded, so AdamW's moments live beside the weights. Every
    rank starts from the same weights (seeded with ``seed``). ``size`` is the crop side in px.
    """
    torch.manual_seed(seed)
    model = build_unet(model_cfg, in_channels, size)
    if state is None and initial is not None:
        model.load_state_dict(initial)
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, optim.warmup_steps, optim.max_steps)
    )
    ema = copy.deepcopy(model).requires_grad_(False)  # same device and memory format as the model
    if state is None:
        return model, ema, opt, sched, 0
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["lr_schedule"])
    return model, ema, opt, sched, int(state["step"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def resume_state(run_dir: str, latest: Any) -> dict[str, Any] | None:
    """The training state to resume from: Ray Train's latest checkpoint, or, when that one cannot
    be loaded (corrupt or truncated ``model.pt``), the newest earlier complete checkpoint in the run
    folder (the steps after it are saved under fresh folder names: :mod:`rsdiff.train.names`).
    None when the run starts fresh.

    Raises:
        CheckpointError: no checkpoint of the run can be loaded.
    """
    from rsdiff import storage
    from rsdiff.errors import CheckpointError

    if latest is None:
        return None
    try:
        with latest.as_directory() as d:
            return checkpoint.load_state(Path(d))
    except CheckpointError as exc:
        log.warning("the latest checkpoint cannot be loaded (%s); trying the earlier ones", exc)
    broken = storage.name(str(latest.path))
    folders = sorted({storage.parent(u) for u in storage.list_uris(run_dir, checkpoint.META)}, reverse=True)
    for folder in folders:
        if storage.name(folder) == broken or not storage.name(folder).startswith("checkpoint_"):
            continue
        with tempfile.TemporaryDirectory(prefix="rsdiff-resume-") as tmp:
            try:
                storage.download(storage.join(folder, checkpoint.WEIGHTS), Path(tmp) / checkpoint.WEIGHTS)
                state = checkpoint.load_state(Path(tmp))
            except (CheckpointError, storage.NotFoundError) as exc:
                log.warning("checkpoint %s cannot be loaded either (%s)", storage.display(folder), exc)
                continue
        log.warning("resuming from %s instead of the unreadable %s", storage.display(folder), broken)
        return state
    raise CheckpointError(
        f"no checkpoint of {storage.display(run_dir)} can be loaded (the latest, {broken}, is corrupt); "
        "delete the run folder to start over or pick another run.name"
    )


def train_loop_per_worker(plan: TrainPlan) -> None:
    """Ray Train entry point: train as ``plan`` says (see :class:`~rsdiff.train.config.TrainPlan`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if cuda:
        devices.enable_tf32()
    state = resume_state(plan.run_dir, ray.train.get_checkpoint())
    taken = names.registered(plan.run_dir) if state is not None else set()  # before any rank saves
    model, ema, opt, sched, start = _start_training(plan, state, device)
    # Distinct, reproducible streams per rank; on resume (same world size) each rank continues
    # its own streams exactly, whatever the loader setup below draws.
    run_seed = plan.seed * 1000 + rank * 100_003 + start
    torch.manual_seed(run_seed)
    gen = devices.generator(device, run_seed)
    checkpoint_activations(model, list(plan.perf.checkpoint_levels))
    model = ray.train.torch.prepare_model(model)
    if plan.perf.compile:  # compiles at the first call
        model = compile_unet(model, plan.perf.compile_scope)
    noise_sched = make_scheduler(plan.diffusion)
    noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    data = RankData(plan, rank, world, (state or {}).get("stream"), start, run_seed, pin=cuda)
    rank_rng = _saved_rng(state, rank, world)
    if rank_rng is not None:
        devices.set_rng_state(rank_rng, gen, device)
    tracker, logged_through = _open_tracking(plan, rank, start, placement(world))
    amp_dtype = devices.autocast_dtype("bf16" if plan.perf.bf16 else "fp32", device) if cuda else None
    window = _Window(device)
    watch = CompileWatch() if plan.perf.compile else None
    for step in range(start, plan.optim.max_steps):
        loss, grad_norm, waited = train_step(
            model, ema, opt, sched, data.next_batch, noise_sched, gen,
            timesteps=plan.diffusion.timesteps, grad_accum=plan.optim.grad_accum,
            grad_clip=plan.optim.grad_clip, ema_decay=plan.optim.ema_decay, amp_dtype=amp_dtype,
            channels_last=cuda and plan.perf.channels_last,
        )  # fmt: skip
        window.add(loss, waited)
        if watch is not None:
            watch.step_done(waited)
        done = step + 1
        if plan.after_step is not None:
            plan.after_step(done, rank, plan)
        save = done % plan.checkpoint.every_steps == 0 or done == plan.optim.max_steps
        if done % plan.tracking.log_every and not save:
            continue
        metrics = window.metrics(done, sched.get_last_lr()[0], grad_norm, plan, world, data.errors)
        metrics.update(watch.metrics() if watch is not None else {})
        if tracker is not None and done > logged_through:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
            if done % plan.tracking.sample_every == 0 or done == plan.optim.max_steps:
                _log_pictures(tracker, ema, noise_sched, data.last_image.float(), plan, done)
        per_step = plan.optim.grad_accum * plan.data.batch_size * world / metrics["images_per_s"]
        log.info(
            "[rank %d] step %d/%d loss %.4f lr %.2e %.1f img/s data-wait %.0f%% eta %s",
            rank, done, plan.optim.max_steps, metrics["loss"], metrics["lr"], metrics["images_per_s"],
            100 * metrics["data_wait_fraction"], eta_text((plan.optim.max_steps - done) * per_step),
        )  # fmt: skip
        if save:
            here = {"rng": devices.rng_state(gen, device), "stream": data.position()}
            name = names.checkpoint_name(done, taken)
            _save_checkpoint(plan, rank, world, (done, name), (model, ema, opt, sched), here, metrics)
        # Metrics between checkpoints go to MLflow only: Ray Train's report queue holds one result
        # and its controller drains it about once a second, so a report per log step would stall
        # fast steps for up to a second each.
        window.reset()


def _start_training(
    plan: TrainPlan, state: dict[str, Any] | None, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, Any, int]:
    """:func:`init_training` as ``plan`` says: resumed from ``state``, else from ``plan.init``'s
    band-adapted weights where given, else from scratch."""
    initial = None
    if state is None and plan.init is not None:  # a fresh run from existing weights
        from rsdiff.diffusion.sources import load_source

        initial, _ = load_source(str(plan.init.from_), plan.init).adapted(plan.in_channels, plan.init)
    return init_training(
        plan.model, plan.optim, plan.in_channels, plan.image_size, device, state, seed=plan.seed,
        channels_last=plan.perf.channels_last, initial=initial,
    )  # fmt: skip


def _saved_rng(state: dict[str, Any] | None, rank: int, world: int) -> dict[str, Any] | None:
    """This rank's saved generator states, or None (fresh, or the world size changed)."""
    rng = state.get("rng") if state is not None else None
    rank_rng = rng[rank] if isinstance(rng, list) and len(rng) == world else None
    if isinstance(rank_rng, torch.Tensor):  # checkpoints before per-device generators: CPU state only
        rank_rng = {"cpu": rank_rng}
    return rank_rng


def _open_tracking(plan: TrainPlan, rank: int, start: int, nodes: list[str]) -> tuple[Any, int]:
    """``(tracker, logged_through)``: rank 0's handle on the driver's MLflow run (None elsewhere or
    untracked) and the last step already logged there (a restart replays the steps after its
    checkpoint without logging them again). Logs where each rank runs."""
    if rank != 0:
        return None, 0
    where = ", ".join(f"rank {r} on {n}" for r, n in enumerate(nodes))
    what = "resuming from checkpoint at" if start else "starting at"
    log.info("[rank 0] %s step %d; %s", what, start, where)
    if not plan.run_id:
        return None, 0
    from rsdiff.tracking import RunHandle

    tracker = RunHandle(plan.tracking_uri, plan.run_id)
    tracker.log_metrics({"started_at_step": start}, step=start)
    tracker.set_tags({f"rsdiff.placement.from_step_{start:08d}": json.dumps(nodes)})
    logged_through = tracker.last_step("loss") if start else 0
    if logged_through > start:
        log.info("[rank 0] steps %d-%d ran before the restart: replayed from the checkpoint, "
                 "not logged again", start + 1, logged_through)  # fmt: skip
    return tracker, logged_through


def eta_text(seconds: float) -> str:
    """Time left, as a step line shows it: ``45s``, ``12m05s``, ``3h07m``, ``2d04h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class _Window:
    """The steps since the last log line: their summed loss (on the device, no host sync per
    step), the seconds spent waiting for data, and the wall time."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.data_s, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, waited_s: float) -> None:
        self.loss += loss
        self.data_s += waited_s
        self.steps += 1

    def metrics(
        self, done: int, lr: float, grad_norm: torch.Tensor, plan: TrainPlan, world: int, errors: int
    ) -> dict[str, float]:
        """The window's metrics at step ``done``; the loss averaged over ranks (a collective)."""
        if world > 1:
            torch.distributed.all_reduce(self.loss, op=torch.distributed.ReduceOp.AVG)
        elapsed = time.perf_counter() - self.t0
        images = self.steps * plan.optim.grad_accum * plan.data.batch_size * world
        return {
            "step": done,
            "loss": float(self.loss) / self.steps,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "images_per_s": images / elapsed,
            "data_wait_fraction": self.data_s / elapsed,
            "skipped_shard_errors": errors,
        }


def _save_checkpoint(
    plan: TrainPlan, rank: int, world: int, at: tuple[int, str], training: tuple, here: dict, metrics: dict
) -> None:
    """Gather every rank's generator and stream state ``here``, let rank 0 write the checkpoint of
    ``training`` = ``(model, ema, optimizer, lr_schedule)`` at ``at`` = ``(step, folder name)`` and
    hand it to Ray Train (a collective)."""
    import ray.train

    done, name = at
    model, ema, opt, sched = training
    ranks: list[Any] = [here]
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, here)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            _check_lease(plan, done)
            state = {
                "model": _unwrap(model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "lr_schedule": sched.state_dict(),
                "step": done,
                "rng": [r["rng"] for r in ranks],  # per rank: CPU, CUDA, noise generators
                "stream": [r["stream"] for r in ranks],  # per rank: where each slot stands
            }
            meta = {**plan.meta, "step": done, "run_id": plan.run_id, "writer": plan.lease_owner}
            checkpoint.save(Path(tmp), state, meta)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        upload = checkpoint_uploader(plan.run_dir)  # S3: complete or failed, never partial
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name, checkpoint_upload_fn=upload)


def _check_lease(plan: TrainPlan, done: int) -> None:
    """Raise :class:`~rsdiff.lease.LeaseLost` instead of writing the checkpoint of step ``done``
    when another job holds the run folder's lease now (the driver stops the run when it notices)."""
    from rsdiff.lease import LeaseLost, holder

    if plan.lease_uri is None:
        return
    now = holder(plan.lease_uri)
    if now != plan.lease_owner:
        raise LeaseLost(
            f"not writing the checkpoint of step {done}: the lease {plan.lease_uri} is held by "
            f"{'another job' if now else 'no job'} now"
        )


def placement(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [here]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, here)
    return [str(n) for n in nodes]


EARLY_SAMPLE_STEPS = 5000  # below this many steps, unconditional samples are expected to look like noise


def sample_title(step: int, ddim_steps: int) -> str:
    """The sample grid's title: the step, and early on that noise-like samples are expected (a DDPM
    needs thousands of steps before its samples look like imagery; a first run reads noise as broken)."""
    title = f"EMA samples at step {step} ({ddim_steps} DDIM steps)"
    if step < EARLY_SAMPLE_STEPS:
        title += f": early, samples look like noise until about {EARLY_SAMPLE_STEPS} steps"
    return title


def _log_pictures(
    tracker: Any, ema: torch.nn.Module, sched: Any, x0: torch.Tensor, plan: TrainPlan, step: int
) -> None:
    """A DDIM sample grid from the EMA model and a denoising strip of one training tile, each titled
    with the training step (the strip's columns name their timestep, its rows what they show)."""
    ema.eval()
    shape = (plan.tracking.sample_count, x0.shape[0], x0.shape[1], x0.shape[2])
    samples = ddim_sample(ema, sched, shape, plan.tracking.sample_steps, seed=plan.seed)
    title = sample_title(step, plan.tracking.sample_steps)
    tracker.log_image(labelled(enlarge(grid(model_rgb(samples)), 256), title), f"samples/step_{step:08d}.png")
    ts = [int(plan.diffusion.timesteps * f) for f in (0.05, 0.15, 0.25, 0.5, 0.75)]
    xt, x0_hat = denoise_strip(ema, sched, x0, ts, seed=plan.seed)
    rows = torch.cat([x0.unsqueeze(0).cpu(), xt.cpu(), x0.unsqueeze(0).cpu(), x0_hat.cpu()])
    strip = enlarge(grid(model_rgb(rows), cols=len(ts) + 1), 200)
    strip = labelled(strip, f"EMA one-step denoising at step {step}", ["original", *(f"t={t}" for t in ts)],
                     ["noised x_t", "estimate of x_0"])  # fmt: skip
    tracker.log_image(strip, f"denoising/step_{step:08d}.png")
