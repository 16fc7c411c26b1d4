"""The pretraining step eager vs compiled (``blocks`` and ``model`` scopes), and the batch and
activation-checkpointing sweep, as ratios against peers run in the same process. One JSON line.

Each variant runs rsdiff's own step (``rsdiff.train.loop.train_step``: noise, bf16 autocast on
CUDA, backward, clipping, AdamW, EMA) on one fixed batch already on the device, so the figures
are the model's, not the input pipeline's. Compile seconds are the first step's wall time minus
one steady step; every variant starts with dynamo reset and empty inductor and Triton caches, so
no variant reuses another's compiled code. Per variant: compile seconds, steady images/s, graphs,
recompiles and graph breaks after the first step (:class:`rsdiff.train.compiled.CompileWatch`),
losses over the timed steps (finite, and the compiled ones against eager), and on a GPU the peak
memory beside rsdiff's estimate, and MFU (FLOPs counted by ``torch.utils.flop_counter``, against
the chip's dense bf16 peak, printed). The data-wait fraction is the training loop's own metric
(``data_wait_fraction`` in MLflow); here the batch never leaves the device.

    python tests/benchmarks/bench_compile.py                      # CPU: tiny preset, batch 8
    python tests/benchmarks/bench_compile.py --gpu --batch 0 --steps 50 \\
        --preset configs/pretrain/tiny.yaml,configs/pretrain/adm128.yaml,configs/pretrain/adm256.yaml \\
        --sweep 32,64,96 --sweep-levels none,0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from rsdiff import devices
from rsdiff.config import load_config
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import checkpoint_activations
from rsdiff.train.compiled import CompileWatch, compile_unet
from rsdiff.train.config import CompileScope, PretrainConfig
from rsdiff.train.loop import init_training, train_step
from rsdiff.train.memory import estimate_training_memory

REPO = Path(__file__).resolve().parents[2]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def _fresh_compiler_caches() -> None:
    """Dynamo reset and new, empty inductor / Triton cache folders: the next compile is a cold one."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    inductor.fx_graph_cache = False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-triton-")


def run_variant(cfg: PretrainConfig, device: torch.device, batch: int, steps: int, scope: str | None,
                levels: list[int]) -> dict:  # fmt: skip
    """Figures of ``steps`` timed steps after a first (compiling) one; ``scope`` None = eager."""
    _fresh_compiler_caches()
    size, bands = cfg.model.image_size, 3
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, ema, opt, sched, _ = init_training(
        cfg.model, cfg.optim, bands, size, device, seed=0, channels_last=cuda
    )
    checkpoint_activations(model, levels)
    fast = compile_unet(model, CompileScope(scope)) if scope else model
    x = torch.rand(batch, bands, size, size, device=device) * 2 - 1
    noise = make_scheduler(cfg.diffusion)
    noise.alphas_cumprod = noise.alphas_cumprod.to(device)
    gen = devices.generator(device, 0)
    amp = torch.bfloat16 if cuda else None

    def step() -> torch.Tensor:
        T = cfg.diffusion.timesteps
        loss, _, _ = train_step(fast, ema, opt, sched, lambda: x, noise, gen, timesteps=T, amp_dtype=amp,
                                channels_last=cuda)  # fmt: skip
        return loss

    watch = CompileWatch()
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    watch.step_done()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    _sync(device)
    per_step = (time.perf_counter() - t0) / steps
    out = {
        "scope": scope or "eager", "batch": batch, "checkpoint_levels": levels,
        "compile_s": max(0.0, first - per_step) if scope else 0.0, "images_per_s": batch / per_step,
        "losses": [float(v) for v in losses],
        **{k: v for k, v in watch.metrics().items() if k != "compile_first_step_s"},
    }  # fmt: skip
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["estimate_gib"] = estimate_training_memory(cfg.model, bands, size, batch, levels).total_gib
    return out


def flops_per_image(cfg: PretrainConfig, device: torch.device) -> float:
    """Forward + backward FLOPs of one image (counted on a batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, *_ = init_training(cfg.model, cfg.optim, 3, cfg.model.image_size, device)
    x = torch.zeros(2, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    with FlopCounterMode(display=False) as fc:
        model(x, torch.zeros(2, dtype=torch.long, device=device)).sample.float().sum().backward()
    return fc.get_total_flops() / 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(variants: list[dict], flops: float, peak_tflops: float) -> dict:
    """Ratios against eager and against the ``model`` scope, plus losses checked against eager."""
    by = {(v["scope"], v["batch"], tuple(v["checkpoint_levels"])): v for v in variants}
    eager = variants[0]
    out: dict = {}
    for v in variants:
        key = f"{v['scope']}_b{v['batch']}" + ("_ckpt" + "".join(map(str, v["checkpoint_levels"]))
                                              if v["checkpoint_levels"] else "")  # fmt: skip
        v["losses_finite"] = all(math.isfinite(x) for x in v["losses"])
        if v["batch"] == eager["batch"] and not v["checkpoint_levels"] and v["losses"]:
            diffs = [
                abs(a - b) / max(abs(a), 1e-8) for a, b in zip(v["losses"], eager["losses"], strict=True)
            ]
            v["max_rel_loss_diff_vs_eager"] = max(diffs)
        if peak_tflops:
            v["mfu"] = flops * v["images_per_s"] / (peak_tflops * 1e12)
        out[key] = {k: round(x, 4) if isinstance(x, float) else x for k, x in v.items() if k != "losses"}
    blocks = by.get(("blocks", eager["batch"], ()))
    whole = by.get(("model", eager["batch"], ()))
    if blocks and whole:
        out["compile_s_ratio_blocks_vs_model"] = round(blocks["compile_s"] / max(whole["compile_s"], 1e-9), 3)
        out["speed_ratio_blocks_vs_eager"] = round(blocks["images_per_s"] / eager["images_per_s"], 3)
        out["speed_ratio_model_vs_eager"] = round(whole["images_per_s"] / eager["images_per_s"], 3)
    return out


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device, peak: float) -> dict:
    """Eager, each compile scope, then the batch / checkpointing sweep, for one preset."""
    cfg = load_config(PretrainConfig, preset)
    cfg.model.image_size = args.image_size or cfg.model.image_size
    batch = args.batch or cfg.data.batch_size
    scopes = [s for s in args.scopes.split(",") if s]
    variants = [run_variant(cfg, device, batch, args.steps, None, [])]
    variants += [run_variant(cfg, device, batch, args.steps, s, []) for s in scopes]
    for size in [int(b) for b in args.sweep.split(",") if b]:
        for levels in args.sweep_levels.split(","):
            chosen = [] if levels == "none" else [int(c) for c in levels.split("+")]
            try:
                variants.append(run_variant(cfg, device, size, args.steps, scopes[0], chosen))
            except torch.OutOfMemoryError:
                variants.append({"scope": scopes[0], "batch": size, "checkpoint_levels": chosen,
                                 "images_per_s": 0.0, "losses": [], "out_of_memory": True})  # fmt: skip
    flops = flops_per_image(cfg, device)
    return {"image_size": cfg.model.image_size, "flops_per_image": flops, **summary(variants, flops, peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--preset", default=str(REPO / "configs/pretrain/tiny.yaml"), help="one or more, comma-separated"
    )
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch", type=int, default=8, help="0: the preset's")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scopes", default="blocks,model")
    ap.add_argument("--sweep", default="", help="more batch sizes, compiled with the first scope")
    ap.add_argument("--sweep-levels", default="none", help="checkpoint levels per sweep point, e.g. none,0")
    args = ap.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        devices.enable_tf32()
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    name = torch.cuda.get_device_name() if args.gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    line = {
        "bench": "compile", "device": name, "cpus": os.cpu_count(), "torch": torch.__version__,
        "steps": args.steps, "peak_bf16_tflops_used": peak or None,
        **{Path(p).stem: bench_preset(p, args, device, peak) for p in args.preset.split(",")},
    }  # fmt: skip
    print(json.dumps(line))


if __name__ == "__main__":
    main()
