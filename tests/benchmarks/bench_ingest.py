"""Ingest throughput: tiles/s and MB/s to local disk and to a loopback S3 server, and the shard
writer against a plain ``tarfile`` write of the same bytes. Prints one JSON line.

    python tests/benchmarks/bench_ingest.py [--data DIR]

DIR defaults to ../shared/data/dubai-aerial beside the repository (generated scenes if absent).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import ray
from _loopback_s3 import start_moto

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.shards import ShardWriter, encode_sample, iter_shard
from rsdiff.ingest import run_ingest

REPO = Path(__file__).resolve().parents[2]


def _ingest(preset: Path, inputs: str, output: str) -> dict:
    cfg = load_config(IngestConfig, preset, [f"inputs=[{inputs}]", f"output={output}", "overwrite=true"])
    t0 = time.perf_counter()
    manifest = run_ingest(cfg)
    seconds = time.perf_counter() - t0
    tiles = sum(manifest.samples.values())
    mb = sum(len(storage.read_bytes(u)) for u in manifest.shard_uris()) / 2**20
    return {
        "tiles": tiles,
        "seconds": round(seconds, 2),
        "tiles_per_s": tiles / seconds,
        "mb_per_s": mb / seconds,
    }


def _writer_vs_tarfile(shard_uri: str, out_dir: Path, repeats: int = 3) -> dict:
    samples = list(iter_shard(shard_uri))
    encoded = [encode_sample(s) for s in samples]
    nbytes = sum(len(v) for e in encoded for k, v in e.items() if k != "__key__")
    best_w = best_t = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        with ShardWriter(str(out_dir / f"w{r}"), "bench", 1 << 40) as w:
            for s in samples:
                w.write(s)
        best_w = min(best_w, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with tarfile.open(out_dir / f"plain{r}.tar", "w") as tar:
            for s in samples:  # same work as the writer: encode, then append to a tar
                e = encode_sample(s)
                for ext, data in e.items():
                    if ext == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{e['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        best_t = min(best_t, time.perf_counter() - t0)
    return {
        "samples": len(samples),
        "mb": nbytes / 2**20,
        "shard_writer_mb_per_s": nbytes / 2**20 / best_w,
        "plain_tarfile_mb_per_s": nbytes / 2**20 / best_t,
        "ratio_vs_tarfile": best_t / best_w,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dubai-aerial"))
    args = parser.parse_args()
    start_moto("bench")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if Path(args.data, "classes.json").exists():
            preset, inputs, dataset = (
                REPO / "configs/ingest/dubai.yaml",
                f"{args.data}/*/images/*.jpg",
                "dubai-aerial",
            )
        else:
            from rsdiff.data.synthetic import write_sample_dataset

            write_sample_dataset(tmpd / "sample", scenes=12, height=512, width=512)
            preset, inputs, dataset = (
                REPO / "configs/ingest/sample.yaml",
                f"{tmpd}/sample/images/*.tif",
                "generated",
            )
        local = _ingest(preset, inputs, str(tmpd / "local"))
        s3 = _ingest(preset, inputs, "s3://bench/shards")
        first = sorted(storage.list_uris(str(tmpd / "local"), ".tar"))[0]
        writer = _writer_vs_tarfile(first, tmpd / "writer")
    result = {
        "bench": "ingest",
        "dataset": dataset,
        "cpus": 2,
        "local": local,
        "s3": s3,
        "shard_write": writer,
    }
    print(json.dumps(_rounded(result)))


def _rounded(obj):
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return round(obj, 3) if isinstance(obj, float) else obj


if __name__ == "__main__":
    main()
