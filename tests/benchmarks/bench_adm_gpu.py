"""OpenAI's 256 x 256 unconditional ADM (guided-diffusion's released layout, 554M parameters),
converted to rsdiff's model: exactness against the reference at full size, and DDPM-Seg's
feature set (output_blocks 5, 6, 7, 8, 12 at t = 50, 150, 250) extracted in bf16 on the GPU.

    python tests/benchmarks/bench_adm_gpu.py            # on a GPU machine
    python tests/benchmarks/bench_adm_gpu.py --dry-run  # a 32-channel model on the CPU, to check the script

The weights are random (no download): guided-diffusion's own initialisation, with its
zero-initialised output convolutions filled with noise so that every layer shows in the output.
Prints one JSON line: the largest absolute and relative differences of the output and of every
``output_blocks[k]`` activation (fp32, TF32 off), conversion time, and extraction images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FLAGS_256 = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True"
)
FLAGS_DRY = FLAGS_256.replace("--num_channels 256", "--num_channels 32").replace(
    "--num_head_channels 64", "--num_head_channels 32"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=15)
    args = ap.parse_args()
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from guided_diffusion.script_util import create_model

    from rsdiff.data.normalize import Normalizer
    from rsdiff.diffusion import adm
    from rsdiff.diffusion.checkpoint import PretrainedDDPM
    from rsdiff.diffusion.config import SourceOptions
    from rsdiff.diffusion.schedule import make_scheduler
    from rsdiff.diffusion.sources import load_source
    from rsdiff.diffusion.unet import build_unet, num_params
    from rsdiff.features.blocks import block_modules, ddpm_seg_blocks
    from rsdiff.features.extractor import FeatureExtractor

    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    line = FLAGS_DRY if args.dry_run else FLAGS_256
    flags = adm.parse_flags(line)
    torch.manual_seed(0)
    kwargs = {
        f: getattr(flags, f)
        for f in (
            "image_size",
            "num_channels",
            "num_res_blocks",
            "learn_sigma",
            "attention_resolutions",
            "num_head_channels",
            "resblock_updown",
            "use_scale_shift_norm",
            "channel_mult",
        )
    }
    ref = create_model(**kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    ref.eval()
    path = Path("/tmp/rsdiff-adm256.pt")
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    path.write_bytes(buf.getvalue())
    t0 = time.perf_counter()
    source = load_source(str(path), SourceOptions(adm_flags=line))
    ours = build_unet(source.model, 3, flags.image_size)
    ours.load_state_dict(source.state)
    convert_s = time.perf_counter() - t0
    params = num_params(ours)
    ref, ours = ref.to(device), ours.eval().to(device)
    numbered = ddpm_seg_blocks(ours)
    modules = block_modules(ours, upsamplers=True)
    size = flags.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    worst: dict[str, float] = {"out_abs": 0.0, "out_rel": 0.0, "blocks_abs": 0.0, "blocks_rel": 0.0}
    for t in (0, 250, 999):
        tt = torch.full((2,), t, device=device)
        a, b = {}, {}
        hooks = [
            ref.output_blocks[k].register_forward_hook(lambda _m, _i, o, k=k, a=a: a.__setitem__(k, o))
            for k in numbered
        ]
        hooks += [
            modules[n].register_forward_hook(lambda _m, _i, o, k=k, b=b: b.__setitem__(k, o))
            for k, n in numbered.items()
        ]
        with torch.no_grad():
            ra, rb = ref(x, tt), ours(x, tt).sample
        for h in hooks:
            h.remove()
        worst["out_abs"] = max(worst["out_abs"], float((ra - rb).abs().max()))
        worst["out_rel"] = max(worst["out_rel"], float((ra - rb).norm() / ra.norm()))
        for k in numbered:
            worst["blocks_abs"] = max(worst["blocks_abs"], float((a[k] - b[k]).abs().max()))
            worst["blocks_rel"] = max(worst["blocks_rel"], float((a[k] - b[k]).norm() / a[k].norm()))
    del ref
    train = continued_training(source, flags.image_size, device, args)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ddpm = PretrainedDDPM(
        model=ours.requires_grad_(False),
        scheduler=make_scheduler(adm.diffusion_config(flags)),
        normalizer=Normalizer.from_json({"mean": [127.5] * 3, "std": [63.75] * 3, "scale": 2.0}),
        meta={"in_channels": 3, "image_size": size, "bands": ["red", "green", "blue"]},
        uri=str(path),
    )
    extractor = FeatureExtractor(
        ddpm,
        [50, 150, 250],
        ["5", "6", "7", "8", "12"],
        numbering="ddpm_seg",
        precision="fp32" if args.dry_run else "bf16",
    )
    batch = torch.rand(args.batch if not args.dry_run else 2, 3, size, size, device=device) * 2 - 1
    extractor.activations(batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < (2.0 if args.dry_run else args.seconds):
        extractor.activations(batch)
        n += batch.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t1)
    print(
        json.dumps(
            {
                "bench": "adm256_convert_and_extract",
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "flags": line,
                "params": params,
                "convert_s": round(convert_s, 2),
                "max_abs_diff_output": worst["out_abs"],
                "max_rel_diff_output": worst["out_rel"],
                "max_abs_diff_output_blocks": worst["blocks_abs"],
                "max_rel_diff_output_blocks": worst["blocks_rel"],
                "ddpm_seg_blocks": {str(k): numbered[k] for k in (5, 6, 7, 8, 12) if k in numbered},
                "feature_channels": extractor.dim,
                "extract_images_per_s_bf16": round(rate, 1),
                "batch": batch.shape[0],
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
                if device.type == "cuda"
                else None,
                **train,
            }
        )
    )


def continued_training(source, size: int, device, args) -> dict:
    """rsdiff's training step started from the converted weights (``init_training(initial=...)``),
    bf16 autocast + channels_last on the GPU, the learn_sigma model's epsilon half trained."""
    import torch

    from rsdiff.config import build
    from rsdiff.diffusion.schedule import make_scheduler
    from rsdiff.train.config import OptimConfig
    from rsdiff.train.loop import init_training, train_step

    cuda = device.type == "cuda"
    optim = build(OptimConfig, {"lr": 1e-5, "max_steps": 1000, "warmup_steps": 0})
    model, ema, opt, sched, _ = init_training(
        source.model, optim, 3, size, device, seed=0, channels_last=cuda, initial=source.state
    )
    started = bool(torch.equal(model.conv_in.weight.detach().cpu(), source.state["conv_in.weight"]))
    noise = make_scheduler(build(type(source.diffusion), source.diffusion))
    gen = torch.Generator(device=device).manual_seed(0)
    batch = torch.rand(args.train_batch if cuda else 1, 3, size, size, device=device) * 2 - 1
    steps = args.train_steps if cuda else 2
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        if step == 3 and cuda:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _, _ = train_step(model, ema, opt, sched, lambda: batch, noise, gen, timesteps=1000,
                                ema_decay=0.9999, amp_dtype=torch.bfloat16 if cuda else None,
                                channels_last=cuda)  # fmt: skip
        losses.append(float(loss))
    if cuda:
        torch.cuda.synchronize()
    timed = steps - 3 if cuda else steps
    return {
        "train_started_from_converted_weights": started,
        "train_losses_finite": all(l == l and abs(l) < 1e6 for l in losses),  # noqa: E741
        "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "train_images_per_s_bf16_eager": round(timed * batch.shape[0] / (time.perf_counter() - t0), 1),
        "train_batch": batch.shape[0],
    }


if __name__ == "__main__":
    main()
