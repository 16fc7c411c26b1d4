"""Frozen features with Ray Data (``run_extract`` / ``jobs/extract.py``), the heads and metrics,
on labeled tiles (dubai-aerial's where present, else the generated sample), a real local Ray and
the loopback S3 server."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, extract_features, features_by_pixel, run_job_inline

from rsdiff.config import build, load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.shards import iter_shard
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.errors import CheckpointError, ConfigError, DataError
from rsdiff.features.blocks import block_channels, list_blocks
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import keep_fraction, run_extract, tile_draw
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.features.parts import read_part
from rsdiff.features.table import FeatureTable
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.ingest import run_ingest
from rsdiff.metrics import ConfusionMatrix

EXTRACT = REPO / "configs" / "extract" / "tiny.yaml"


@pytest.mark.integration
def test_extraction_to_s3_and_channel_index(labeled_ckpt, labeled_table):
    table = labeled_table
    assert table.root == "s3://rsdiff-features/table"
    ddpm = load_pretrained(labeled_ckpt[0])
    decoder = [b for b in list_blocks(ddpm.model) if b.startswith("up")]
    assert table.meta["blocks"] == decoder and table.meta["timesteps"] == [10, 100]
    shapes = block_channels(ddpm.model, int(ddpm.meta["in_channels"]), 64)
    ranges = table.index.ranges
    assert [(r.timestep, r.block) for r in ranges] == [(t, b) for t in (10, 100) for b in decoder]
    assert all(r.stop - r.start == shapes[r.block][0] for r in ranges)
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges)) and ranges[0].start == 0
    assert table.meta["dim"] == ranges[-1].stop
    part = read_part(table.root, table.parts("train")[0]["name"])
    assert part["features"].dtype == np.float16 and part["features"].shape[1] == table.meta["dim"]
    assert part["labels"].dtype == np.uint8 and (part["labels"] < table.num_classes).all()
    assert table.rows("train") > 0 and table.rows("val") > 0
    # stratified cap: at most pixels_per_class rows per class per image
    for img in set(part["image"].tolist()):
        sel = part["image"] == img
        assert np.bincount(part["labels"][sel]).max() <= 16


@pytest.mark.integration
def test_an_image_cap_samples_every_scene_not_the_first_shards(labeled_ckpt, labeled_table):
    """``max_images=24`` keeps a seeded random share of each split's tiles: spread over its scenes
    (the first 24 tiles in shard order were one or two whole scenes), reproducible by key."""
    manifest = read_manifest(labeled_ckpt[1])
    for split in ("train", "val"):
        keys = set()
        for part in labeled_table.parts(split):
            keys.update(str(k) for k in np.unique(read_part(labeled_table.root, part["name"])["image"]))
        keep = keep_fraction(24, manifest.samples[split])
        assert 0 < len(keys) <= 24 and all(tile_draw(k, 0) < keep for k in keys), (split, keep)
        scenes = {k.split("/", 1)[0] for k in keys}
        assert scenes <= set(manifest.scenes[split])
        assert len(scenes) >= min(3, len(manifest.scenes[split])), (split, sorted(scenes))


@pytest.mark.integration
def test_same_pixels_give_identical_features_and_subsets_match_direct_extraction(
    labeled_ckpt, labeled_table, tmp_path, weight_reads
):
    ckpt, shards = labeled_ckpt
    again = extract_features(ckpt, shards, tmp_path / "again")
    assert weight_reads == []  # the driver plans from the model's structure; the actors load it
    assert again.meta["checkpoint_sha256"] == labeled_table.meta["checkpoint_sha256"]
    a, b = features_by_pixel(labeled_table, "train"), features_by_pixel(again, "train")
    assert a.keys() == b.keys() and len(a) > 100
    for key in list(a)[:200]:
        np.testing.assert_array_equal(a[key], b[key])  # fixed noise: bit-identical

    # A subset chosen through the channel index == features extracted directly with that subset.
    ddpm = load_pretrained(ckpt)
    sub_t, sub_b = [100], ["up1.res0", "up2.res1"]
    direct = FeatureExtractor(ddpm, sub_t, sub_b)
    channels = labeled_table.index.select(sub_t, sub_b)
    assert len(channels) == direct.dim
    manifest = read_manifest(shards)
    tiles = {s.key: s for u in manifest.shard_uris("train") for s in iter_shard(u)}
    checked = 0
    for (img, r, c), feats in list(a.items())[:: max(1, len(a) // 40)]:
        x = torch.from_numpy(ddpm.normalizer(tiles[img].image))[None]
        dense = direct.dense(x)[0, :, r, c].numpy()
        np.testing.assert_allclose(feats[channels].astype(np.float32), dense, rtol=2e-3, atol=2e-3)
        checked += 1
    assert checked >= 20


def _majority_miou(table: FeatureTable) -> float:
    majority = int(table.class_rows("train").argmax())
    cm = ConfusionMatrix(table.num_classes)
    for _, y in table.iter_batches("val", np.arange(1)):
        cm.update(np.full_like(y, majority), y)
    return cm.miou()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["residual", "ensemble"])
def test_heads_beat_the_majority_baseline_and_reload(labeled_table, tmp_path, kind):
    cfg = build(
        HeadConfig,
        {"kind": kind, "epochs": 8, "width": 64, "depth": 1, "members": 4, "batch_rows": 256, "lr": 3e-3,
         "input_noise": 0.05, "class_weighting": "none"},
    )  # fmt: skip
    epochs = []
    head = fit_head(
        labeled_table, [10, 100], labeled_table.index.blocks, cfg, on_epoch=lambda e, m: epochs.append(m)
    )
    baseline = _majority_miou(labeled_table)
    assert head.metrics["miou"] > baseline + 0.03, (head.metrics["miou"], baseline)
    assert head.metrics["validated_on"] == "val" and len(epochs) == head.metrics["epochs_run"]
    head.save(str(tmp_path / "head"))
    loaded = TrainedHead.load(str(tmp_path / "head"))
    x, _ = next(
        labeled_table.iter_batches("val", labeled_table.index.select([10, 100], labeled_table.index.blocks))
    )
    a, pa = head.predict(torch.from_numpy(x))
    b, pb = loaded.predict(torch.from_numpy(x))
    assert torch.equal(a, b) and torch.allclose(pa, pb)
    if kind == "ensemble":
        u = loaded.module.uncertainty(loaded.standardise(torch.from_numpy(x)))
        assert (
            u.shape == (len(x),) and (u >= 0).all() and (u <= np.log(labeled_table.num_classes) + 1e-5).all()
        )


@pytest.mark.unit
def test_metrics_match_a_hand_computed_confusion_matrix():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(pred[:1], target[:1])
    cm.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    # kept pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); the ignore pixels drop out on both sides
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.overall_accuracy() == pytest.approx(4 / 6)
    np.testing.assert_allclose(cm.f1(), [2 / 4, 4 / 5, 2 / 3])
    empty = ConfusionMatrix(4)
    assert empty.iou().shape == (4,) and np.isnan(empty.iou()).all() and empty.miou() == 0.0
    fig = cm.plot(["a", "b", "c"], title="val")
    ax = fig.axes[0]
    # Precision beside the diagonal's recall: class 0 is called for 2 pixels of which 1 is class 0.
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "a\nprecision 0.50", "b\nprecision 0.67", "c\nprecision 1.00"]  # fmt: skip
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a\nIoU 0.33", "b\nIoU 0.67", "c\nIoU 0.50"]
    assert ax.get_title() == "val"
    np.testing.assert_allclose(cm.precision(), [1 / 2, 2 / 3, 1])
    # Row-normalised shares over counts, row by row (true class), as the matrix above.
    cells = [t.get_text().split("\n") for t in ax.texts]
    assert cells == [["0.50", "1"], ["0.50", "1"], ["0.00", "0"], ["0.00", "0"], ["1.00", "2"],
                     ["0.00", "0"], ["0.50", "1"], ["0.00", "0"], ["0.50", "1"]]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(
    ("override", "error", "needle"),
    [
        ("checkpoint={tmp}/nothing", CheckpointError, "no rsdiff.json at"),
        ("checkpoint={fake}", CheckpointError, "is not an rsdiff DDPM checkpoint"),
        ("blocks=[up9.res0]", ConfigError, "unknown block 'up9.res0'; valid blocks: ['mid', 'up0.res0'"),
        ("blocks=[99]", ConfigError, "block index 99 is out of range"),
        ("timesteps=[10,1000]", ConfigError, "each must be in [0, 999]"),
        ("shards={unlabeled}", DataError, "carry no labels"),
        ("shards={nolabels}", DataError, "no labeled pixel"),
        ("read_ahead_mb=8", ConfigError, "read_ahead_mb"),
    ],
)
def test_extract_bad_inputs(labeled_ckpt, unlabeled_shards, tmp_path, override, error, needle):
    ckpt, shards = labeled_ckpt
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "rsdiff.json").write_text('{"kind": "something-else"}')
    fmt = {"tmp": tmp_path, "fake": fake, **unlabeled_shards}
    cfg = load_config(
        ExtractConfig, EXTRACT, [f"checkpoint={ckpt}", f"shards={shards}", f"output={tmp_path / 'o'}",
                                 override.format(**fmt)]
    )  # fmt: skip
    with pytest.raises(error) as err:
        run_extract(cfg)
    assert needle in str(err.value)
    assert not (tmp_path / "o" / "table.json").exists()


@pytest.fixture(scope="session")
def unlabeled_shards(labeled_source, tmp_path_factory, ray_cluster) -> dict[str, str]:
    """Shards of the labeled scenes ingested without labels, and with every class ignored."""
    import glob

    root = tmp_path_factory.mktemp("nolabels")
    src = labeled_source
    one = sorted(glob.glob(src.inputs))[0]  # one scene is enough
    run_ingest(
        load_config(IngestConfig, None, [f"inputs=[{one}]", f"output={root / 'unlabeled'}", "tile_size=64"])
    )
    run_ingest(
        load_config(
            IngestConfig, src.preset,
            [f"inputs=[{one}]", f"output={root / 'nolabels'}", "tile_size=64", "val_fraction=0",
             *src.unlabel],
        )
    )  # fmt: skip
    return {"unlabeled": str(root / "unlabeled"), "nolabels": str(root / "nolabels")}


@pytest.mark.integration
def test_extract_job_lists_blocks_on_error(labeled_ckpt, tmp_path, ray_address):
    ckpt, shards = labeled_ckpt
    proc = run_job_inline(
        "extract.py", "--config", str(EXTRACT), f"checkpoint={ckpt}", f"shards={shards}",
        f"output={tmp_path}", "blocks=[decoder.5]",
    )  # fmt: skip
    assert proc.returncode == 2 and "valid blocks: ['mid', 'up0.res0'" in proc.stderr


@pytest.mark.unit
def test_the_shard_reader_streams_so_memory_follows_one_tile_not_the_shard(tmp_path):
    """Extraction's reader over one shard of 400 labeled tiles (3.5 MiB decoded) holds one tile at
    a time: consuming its rows one by one peaks below a tenth of the shard (before, it returned the whole
    shard as one list); the rows are the shard's samples in order, a malformed sample and a
    truncated shard are reported, not lost."""
    import tracemalloc

    from rsdiff.data.shards import Sample, ShardWriter
    from rsdiff.features.extract import read_labeled_tiles

    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path), "train-0000", 1 << 30) as w:
        for i in range(400):
            w.write(Sample(f"s{i // 20}/{i}_0", rng.integers(0, 255, (4, 32, 32), np.uint16),
                           rng.integers(0, 3, (32, 32), np.uint8), {}))  # fmt: skip
        w.write(Sample("bad/0_0", np.zeros((4, 16, 16), np.uint16), np.zeros((16, 16), np.uint8), {}))
    shard = w.shards[0].uri
    reports: list[tuple[str, str]] = []
    rows = read_labeled_tiles(shard, "train", 4, 32, 1.0, 0, lambda kind, why: reports.append((kind, why)))
    tracemalloc.start()
    keys = [row["key"] for row in rows]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shard_bytes = 400 * (4 * 32 * 32 * 2 + 32 * 32)
    assert peak < shard_bytes / 10, f"reading one shard peaked at {peak} bytes of its {shard_bytes}"
    assert keys == [s.key for s in iter_shard(shard)][:400]
    assert [k for k, _ in reports] == ["bad_samples"] and "bad/0_0" in reports[0][1]

    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shard).read_bytes()[: w.shards[0].bytes // 2])
    reports.clear()
    got = sum(1 for _ in read_labeled_tiles(str(cut), "train", 4, 32, 1.0, 0, lambda *r: reports.append(r)))
    assert 0 < got < 400 and reports == [reports[0]] and reports[0][0] == "bad_shards"
    assert f"unreadable after {got} samples" in reports[0][1]


@pytest.mark.integration
def test_the_read_ahead_bound_keeps_the_object_store_flat_behind_a_slow_consumer(ray_cluster):
    """Readers that produce 640 MiB of tiles for a consumer that takes 30 ms a batch: bounded at
    32 MiB, the object store never holds much more than the bound; unbounded (as before), Ray
    Data's readers run ahead up to a share of the whole store, past that ceiling."""
    import threading
    import time

    import ray

    from rsdiff.features.extract import bound_read_ahead

    def tiles(item):  # 32 rows of 1 MiB per item
        for i in range(32):
            yield {"id": item["id"] * 32 + i, "image": np.full(2**20, item["id"], np.uint8)}

    def slow(batch):
        time.sleep(0.03)
        return {"id": batch["id"]}

    def store_peak(read_ahead_mb: int | None) -> float:
        ds = ray.data.from_items([{"id": i} for i in range(20)]).flat_map(tiles)
        ds = (bound_read_ahead(ds, read_ahead_mb) if read_ahead_mb else ds).map_batches(slow, batch_size=4)
        total = ray.cluster_resources()["object_store_memory"]

        def used() -> float:  # what other tests of the session left in the store is subtracted
            return total - ray.available_resources().get("object_store_memory", total)

        base, peak, done = used(), 0.0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, used() - base)
                done.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        ids = sorted(int(i) for b in ds.iter_batches(batch_size=None) for i in b["id"])
        done.set()
        sampler.join()
        assert ids == list(range(640))  # every tile once, none lost to the bound
        return peak / 2**20

    bounded_peak, free_peak = store_peak(32), store_peak(None)
    assert bounded_peak < 80, f"bounded at 32 MiB, the store held {bounded_peak:.0f} MiB"
    assert free_peak > 80, f"unbounded, the store held only {free_peak:.0f} MiB"  # the bound is what held it
