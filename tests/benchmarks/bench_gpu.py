"""The GPU paths that need no Ray cluster, checked and timed on one CUDA device. Prints one JSON line.

G1: training steps through rsdiff's own ``init_training`` + ``train_step`` (bf16 autocast,
    channels_last, ``torch.compile``) of the tiny preset; the checkpoint they save (EMA weights on
    the GPU in channels_last) loads back through the EMA artifact onto the GPU with equal outputs.
G2: images/s and MFU of one bf16 training step of the ``adm256`` preset (channels_last, fused
    AdamW, compiled), FLOPs from ``torch.utils.flop_counter``.
G3: frozen-UNet feature extraction on the GPU (``FeatureExtractor``, bf16 autocast) vs fp32 on
    the CPU: relative error of the features and GPU images/s (64 px tiles, 960 channels).
G4: head training on the GPU from in-memory rows (``fit_head`` with the rows on the device):
    residual head vs the 10-member DDPM-Seg ensemble, same rows and epochs.

    python tests/benchmarks/bench_gpu.py            # on a CUDA machine
    python tests/benchmarks/bench_gpu.py --dry-run  # the same code paths, small, on the CPU (no G2)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsdiff.config import build, load_section, to_container
from rsdiff.diffusion import checkpoint
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.diffusion.config import DiffusionConfig, ModelConfig
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet, num_params
from rsdiff.features.blocks import list_blocks
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.features.index import ChannelIndex
from rsdiff.features.parts import write_part
from rsdiff.features.table import FORMAT_VERSION, KIND, TABLE_META, FeatureTable
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.train.config import OptimConfig
from rsdiff.train.loop import init_training, train_step

REPO = Path(__file__).resolve().parents[2]
DEV = "cuda"  # --dry-run: "cpu", small sizes, no compile
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def training_and_ema_artifact(tmp: Path) -> dict:
    """G1: compiled bf16 channels_last steps, then the EMA artifact round trip on the GPU."""
    dev = torch.device(DEV)
    model_cfg = load_section(ModelConfig, REPO / "configs/pretrain/tiny.yaml", "model")
    optim = build(OptimConfig, {"max_steps": 30, "warmup_steps": 5})
    model, ema, opt, sched, _ = init_training(model_cfg, optim, 4, 64, dev, seed=0, channels_last=True)
    fast = torch.compile(model) if DEV == "cuda" else model
    noise = make_scheduler(DiffusionConfig())
    gen = torch.Generator(device=dev).manual_seed(0)
    batch = torch.rand(16, 4, 64, 64, device=dev) * 2 - 1
    losses = []
    t0 = time.perf_counter()
    for step in range(30 if DEV == "cuda" else 6):
        if step == 5:
            _sync()
            t0 = time.perf_counter()
        loss, _, _ = train_step(
            fast, ema, opt, sched, lambda: batch, noise, gen, timesteps=1000, ema_decay=0.9,
            amp_dtype=torch.bfloat16 if DEV == "cuda" else None, channels_last=DEV == "cuda",
        )  # fmt: skip
        losses.append(float(loss))
    _sync()
    steps_per_s = (len(losses) - 5) / (time.perf_counter() - t0)
    meta = {
        "model": to_container(model_cfg), "diffusion": to_container(DiffusionConfig()), "in_channels": 4,
        "image_size": 64, "normalization": {"mean": [0.0] * 4, "std": [1.0] * 4, "scale": 1.0},
        "bands": ["b1", "b2", "b3", "b4"], "dtype": "uint8", "tile_size": 64, "classes": [], "step": 30,
    }  # fmt: skip
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": 30}
    checkpoint.save(tmp / "ckpt", state, meta)
    loaded = load_pretrained(str(tmp / "ckpt"), device=dev)
    x, t = batch[:4], torch.tensor([10, 200, 500, 900], device=dev)
    with torch.no_grad():
        want = ema.eval()(x.contiguous(memory_format=torch.channels_last), t).sample
        got = loaded.model(x, t).sample
    return {
        "g1_finite_losses": bool(np.isfinite(losses).all()),
        "g1_loss_first_last": [round(losses[0], 4), round(min(losses[-5:]), 4)],
        "g1_compiled_bf16_steps_per_s": steps_per_s,
        "g1_ema_artifact_max_abs_diff": float((want - got).abs().max()),
        "g1_ema_artifact_bytes": (tmp / "ckpt" / "ema" / checkpoint.EMA_WEIGHTS).stat().st_size,
        "g1_model_pt_bytes": (tmp / "ckpt" / checkpoint.WEIGHTS).stat().st_size,
    }


def adm256_mfu(
    batch: int = 32,
    steps: int = 20,
    preset: str | Path = REPO / "configs/pretrain/adm256.yaml",
    compile: bool = True,
) -> dict:
    """G2: images/s and MFU of one bf16 training step (channels_last, fused AdamW, compiled unless
    ``compile`` is off) of a pretraining preset's model (default ``adm256``), 3 bands."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_section(ModelConfig, preset, "model")
    size = cfg.image_size or 256
    model = build_unet(cfg, 3, size).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fast = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(fast(x, t).sample.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        F.mse_loss(model(x, t).sample.float(), x).backward()
    opt.zero_grad(set_to_none=True)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    return {
        "g2_preset": Path(preset).name,
        "g2_compiled": compile,
        "g2_params_m": num_params(model) / 1e6,
        "g2_batch": batch,
        "g2_images_per_s": batch / dt,
        "g2_tflops_per_step": fc.get_total_flops() / 1e12,
        "g2_mfu": fc.get_total_flops() / dt / peak,
        "g2_peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def extraction(tmp: Path) -> dict:
    """G3: GPU bf16 features vs CPU fp32 features of the same tiles; GPU images/s."""
    ckpt = tmp / "ckpt"  # written by G1
    cpu = load_pretrained(str(ckpt))
    gpu = load_pretrained(str(ckpt), device=DEV)
    blocks = [b for b in list_blocks(cpu.model) if b.startswith("up")]
    ts = [50, 150, 250]
    ext_cpu = FeatureExtractor(cpu, ts, blocks, precision="fp32")
    ext_gpu = FeatureExtractor(gpu, ts, blocks, precision="auto")
    x = torch.rand(8, 4, 64, 64) * 2 - 1
    a = ext_cpu.dense(x).float()
    b = ext_gpu.dense(x.to(DEV)).float().cpu()
    big = torch.rand(64 if DEV == "cuda" else 4, 4, 64, 64, device=DEV) * 2 - 1
    ext_gpu.dense(big)
    _sync()
    t0 = time.perf_counter()
    for _ in range(5):
        ext_gpu.dense(big)
    _sync()
    return {
        "g3_channels": ext_gpu.dim,
        "g3_bf16_gpu_vs_fp32_cpu_rel_err": float((a - b).norm() / a.norm()),
        "g3_gpu_images_per_s": 5 * len(big) / (time.perf_counter() - t0),
    }


def synthetic_table(root: Path, rows: int, dim: int, classes: int, parts: int = 8) -> FeatureTable:
    """A feature table of ``rows`` rows per split: class ``c`` shifts channels ``64c .. 64c + 63``."""
    import dataclasses

    rng = np.random.default_rng(0)
    infos = []
    for split in ("train", "val"):
        for p in range(parts):
            n = rows // parts
            y = rng.integers(0, classes, n).astype(np.uint8)
            x = rng.normal(size=(n, dim)).astype(np.float32)
            for c in range(classes):
                x[y == c, 64 * c : 64 * c + 64] += 0.6
            arrays = {"features": x.astype(np.float16), "labels": y,
                      "image": np.array([f"{split}-{p}-{i % 50}" for i in range(n)]),
                      "rows": np.zeros(n, np.int32), "cols": np.zeros(n, np.int32)}  # fmt: skip
            infos.append(dataclasses.asdict(write_part(str(root), split, arrays, classes)))
    blocks = ["up0.res0", "up1.res0"]
    index = ChannelIndex.build([50, 150, 250], blocks, dict.fromkeys(blocks, dim // 6))
    meta = {
        "kind": KIND, "format": FORMAT_VERSION, "checkpoint": "/nowhere", "shards": "/nowhere", "dim": dim,
        "timesteps": [50, 150, 250], "blocks": blocks, "channel_index": index.to_json(),
        "classes": [{"name": f"c{c}", "id": c} for c in range(classes)], "parts": infos,
    }  # fmt: skip
    (root / TABLE_META).write_text(json.dumps(meta))
    return FeatureTable.open(str(root))


def heads_on_gpu(tmp: Path) -> dict:
    """G4: residual head vs DDPM-Seg ensemble, 5 epochs on 200k in-memory rows x 960 channels."""
    table = synthetic_table(tmp / "table", rows=200_000 if DEV == "cuda" else 4000, dim=960, classes=5)
    out = {"g4_rows": table.rows("train"), "g4_channels": 960}
    ts, blocks = table.index.timesteps, table.index.blocks
    for kind in ("residual", "ensemble"):
        cfg = build(HeadConfig, {"kind": kind, "epochs": 5, "patience": 5, "batch_rows": 4096})
        warm = build(HeadConfig, {"kind": kind, "epochs": 1, "batch_rows": 4096})
        fit_head(table, ts, blocks, warm, device=DEV, memory_mb=8192)
        _sync()
        t0 = time.perf_counter()
        head = fit_head(table, ts, blocks, cfg, device=DEV, memory_mb=8192)
        _sync()
        out[f"g4_{kind}_seconds"] = time.perf_counter() - t0
        out[f"g4_{kind}_val_miou"] = head.metrics["miou"]
    out["g4_time_ratio_residual_vs_ensemble"] = out["g4_residual_seconds"] / out["g4_ensemble_seconds"]
    return out


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    import argparse

    global DEV
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="small, on the CPU, without G2")
    args = parser.parse_args()
    DEV = "cpu" if args.dry_run else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    out: dict = {"bench": "gpu", "device": name, "torch": torch.__version__}
    sections = [("g1", lambda: training_and_ema_artifact(tmp)), ("g3", lambda: extraction(tmp)),
                ("g4", lambda: heads_on_gpu(tmp))]  # fmt: skip
    sections += [("g2", adm256_mfu)] if DEV == "cuda" else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in sections:
            try:
                out.update(fn())
            except Exception as exc:  # report every section, also after one fails
                out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(
                json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}),
                flush=True,
            )


if __name__ == "__main__":
    main()
