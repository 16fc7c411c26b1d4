"""How each stage's cost grows with its work: the same stage at a small and a 10-100x size in one
process, as ratios. Prints one JSON line per stage.

ingest:  generated scenes (4-band uint16, 128 x 128 px: 4 tiles of 64 px, with index masks) at 1x,
         10x and 100x ``--scenes`` (default 72, dubai-aerial's scene count), local disk to local
         disk, and at 1x and 10x (``--s3-up-to 100``: and 100x) from loopback S3 to loopback S3:
         seconds per tile and peak memory.
extract: ``run_extract`` over 500 vs 10,000 labeled 64 px tiles (``shard_max_mb=256``, so the
         large run's shards are the size users get), one timestep and one block of a fresh tiny
         UNet: images/s, peak memory and the object store's peak use.
predict: ``predict_scene`` reading a 512 x 512 and a 1024 x 1024 px region of one 16384 x 16384
         px 3-band COG (512 px tiles, deflate) in loopback S3, vs a whole 512 x 512 px scene in the
         same store: peak RSS growth, bytes fetched (counted by a proxy) and seconds per megapixel.
stream:  the pretraining stream (one rank, no loader workers) over 1,000 shards vs 10 of 200
         tiles each (100x the epoch): seconds to the first tile, tiles/s, and the seconds a resumed
         stream takes to its first tile from the middle of an epoch, with the manifest's shard
         counts (draws replayed, only the buffered shards read) and without (the epoch re-read up
         to there, so that one grows with the epoch).
sweep:   a sweep trial's head fit (one epoch, residual head, all 960 channels) through the node-local
         copy, on a ``--table-gb`` table (default 10; beyond ``table.memory_mb=1024``, so streamed)
         vs a 0.25 GB table held in memory, and that small table streamed, each fit in a fresh
         process: microseconds per training row and the growth of anonymous memory (``RssAnon``:
         what an OOM kill counts; the mapped table's pages, ``RssFile``, are reported apart: they
         are reclaimable cache). The fits inherit the environment, so
         ``MALLOC_MMAP_THRESHOLD_=1048576`` measures them with glibc's allocator mapping (and
         returning) every buffer over 1 MB.
pool:    the label-efficiency report's labeled tiles (``DenseTiles``) over a pool of 1,000 vs
         100,000 tiles (3-band 64 px with labels, 256 MB shards): indexing, a draw of 3 whole scenes
         and one of 100 tiles from anywhere: seconds and bytes fetched per tile, anonymous memory.

Memory: the summed PSS of this process and its descendants (the local Ray cluster it started), so
the object store's shared pages count once, sampled every second; the S3 server runs in a process
of its own and is not counted. Prediction runs in this process: its growth of RSS, sampled every
0.1 s, the best of two rounds that read fresh objects and regions. Ratios compare runs of the same
process, so the machine's noise mostly cancels.

    python tests/benchmarks/bench_scale.py [--stages ingest,extract,predict,stream,sweep,pool]
        [--scenes 72] [--s3-up-to 10] [--extract-tiles 500,10000] [--cog-px 16384] [--table-gb 10]
        [--tmp DIR]
    python tests/benchmarks/bench_scale.py --plot RESULTS.json [MORE.json ...] PLOT.png
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_features
import boto3
import numpy as np
import psutil
import rasterio
import rasterio.shutil
import ray
import torch
from bench_features import fresh_head, make_checkpoint
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage as rsdiff_storage
from rsdiff.config import build, load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import Manifest, write_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.data.scenes import SceneRef
from rsdiff.data.shards import Sample, ShardWriter
from rsdiff.data.synthetic import write_scene
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import run_extract
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.features.index import ChannelIndex
from rsdiff.features.parts import write_part
from rsdiff.features.table import FORMAT_VERSION as TABLE_FORMAT
from rsdiff.features.table import KIND as TABLE_KIND
from rsdiff.features.table import TABLE_META, FeatureTable
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.ingest import run_ingest
from rsdiff.label_efficiency import DenseTiles
from rsdiff.prediction.scene import SceneOutputs, WindowPlan, predict_scene
from rsdiff.storage import name as storage_name
from rsdiff.train.shuffle import ShardIndex
from rsdiff.train.stream import ShardStream, StreamPosition

REPO = Path(__file__).resolve().parents[2]
BUCKET = "scale"
EXCLUDED: set[int] = set()  # pids not counted in peak RSS (the S3 server)


def start_s3_server() -> str:
    """moto's S3 server in its own process (so the objects it holds are not counted in our RSS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    EXCLUDED.add(proc.pid)
    atexit.register(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="scale", AWS_SECRET_ACCESS_KEY="scale",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    return url


def tree_rss() -> int:
    """Bytes resident in this process and its descendants, less :data:`EXCLUDED`: their summed
    PSS (proportional set size), so the pages of Ray's shared object store that several processes
    map are counted once, not once per process."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss if p.pid not in EXCLUDED else 0
        except psutil.Error:
            continue
    return total


def object_store_used() -> int:
    """Bytes of the local Ray object store in use now."""
    total = ray.cluster_resources().get("object_store_memory", 0)
    return int(total - ray.available_resources().get("object_store_memory", total))


class PeakRSS(bench_features.PeakRSS):
    """Samples the memory of this process and all its descendants (the local Ray cluster it
    started: GCS, raylet, workers), less the S3 server, every second (:func:`tree_rss`: reading
    PSS costs milliseconds per process), and the object store's use; ``tree=False``: this
    process's RSS alone, every 0.1 s. Another Ray on the machine is not counted."""

    def __init__(self, tree: bool = True) -> None:
        super().__init__()
        self.store_peak = 0
        self.tree = tree
        self.every = 1.0 if tree else 0.1

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss() if self.tree else psutil.Process().memory_info().rss
            self.peak = max(self.peak, rss)
            if self.tree:
                self.store_peak = max(self.store_peak, object_store_used())
            self._stop.wait(self.every)


def measured(fn, *args, **kwargs) -> tuple[object, float, PeakRSS]:
    """``(result, seconds, memory peaks)`` of ``fn(*args, **kwargs)``."""
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return result, seconds, rss


def scene_folder(root: Path, scenes: int, size: int = 128, distinct: int = 8, **scene: object) -> Path:
    """``scenes`` labeled scenes under ``root/images`` and ``root/labels`` (copies of ``distinct``
    generated ones: ingest's cost does not depend on the pixels)."""
    base = root / "base"
    made = [write_scene(base, f"b{i}", height=size, width=size, seed=i, **scene) for i in range(distinct)]
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n in range(scenes):
        src = made[n % distinct]
        shutil.copyfile(src.image, root / "images" / f"s{n:05d}.tif")
        shutil.copyfile(src.labels, root / "labels" / f"s{n:05d}.tif")
    shutil.rmtree(base)
    return root


def upload(folder: Path, prefix: str) -> str:
    """``folder``'s images and labels under ``s3://scale/{prefix}/``; returns the images glob."""
    s3 = boto3.client("s3")
    for sub in ("images", "labels"):
        for f in sorted((folder / sub).iterdir()):
            s3.upload_file(str(f), BUCKET, f"{prefix}/{sub}/{f.name}")
    return f"s3://{BUCKET}/{prefix}/images/*.tif"


def ingest(inputs: str, output: str, extra: list[str] = ()) -> dict:
    cfg = load_config(IngestConfig, REPO / "configs/ingest/sample.yaml",
                      [f"inputs=[{inputs}]", f"output={output}", "overwrite=true", *extra])  # fmt: skip
    manifest, seconds, mem = measured(run_ingest, cfg)
    tiles = sum(manifest.samples.values())
    mb = mem.peak / 2**20
    return {"tiles": tiles, "seconds": seconds, "s_per_tile": seconds / tiles, "peak_rss_mb": mb}


def stage_ingest(tmp: Path, scenes: int, s3_up_to: int = 10) -> dict:
    """Ingest at 1x, 10x and 100x ``scenes`` on local disk, and from and to S3 up to ``s3_up_to``x."""
    out: dict[str, object] = {"bench": "scale_ingest", "scene_px": 128, "tile_px": 64}
    warm = scene_folder(tmp / "warm", scenes)
    ingest(f"{warm}/images/*.tif", str(tmp / "warm-shards"))  # Ray workers started, imports done
    for factor in (1, 10, 100):
        folder = scene_folder(tmp / f"scenes{factor}", scenes * factor)
        out[f"local_{factor}x"] = ingest(f"{folder}/images/*.tif", str(tmp / f"shards{factor}"))
        if factor <= s3_up_to:
            glob = upload(folder, f"scenes{factor}")
            out[f"s3_{factor}x"] = ingest(glob, f"s3://{BUCKET}/shards{factor}")
        shutil.rmtree(folder)
        shutil.rmtree(tmp / f"shards{factor}")
    pairs = [("local", 100), ("local", 10), ("s3", 10)] + ([("s3", 100)] if s3_up_to >= 100 else [])
    for where, big in pairs:
        small, large = out[f"{where}_1x"], out[f"{where}_{big}x"]
        out[f"{where}_{big}x_vs_1x_s_per_tile"] = large["s_per_tile"] / small["s_per_tile"]
        out[f"{where}_{big}x_vs_1x_peak_rss"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    a, b = out["local_10x"], out["local_100x"]  # the cost of one more tile, start-up costs cancelled
    out["local_marginal_s_per_tile_10x_to_100x"] = (b["seconds"] - a["seconds"]) / (b["tiles"] - a["tiles"])
    return out


def stage_extract(tmp: Path, sizes: tuple[int, int]) -> dict:
    out: dict[str, object] = {
        "bench": "scale_extract",
        "tile_px": 64,
        "timesteps": [50],
        "blocks": ["up1.res0"],
    }
    ckpt = None
    for tiles in sizes:
        folder = scene_folder(tmp / f"x{tiles}", tiles // 16, size=256)  # 16 tiles of 64 px per scene
        shards = str(tmp / f"xshards{tiles}")
        ingest(f"{folder}/images/*.tif", shards, ["val_fraction=0", "shard_max_mb=256"])
        ckpt = ckpt or make_checkpoint(shards, tmp / "ckpt")
        cfg = load_config(ExtractConfig, REPO / "configs/extract/tiny.yaml", [
            f"checkpoint={ckpt}", f"shards={shards}", f"output={tmp / f'table{tiles}'}", "splits=[train]",
            "timesteps=[50]", "blocks=[up1.res0]"])  # fmt: skip
        table, seconds, mem = measured(run_extract, cfg)
        images = sum(int(p["images"]) for p in table.parts("train"))
        mb, store_mb = mem.peak / 2**20, mem.store_peak / 2**20
        out[f"{tiles}"] = {"images": images, "seconds": seconds, "images_per_s": images / seconds,
                           "peak_rss_mb": mb, "store_peak_mb": store_mb}  # fmt: skip
        shutil.rmtree(folder)
    small, large = out[str(sizes[0])], out[str(sizes[1])]
    out["large_vs_small_peak_rss"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    out["large_vs_small_images_per_s"] = large["images_per_s"] / small["images_per_s"]
    return out


def write_big_cog(path: Path, size: int) -> None:
    """A ``size`` px 3-band uint8 COG of smooth texture, written 512 rows at a time (never whole in RAM)."""
    tiled = path.with_suffix(".tiled.tif")
    rng = np.random.default_rng(0)
    with rasterio.open(
        tiled, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32640",
        transform=from_origin(500000, 2800000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
        compress="deflate",
    ) as dst:  # fmt: skip
        xx = np.arange(size, dtype=np.float32)[None, :]
        for top in range(0, size, 512):
            yy = np.arange(top, top + 512, dtype=np.float32)[:, None]
            band = [127 + 60 * np.sin(xx / (40 + 9 * b)) * np.cos(yy / (55 + 7 * b)) for b in range(3)]
            px = np.stack(band) + rng.normal(0, 12, (3, 512, size))
            dst.write(px.clip(0, 255).astype(np.uint8), window=((top, top + 512), (0, size)))
    rasterio.shutil.copy(tiled, path, driver="COG", blocksize=512, compress="deflate", overviews="NONE")
    tiled.unlink()


def tiny_head(tmp: Path, shards: str) -> tuple[TrainedHead, FeatureExtractor]:
    ckpt = make_checkpoint(shards, tmp / "pckpt")
    ddpm = load_pretrained(ckpt)
    extractor = FeatureExtractor(ddpm, [50], ["up1.res0"])
    return fresh_head(extractor, ckpt), extractor


PREDICT_RUNS = ("small_scene", "region_512", "region_1024")


def predict_runs(big: int, rounds: int) -> list[tuple[str, str, list[int] | None]]:
    """``(tag, object, region)`` per run: each round reads objects and regions no run read before
    (GDAL keeps what it fetched), all on the COG's 512 px tile grid."""
    mid = big // 2
    runs = []
    for r in range(rounds):
        runs += [("small_scene", f"small{r}", None), ("region_512", "big", [mid + 1024 * r, mid, 512, 512]),
                 ("region_1024", "big", [2048 * r, 0, 1024, 1024])]  # fmt: skip
    return runs


def stage_predict(tmp: Path, big: int, rounds: int = 2) -> dict:
    torch.set_num_threads(2)
    folder = scene_folder(tmp / "pscenes", 8, size=256, bands=3, dtype="uint8")  # RGB, as the COG
    shards = str(tmp / "pshards")
    ingest(f"{folder}/images/*.tif", shards, ["val_fraction=0", "band_names=[red,green,blue]"])
    head, extractor = tiny_head(tmp, shards)
    write_big_cog(tmp / "big.tif", big)
    write_big_cog(tmp / "small.tif", 512)
    s3 = boto3.client("s3")
    s3.upload_file(str(tmp / "big.tif"), BUCKET, "predict/big.tif")
    for name in ["warm", *(f"small{r}" for r in range(rounds))]:
        s3.upload_file(str(tmp / "small.tif"), BUCKET, f"predict/{name}.tif")
    proxy = FaultyS3Proxy(os.environ["AWS_ENDPOINT_URL"], max_faults=0).__enter__()
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    predict_region(tmp, head, extractor, "warm", None, "warm")  # imports and first calls
    got: dict[str, list[dict]] = {tag: [] for tag in PREDICT_RUNS}
    for tag, name, region in predict_runs(big, rounds):
        base = psutil.Process().memory_info().rss
        proxy.body_bytes.clear()
        with PeakRSS(tree=False) as rss:  # prediction runs in this process
            t0 = time.perf_counter()
            predict_region(tmp, head, extractor, name, region, tag)
            seconds = time.perf_counter() - t0
        fetched = sum(proxy.body_bytes.values())
        got[tag].append({"seconds": seconds, "bytes": fetched, "growth": rss.peak - base})
    return predict_summary(got, big, (tmp / "big.tif").stat().st_size)


def predict_summary(got: dict[str, list[dict]], big: int, cog_bytes: int) -> dict:
    """The best of the rounds per run (the least noise), and the ratios."""
    out: dict[str, object] = {"bench": "scale_predict", "cog_px": big, "cog_mb": cog_bytes / 2**20,
                              "rounds": len(got["small_scene"])}  # fmt: skip
    for tag, runs in got.items():
        mpx = (1024 * 1024 if tag == "region_1024" else 512 * 512) / 1e6
        seconds = min(r["seconds"] for r in runs)
        out[tag] = {"mpx": mpx, "seconds": seconds, "s_per_mpx": seconds / mpx,
                    "bytes_read_mb": [r["bytes"] / 2**20 for r in runs],
                    "peak_rss_growth_mb": min(r["growth"] for r in runs) / 2**20}  # fmt: skip
    small, r512, r1024 = out["small_scene"], out["region_512"], out["region_1024"]
    growth = "peak_rss_growth_mb"
    out["region_512_vs_small_scene_peak_rss_growth"] = r512[growth] / small[growth]
    out["region_512_vs_small_scene_s_per_mpx"] = r512["s_per_mpx"] / small["s_per_mpx"]
    out["region_1024_vs_512_bytes_read"] = max(r1024["bytes_read_mb"]) / max(r512["bytes_read_mb"])
    out["region_1024_vs_512_s_per_mpx"] = r1024["s_per_mpx"] / r512["s_per_mpx"]
    out["region_512_bytes_vs_object"] = max(r512["bytes_read_mb"]) / out["cog_mb"]
    return out


def predict_region(tmp: Path, head, extractor, name: str, region, tag: str) -> None:
    outputs = SceneOutputs(str(tmp / f"{tag}.tif"), None, str(tmp / f"{tag}.png"))
    ref = SceneRef(tag, f"s3://{BUCKET}/predict/{name}.tif")
    predict_scene(ref, head, extractor, WindowPlan(64, 16), outputs, batch_size=8, region=region)


def stream_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """``shards`` shards of ``per_shard`` 3-band uint8 tiles of 32 px under ``root``."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (3, 32, 32), dtype=np.uint8) for _ in range(16)]
    uris = []
    for s in range(shards):
        with ShardWriter(str(root), f"train-{s:05d}", 1 << 40) as w:
            for i in range(per_shard):
                w.write(Sample(f"sc{s}/{i}_0", pool[(s + i) % 16], None, {}))
        uris += [info.uri for info in w.shards]
    os.sync()  # the write-back of what was just written must not slow the reads measured next
    return uris


def stream_run(
    uris: list[str], take: int, resume: dict | None = None, index: ShardIndex | None = None
) -> tuple[float, float]:
    """``(seconds to the first tile, tiles/s over the next ``take``)`` of a one-rank stream."""
    stream = ShardStream(uris, 0, 1, Normalizer((128.0,) * 3, (60.0,) * 3), 32, resume=resume, index=index)
    t0 = time.perf_counter()
    it = iter(stream)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(take):
        next(it)
    return first, take / (time.perf_counter() - t1)


def stage_stream(tmp: Path, per_shard: int = 200, take: int = 1500) -> dict:
    """The same shards (``per_shard`` tiles each), 10 of them vs 1,000: 100x the epoch. Both runs
    read ``take`` tiles inside their first epoch (the small one must not re-read warm shards).
    Resume mid-epoch with the manifest's shard counts (the draws replayed, only the buffered
    shards read) and without them (the epoch re-read up to the position)."""
    torch.set_num_threads(1)
    out: dict[str, object] = {"bench": "scale_stream", "tiles_per_shard": per_shard, "tile_px": 32}
    for shards in (10, 1000):
        uris = stream_shards(tmp / f"stream{shards}", shards, per_shard)
        index = ShardIndex({u: per_shard for u in uris}, (3, 32, 32))
        first, rate = stream_run(uris, take, index=index)
        middle = {0: StreamPosition(epoch=0, consumed=shards * per_shard // 2, replayable=True)}
        resumed_first, _ = stream_run(uris, 10, resume=middle, index=index)
        reread_first, _ = stream_run(uris, 10, resume=middle)
        out[str(shards)] = {"tiles": shards * per_shard, "first_tile_s": first, "tiles_per_s": rate,
                            "resume_mid_epoch_first_tile_s": resumed_first,
                            "resume_unindexed_first_tile_s": reread_first}  # fmt: skip
    small, large = out["10"], out["1000"]
    out["1000_vs_10_tiles_per_s"] = large["tiles_per_s"] / small["tiles_per_s"]
    out["1000_vs_10_first_tile_s"] = large["first_tile_s"] / small["first_tile_s"]
    for key in ("resume_mid_epoch", "resume_unindexed"):
        out[f"1000_vs_10_{key}_s"] = large[f"{key}_first_tile_s"] / small[f"{key}_first_tile_s"]
    out["1000_indexed_vs_unindexed_resume_s"] = (
        large["resume_mid_epoch_first_tile_s"] / large["resume_unindexed_first_tile_s"]
    )
    return out


def feature_table(
    root: Path, train_gb: float, val_rows: int, dim: int = 960, part_mb: int = 64
) -> FeatureTable:
    """A table of ~``train_gb`` GB of fp16 ``train`` features (``dim`` channels, parts of
    ``part_mb`` MB, 5 classes each shifting a block of channels) and ``val_rows`` val rows."""
    rng = np.random.default_rng(0)
    part_rows = part_mb * 2**20 // (2 * dim)
    plan = [("train", part_rows)] * max(1, round(train_gb * 2**30 / (part_rows * 2 * dim))) + [
        ("val", val_rows)
    ]
    infos = []
    for p, (split, n) in enumerate(plan):
        y = rng.integers(0, 5, n).astype(np.uint8)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x[np.arange(n)[:, None], (y[:, None] * (dim // 5) + np.arange(32))] += 0.8
        names = np.array([f"{split}-{p}-{k}" for k in range(64)])
        arrays = {"features": x.astype(np.float16), "labels": y, "image": names[np.arange(n) % 64],
                  "rows": np.zeros(n, np.int32), "cols": np.zeros(n, np.int32)}  # fmt: skip
        infos.append(dataclasses.asdict(write_part(str(root), split, arrays, 5)))
    blocks = ["up0.res0", "up1.res0"]
    index = ChannelIndex.build([50, 150, 250], blocks, dict.fromkeys(blocks, dim // 6))
    meta = {
        "kind": TABLE_KIND, "format": TABLE_FORMAT, "checkpoint": "/nowhere", "shards": "/nowhere",
        "dim": dim, "timesteps": [50, 150, 250], "blocks": blocks, "channel_index": index.to_json(),
        "classes": [{"name": f"c{c}", "id": c} for c in range(5)], "parts": infos,
    }  # fmt: skip
    (root / TABLE_META).write_text(json.dumps(meta))
    return str(root)


class AnonPeak(bench_features.PeakRSS):
    """Peak growth of this process's anonymous memory (``RssAnon``: what an OOM kill counts) and
    of its file-backed resident pages (``RssFile``: the mapped table, reclaimable), every 0.1 s;
    ``peak`` is ``{"RssAnon": bytes, "RssFile": bytes}``."""

    def __init__(self) -> None:
        super().__init__()
        self.base = self._read()
        self.peak = dict.fromkeys(self.base, 0)
        self.anon: list[tuple[float, int]] = []  # (monotonic s, RssAnon growth bytes), every sample

    @staticmethod
    def _read() -> dict[str, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            self.peak = {k: max(self.peak[k], now[k] - self.base[k]) for k in now}
            self.anon.append((time.monotonic(), now["RssAnon"] - self.base["RssAnon"]))
            self._stop.wait(0.1)

    def halves(self, start: float) -> tuple[int, int]:
        """Peak ``RssAnon`` growth (bytes) in the first and the second half of the time since
        ``start`` (monotonic s): a fit that leaks per row peaks higher in its second half."""
        mid = (start + self.anon[-1][0]) / 2
        first = [v for t, v in self.anon if start <= t < mid]
        return max(first, default=0), max((v for t, v in self.anon if t >= mid), default=0)


def sweep_fit(root: Path, cache: Path, memory_mb: float) -> dict:
    """One sweep trial's work on the table at ``root``: open it through the node-local cache (as
    a trial does) and fit a residual head for one epoch on all its channels."""
    cfg = TableCacheConfig(cache_dir=str(cache), memory_mb=memory_mb)
    head_cfg = build(HeadConfig, {"kind": "residual", "epochs": 1, "patience": 0, "batch_rows": 4096})
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        table = FeatureTable.open(str(root)).cached(cfg)
        t1 = time.perf_counter()
        started = time.monotonic()
        fit_head(table, table.index.timesteps, table.index.blocks, head_cfg, memory_mb=cfg.memory_mb)
        t2 = time.perf_counter()
    rows, mb = table.rows("train"), table.rows("train") * int(table.meta["dim"]) * 2 / 2**20
    first, second = mem.halves(started)
    return {"train_rows": rows, "table_gb": mb / 1024, "memory_mb": memory_mb, "streamed": mb > memory_mb,
            "cache_s": t1 - t0, "fit_s": t2 - t1, "us_per_row": 1e6 * (t2 - t1) / rows,
            "anon_growth_mb": mem.peak["RssAnon"] / 2**20,
            "anon_growth_fit_first_half_mb": first / 2**20, "anon_growth_fit_second_half_mb": second / 2**20,
            "file_growth_mb": mem.peak["RssFile"] / 2**20}  # fmt: skip


def fresh_sweep_fit(root: Path, cache: Path, memory_mb: float) -> dict:
    """:func:`sweep_fit` in a fresh Python process (a trial's own), so no earlier fit's heap is
    in its memory baseline: measured in one process, the later fits started from the heap the
    earlier ones left and grew less (the small table streamed 412 MB after the in-memory fit,
    against 657-685 MB alone)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--sweep-fit", str(root), str(cache), str(memory_mb)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"the sweep fit on {root} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_sweep(tmp: Path, big_gb: float, small_gb: float = 0.25, memory_mb: float = 1024) -> dict:
    """A sweep trial's head fit on a ``big_gb`` table (beyond ``memory_mb``: streamed) vs a
    ``small_gb`` table held in memory, and the small table streamed too (the cost of streaming
    alone), each fit in a fresh process. Ratios: time per training row per epoch, and anonymous
    memory growth (of the large table streamed against the small one, both held and streamed)."""
    out: dict[str, object] = {"bench": "scale_sweep", "channels": 960, "table_memory_mb": memory_mb}
    small = feature_table(_fresh(tmp / "small"), small_gb, 20_000)
    out["small_in_memory"] = fresh_sweep_fit(Path(small), tmp / "cache", memory_mb)
    out["small_streamed"] = fresh_sweep_fit(Path(small), tmp / "cache", 1.0)
    big = feature_table(_fresh(tmp / "big"), big_gb, 20_000)
    out["big_streamed"] = fresh_sweep_fit(Path(big), tmp / "cache", memory_mb)
    ref, large, streamed = out["small_in_memory"], out["big_streamed"], out["small_streamed"]
    out["big_streamed_vs_small_in_memory_us_per_row"] = large["us_per_row"] / ref["us_per_row"]
    out["small_streamed_vs_in_memory_us_per_row"] = streamed["us_per_row"] / ref["us_per_row"]
    out["big_vs_small_anon_growth"] = large["anon_growth_mb"] / ref["anon_growth_mb"]
    out["big_vs_small_streamed_anon_growth"] = large["anon_growth_mb"] / streamed["anon_growth_mb"]
    return out


def pool_shards(root: Path, tiles: int, per_scene: int = 100) -> list[str]:
    """An ingest-like output of ``tiles`` labeled 3-band 64 px tiles, ``per_scene`` per scene,
    written scene after scene into shards of up to 256 MB (the ingest default), with a manifest."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (3, 64, 64), dtype=np.uint8) for _ in range(16)]
    labels = [rng.integers(0, 5, (64, 64), dtype=np.uint8) for _ in range(16)]
    keys = []
    with ShardWriter(str(root), "train-0000", 256 * 2**20) as w:
        for t in range(tiles):
            keys.append(f"sc{t // per_scene:05d}/{t % per_scene}_0")
            w.write(Sample(keys[-1], images[t % 16], labels[(t // 16) % 16], {}))
    names = [storage_name(i.uri) for i in w.shards]
    write_manifest(
        str(root), Manifest(["r", "g", "b"], "uint8", 64, 64, {"train": tiles}, {"train": names}, {}, {})
    )
    os.sync()
    return keys


def pool_run(root: Path, keys: list[str], draws: dict[str, list[str]]) -> dict:
    """Index the pool as the label-efficiency report does (byte spans), then decode each draw,
    counting the bytes its ranged reads fetch."""
    out: dict[str, object] = {"tiles": len(keys)}
    fetched: list[int] = []
    real_range = rsdiff_storage.read_range

    def counted(uri: str, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return real_range(uri, start, end)

    rsdiff_storage.read_range = counted
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        dense = DenseTiles(str(root), set(keys), Normalizer((128.0,) * 3, (60.0,) * 3))
        out["index_s_per_tile"] = (time.perf_counter() - t0) / len(keys)
        for name, draw in draws.items():
            fetched.clear()
            t0 = time.perf_counter()
            x, _ = dense.get(draw)
            out[f"{name}_s_per_tile"] = (time.perf_counter() - t0) / len(draw)
            out[f"{name}_shards_touched"] = len({dense.where[k][0] for k in draw})
            out[f"{name}_kb_read_per_tile"] = sum(fetched) / 1024 / len(draw)
            assert x.shape == (len(draw), 3, 64, 64)
    rsdiff_storage.read_range = real_range
    out["anon_growth_mb"] = mem.peak["RssAnon"] / 2**20
    return out


def stage_pool(tmp: Path, sizes: tuple[int, int] = (1000, 100_000)) -> dict:
    """The label-efficiency report's labeled tiles over a pool of ``sizes[0]`` vs ``sizes[1]``
    tiles: indexing, then a draw of 3 whole scenes (``unit=scenes``) and one of 100 tiles from
    anywhere (``unit=tiles``): seconds per tile and anonymous memory growth."""
    out: dict[str, object] = {"bench": "scale_label_pool", "tile": "3x64x64 uint8 + label"}
    for n in sizes:
        keys = pool_shards(_fresh(tmp / f"pool{n}"), n)
        rng = np.random.default_rng(1)
        scenes = set(rng.choice(n // 100, 3, replace=False).tolist())
        draws = {"scene_draw": [k for k in keys if int(k[2:7]) in scenes],
                 "tile_draw": sorted(rng.choice(keys, 100, replace=False).tolist())}  # fmt: skip
        out[str(n)] = pool_run(tmp / f"pool{n}", keys, draws)
    small, large = out[str(sizes[0])], out[str(sizes[1])]
    for key in ("index_s_per_tile", "scene_draw_s_per_tile", "tile_draw_s_per_tile", "anon_growth_mb"):
        out[f"large_vs_small_{key}"] = large[key] / small[key]
    return out


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def _relative(rows: list[dict], size: str, cost: str, rss: str | None) -> tuple[list, list, list]:
    """``(sizes, cost per unit / the first row's, RSS / the first row's)`` of ``rows``."""
    first = rows[0]
    return (
        [r[size] for r in rows],
        [r[cost] / first[cost] for r in rows],
        [r[rss] / first[rss] for r in rows] if rss else [],
    )


def curves(result: dict) -> dict[str, tuple[list, list, list]]:
    """The lines of one stage's result: ``{label: (sizes, relative cost per unit, relative RSS)}``."""
    bench = result["bench"]
    if bench == "scale_ingest":
        out = {}
        for where in ("local", "s3"):
            rows = [result[k] for k in (f"{where}_1x", f"{where}_10x", f"{where}_100x") if k in result]
            out[f"ingest, {where} (tiles)"] = _relative(rows, "tiles", "s_per_tile", "peak_rss_mb")
        return out
    if bench == "scale_extract":
        rows = [v for v in result.values() if isinstance(v, dict) and "images_per_s" in v]
        rows = [{**r, "s_per_image": 1 / r["images_per_s"]} for r in rows]
        return {"extract (images)": _relative(rows, "images", "s_per_image", "peak_rss_mb")}
    if bench == "scale_predict":
        rows = [{**result["small_scene"], "scene_mpx": 0.262144},
                {**result["region_512"], "scene_mpx": result["cog_px"] ** 2 / 1e6}]  # fmt: skip
        label = "predict 512 px, scene size (megapixels)"
        return {label: _relative(rows, "scene_mpx", "s_per_mpx", "peak_rss_growth_mb")}
    if bench == "scale_sweep":
        rows = [result["small_in_memory"], result["big_streamed"]]
        return {"sweep trial, table size (GB)": _relative(rows, "table_gb", "us_per_row", "anon_growth_mb")}
    if bench == "scale_label_pool":
        rows = [result[n] for n in ("1000", "100000")]
        return {"label-efficiency draw of 100 tiles, pool (tiles)": _relative(
            rows, "tiles", "tile_draw_s_per_tile", "anon_growth_mb")}  # fmt: skip
    rows = [{"shards": int(n), "s_per_tile": 1 / result[n]["tiles_per_s"]} for n in ("10", "1000")]
    out = {"pretraining stream (shards)": _relative(rows, "shards", "s_per_tile", None)}
    if "resume_unindexed_first_tile_s" in result["10"]:
        rows = [{"shards": int(n), "s": result[n]["resume_mid_epoch_first_tile_s"]} for n in ("10", "1000")]
        out["stream resume mid-epoch, replayed (shards)"] = _relative(rows, "shards", "s", None)
    return out


def plot(results: list[dict], path: Path) -> None:
    """Cost per unit of work and peak RSS against size, relative to each stage's smallest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.6))
    lines = [line for result in results for line in curves(result).items()]
    for i, (name, (x, cost, rss)) in enumerate(lines):
        a.plot(x, cost, marker="o", color=f"C{i}", label=name)
        if rss:
            b.plot(x, rss, marker="o", color=f"C{i}")
    stream = next((r for r in results if r["bench"] == "scale_stream"), None)
    if stream:
        keys = ("1000_vs_10_resume_unindexed_s", "1000_vs_10_resume_mid_epoch_s")
        ratio = stream[next(k for k in keys if k in stream)]
        note = f"resuming the stream mid-epoch without shard counts: {ratio:.0f}x (off the chart)"
        a.text(0.02, 0.97, note, transform=a.transAxes, va="top", fontsize=7, color="grey")
    for ax, what in ((a, "seconds per unit of work"), (b, "peak memory")):
        ax.set_xscale("log")
        ax.axhline(1.2, color="grey", ls="--", lw=1, label="goal: <= 1.2x" if ax is a else None)
        ax.set_xlabel("size (tiles, images, megapixels of the scene, shards or GB)")
        ax.set_ylabel(f"{what}, relative to the smallest run")
        ax.set_ylim(0, 2.6)
    fig.legend(fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("How rsdiff's cost grows with the work (2 CPUs; 1.0 = the stage's smallest run)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)


def rounded(obj):
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return round(obj, 4) if isinstance(obj, float) else obj


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="ingest,extract,predict,stream,sweep,pool")
    parser.add_argument("--scenes", type=int, default=72, help="ingest's 1x scene count")
    parser.add_argument("--s3-up-to", type=int, default=10, choices=(10, 100), help="largest S3 ingest")
    parser.add_argument("--extract-tiles", default="500,10000", help="the small and the large extraction")
    parser.add_argument("--cog-px", type=int, default=16384, help="side of the large COG")
    parser.add_argument("--table-gb", type=float, default=10.0, help="the sweep's large feature table")
    parser.add_argument("--tmp", default=None, help="work folder (default: temporary; 5 GB + 2x --table-gb)")
    parser.add_argument(
        "--plot", nargs="+", metavar="FILE",
        help="only plot: results files (a later line for a stage replaces an earlier one), then the PNG",
    )  # fmt: skip
    parser.add_argument("--sweep-fit", nargs=3, metavar=("TABLE", "CACHE", "MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep_fit:
        torch.set_num_threads(2)
        table, cache, mb = args.sweep_fit
        return print(json.dumps(sweep_fit(Path(table), Path(cache), float(mb))))
    if args.plot:
        if len(args.plot) < 2:
            parser.error("--plot needs at least one results file and the PNG to write")
        latest = {}  # per stage, the last line of the files given
        for name in args.plot[:-1]:
            for line in Path(name).read_text().splitlines():
                if line.strip():
                    result = json.loads(line)
                    latest[result["bench"]] = result
        return plot(list(latest.values()), Path(args.plot[-1]))
    if args.cog_px < 8192 or args.cog_px % 512:
        parser.error("--cog-px must be a multiple of 512 and at least 8192 (room for two rounds of regions)")
    stages = args.stages.split(",")
    start_s3_server()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        runs = {
            "ingest": lambda: stage_ingest(tmp / "ingest", args.scenes, args.s3_up_to),
            "extract": lambda: stage_extract(
                tmp / "extract", tuple(int(v) for v in args.extract_tiles.split(","))
            ),
            "predict": lambda: stage_predict(tmp / "predict", args.cog_px),
            "stream": lambda: stage_stream(tmp / "stream"),
            "sweep": lambda: stage_sweep(tmp / "sweep", args.table_gb),
            "pool": lambda: stage_pool(tmp / "pool"),
        }
        for stage in stages:
            (tmp / stage).mkdir()
            print(json.dumps(rounded({**runs[stage](), "cpus": os.cpu_count()})), flush=True)


if __name__ == "__main__":
    main()
