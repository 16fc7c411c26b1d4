"""What a driver spends planning from a checkpoint, as ratios against loading the model. Prints one
JSON line.

D1: the predict, suggest and extract drivers check scenes and plan work from a checkpoint's
    structure (band count, image size, block channels, the weights' sha256) and leave the weights
    to their Ray workers. Their planning, ``load_pretrained(uri, device="meta")`` + a
    ``FeatureExtractor`` over every decoder block, vs the same with the model loaded on the CPU (what
    the drivers did before): wall seconds and peak RSS growth (MB) of a fresh process each, for
    the ``adm256`` preset (and ``tiny``), from local disk and, with ``--s3``, from loopback S3.

    python tests/benchmarks/bench_driver_plan.py [--skip-adm256] [--s3] [--repeats 2]

Each variant runs in its own Python process (so one's freed memory is not another's baseline),
in alternating order; the figures are the medians of ``--repeats`` runs. Fresh weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def child(mode: str, uri: str) -> None:
    """Plan from ``uri`` as a driver does (``mode``: ``meta`` or ``cpu``); print seconds and MB."""
    import safetensors.torch  # noqa: F401
    from diffusers import UNet2DModel  # noqa: F401  (imported first: import costs are in neither figure)

    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.blocks import list_blocks
    from rsdiff.features.extractor import FeatureExtractor

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    ddpm = load_pretrained(uri, device=mode)
    blocks = [b for b in list_blocks(ddpm.model) if b.startswith("up")]
    extractor = FeatureExtractor(ddpm, [50, 150, 250], blocks)
    seconds = time.perf_counter() - t0
    peak = _high_water_rss()
    print(json.dumps({"seconds": seconds, "rss_growth_mb": (peak - base) / 1e6, "dim": extractor.dim}))


def _high_water_rss() -> int:
    """This process's peak RSS (bytes) since its ``exec`` (``VmHWM``; ``ru_maxrss`` would carry the
    parent's peak over the ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark's memory figures need Linux")


def measure(mode: str, uri: str, env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, uri], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        raise SystemExit(f"the {mode} planning of {uri} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(tag: str, uri: str, repeats: int, env: dict[str, str]) -> dict[str, float]:
    """``d1_{tag}_*``: medians of ``repeats`` alternating runs, and the meta/cpu ratios."""
    runs: dict[str, list[dict[str, float]]] = {"meta": [], "cpu": []}
    for i in range(repeats):
        for mode in ("meta", "cpu") if i % 2 == 0 else ("cpu", "meta"):
            runs[mode].append(measure(mode, uri, env))
    assert {r["dim"] for rs in runs.values() for r in rs} == {runs["cpu"][0]["dim"]}, "block channels differ"
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "rss_growth_mb")}
           for m, rs in runs.items()}  # fmt: skip
    return {
        f"d1_{tag}_structure_s": round(med["meta"]["seconds"], 2),
        f"d1_{tag}_loaded_s": round(med["cpu"]["seconds"], 2),
        f"d1_{tag}_seconds_ratio": round(med["meta"]["seconds"] / med["cpu"]["seconds"], 3),
        f"d1_{tag}_structure_rss_mb": round(med["meta"]["rss_growth_mb"], 1),
        f"d1_{tag}_loaded_rss_mb": round(med["cpu"]["rss_growth_mb"], 1),
        f"d1_{tag}_rss_ratio": round(med["meta"]["rss_growth_mb"] / med["cpu"]["rss_growth_mb"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "URI"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-adm256", action="store_true", help="only the tiny checkpoint (fast)")
    parser.add_argument("--s3", action="store_true", help="also from loopback S3 (moto server)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import os

    from bench_s3_reads import save_checkpoint, tiny_checkpoint

    from rsdiff.config import load_config
    from rsdiff.train.config import PretrainConfig

    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoints = {"tiny": tiny_checkpoint(tmp / "tiny")}
        if not args.skip_adm256:
            adm = load_config(PretrainConfig, REPO / "configs/pretrain/adm256.yaml", ["data.shards=/nowhere"])
            checkpoints["adm256"] = save_checkpoint(adm, 256, tmp / "adm256")
        for tag, uri in checkpoints.items():
            out.update(compare(tag, uri, args.repeats, env))
        if args.s3:
            out.update(_from_s3(checkpoints, args.repeats, env))
    print(json.dumps(out))


def _from_s3(checkpoints: dict[str, str], repeats: int, env: dict[str, str]) -> dict[str, float]:
    """The same comparisons with each checkpoint's ``ema/`` uploaded to a loopback S3 server."""
    import logging
    import os

    import boto3
    from _loopback_s3 import start_moto

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request lines
    start_moto("bench")  # points this process's AWS environment at it
    env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    out: dict[str, float] = {}
    for tag, uri in checkpoints.items():
        for f in sorted(Path(uri, "ema").iterdir()):
            boto3.client("s3").upload_file(str(f), "bench", f"{tag}/ema/{f.name}")
        out.update(compare(f"{tag}_s3", f"s3://bench/{tag}", repeats, env))
    return out


if __name__ == "__main__":
    main()
