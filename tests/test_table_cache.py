"""The node-local feature-table copy and in-memory head training, on a small table written here
(two Gaussian classes per split, no Ray). Sharing across processes on one node is checked with
real processes racing to build the copy."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from table_copy_child import copy_in_child

from rsdiff.config import build, check_ranges
from rsdiff.errors import ConfigError, DataError
from rsdiff.features import cache
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.index import ChannelIndex
from rsdiff.features.parts import read_part, write_part
from rsdiff.features.table import FORMAT_VERSION, KIND, TABLE_META, FeatureTable
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import MemoryRows, StreamedRows, fit_head, head_rows

pytestmark = pytest.mark.unit

DIM = 12


def write_table(root: Path, seed: int = 0, parts_per_split: int = 3, rows: int = 200) -> FeatureTable:
    """Parts of ``rows`` rows: class 1 shifts the first 6 channels by +1.5 sd; 5 images per part."""
    rng = np.random.default_rng(seed)
    infos = []
    for split in ("train", "val"):
        for p in range(parts_per_split):
            y = rng.integers(0, 2, rows).astype(np.uint8)
            x = rng.normal(size=(rows, DIM)).astype(np.float32)
            x[:, :6] += 1.5 * y[:, None]
            arrays = {
                "features": x.astype(np.float16), "labels": y,
                "image": np.array([f"{split}-img{p}-{i % 5}" for i in range(rows)]),
                "rows": rng.integers(0, 64, rows).astype(np.int32),
                "cols": rng.integers(0, 64, rows).astype(np.int32),
            }  # fmt: skip
            infos.append(dataclasses.asdict(write_part(str(root), split, arrays, 2)))
    index = ChannelIndex.build([10, 50], ["up0.res0", "up1.res0"], {"up0.res0": 4, "up1.res0": 2})
    meta = {
        "kind": KIND, "format": FORMAT_VERSION, "checkpoint": "/nowhere/ckpt", "shards": "/nowhere/shards",
        "dim": DIM, "timesteps": [10, 50], "blocks": ["up0.res0", "up1.res0"],
        "channel_index": index.to_json(),
        "classes": [{"name": "a", "id": 0}, {"name": "b", "id": 1}], "parts": infos,
    }  # fmt: skip
    (root / TABLE_META).write_text(json.dumps(meta))
    return FeatureTable.open(str(root))


def test_the_node_copy_holds_every_part_exactly(tmp_path):
    table = write_table(tmp_path / "t")
    stale = tmp_path / "cache" / f"{cache.table_key(table.root, table.meta)}.tmp-killed"
    stale.mkdir(parents=True)  # what a build killed midway leaves
    (stale / "train.features.npy").write_bytes(b"half")
    local = table.cached(TableCacheConfig(cache_dir=str(tmp_path / "cache")))
    assert not stale.exists()
    assert local.local is not None and local.local.entry.parent == tmp_path / "cache"
    for p in table.meta["parts"]:
        want, got = read_part(table.root, p["name"]), local.part(p["name"])
        for column, values in want.items():
            assert np.array_equal(values, got[column]), (p["name"], column)
    chans = table.index.select([50], ["up0.res0"])
    for split in ("train", "val"):
        a, b = table.load(split, chans, {f"{split}-img1-3"}), local.load(split, chans, {f"{split}-img1-3"})
        assert a[0].shape == (40, 4) and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert local.count_rows("train", {"train-img0-0", "train-img2-4"}) == 80  # exact with a copy
    assert table.count_rows("train", {"train-img0-0", "train-img2-4"}) == 80  # exact without one too
    # The same table opened again maps the same entry; a re-extraction to the same URI gets a new one.
    again = FeatureTable.open(table.root).cached(TableCacheConfig(cache_dir=str(tmp_path / "cache")))
    assert again.local.entry == local.local.entry
    write_table(tmp_path / "t", seed=1)
    fresh = FeatureTable.open(table.root).cached(TableCacheConfig(cache_dir=str(tmp_path / "cache")))
    assert fresh.local.entry != local.local.entry
    assert not np.array_equal(fresh.load("train")[0], local.load("train")[0])


def test_processes_on_one_node_build_one_copy_and_share_it(tmp_path):
    table = write_table(tmp_path / "t", parts_per_split=8, rows=2000)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=copy_in_child, args=(table.root, str(tmp_path / "c"), queue)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({entry for entry, _ in results}) == 1 and len({s for _, s in results}) == 1
    left = sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir())
    # No half-built temporary folder beside it. Without the lock, all three would build a copy and
    # two would fail to rename theirs onto the first (exit code 1 above).
    assert left == [Path(results[0][0]).name]


def test_the_least_recently_used_copy_is_evicted_and_a_too_large_table_is_read_from_storage(tmp_path):
    first, second = write_table(tmp_path / "a"), write_table(tmp_path / "b", seed=2)
    size = cache.table_bytes(first.meta)
    cfg = TableCacheConfig(cache_dir=str(tmp_path / "c"), max_gb=1.2 * size / 2**30)
    a = first.cached(cfg)
    b = second.cached(cfg)  # both do not fit: a's copy goes
    assert not a.local.entry.exists() and b.local.entry.exists()
    assert np.array_equal(a.load("val")[0], first.load("val")[0])  # a mapped copy stays readable
    small = TableCacheConfig(cache_dir=str(tmp_path / "d"), max_gb=0.5 * size / 2**30)
    assert first.cached(small).local is None  # read from storage instead, with a warning
    assert first.cached(TableCacheConfig(node_cache=False)).local is None


def test_a_damaged_node_copy_is_checked_and_built_again(tmp_path, caplog):
    """A feature file replaced by other values of the same shape, or cut short, is found before
    any trial maps it, and the entry is built again from the table."""
    table = write_table(tmp_path / "t")
    cfg = TableCacheConfig(cache_dir=str(tmp_path / "c"))
    want = table.load("train")[0]
    entry = table.cached(cfg).local.entry
    garbage = np.random.default_rng(9).normal(size=want.shape).astype(np.float16)
    np.save(entry / "train.features.npy", garbage)  # same shape, same size, other values
    again = table.cached(cfg)
    assert np.array_equal(again.load("train")[0], want)
    assert "train.features.npy is not what was written (sha256 differs); building it again" in caplog.text
    with open(entry / "val.features.npy", "r+b") as fh:  # a copy cut short (a full disk, a killed copy)
        fh.truncate(1000)
    assert np.array_equal(table.cached(cfg).load("val")[0], table.load("val")[0])
    assert "val.features.npy holds 1000 bytes" in caplog.text
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == [entry.name]


def _refused_build(root: str, cache_dir: str, out: multiprocessing.Queue) -> None:
    import logging
    import resource
    import signal

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an OSError instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    table = FeatureTable.open(root)
    cached = table.cached(TableCacheConfig(cache_dir=cache_dir))
    out.put((cached.local is None, float(cached.load("train")[0].astype(np.float64).sum())))


def test_a_build_the_disk_refuses_or_an_unusable_cache_folder_falls_back_to_storage(tmp_path, caplog):
    table = write_table(tmp_path / "t")
    total = float(table.load("train")[0].astype(np.float64).sum())
    # The disk refuses the copy midway (a file size limit here, as a full disk would): read from
    # storage instead, and no half-built folder is left behind.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_refused_build, args=(table.root, str(tmp_path / "c"), queue))
    child.start()
    assert queue.get(timeout=60) == (True, total)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == []
    # A folder that cannot be used: a file in the way, another user's folder, one others can write.
    (tmp_path / "file").write_text("x")
    others = tmp_path / "others"
    others.mkdir()
    os.chown(others, 65534, 65534)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir(mode=0o777)
    open_to_all.chmod(0o777)
    for folder, why in [(tmp_path / "file", "File exists"), (others, "belongs to uid 65534"),
                        (open_to_all, "is writable by other users (mode 777)")]:  # fmt: skip
        caplog.clear()
        got = table.cached(TableCacheConfig(cache_dir=str(folder)))
        assert got.local is None and why in caplog.text and "reading feature table" in caplog.text
    assert not list(others.iterdir()) and not list(open_to_all.iterdir())


def test_the_default_cache_folder_is_this_users_own(monkeypatch, tmp_path):
    monkeypatch.delenv("RSDIFF_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = cache.cache_root(TableCacheConfig())
    assert root == tmp_path / f"rsdiff-cache-{os.getuid()}"
    table = write_table(tmp_path / "t")
    assert table.cached(TableCacheConfig()).local.entry.parent == root
    assert root.stat().st_mode & 0o777 == 0o700


def test_room_is_made_before_the_free_disk_is_judged_and_builds_in_flight_count(tmp_path, monkeypatch):
    """On a disk that holds 1.5 tables, a new table replaces the old copy (evicted first, then the
    free space judged); while another process is building a copy of the same size, a third table is
    read from storage rather than fill the disk under it."""
    first, second, third = (write_table(tmp_path / n, seed=i) for i, n in enumerate("abc"))
    size = cache.table_bytes(first.meta)
    folder = tmp_path / "cache"
    disk = 1.5 * size  # a small disk holding only the cache
    monkeypatch.setattr(cache, "free_bytes", lambda _: int(disk - sum(
        f.stat().st_size for f in folder.rglob("*") if f.is_file())))  # fmt: skip
    cfg = TableCacheConfig(cache_dir=str(folder))
    a = first.cached(cfg)
    b = second.cached(cfg)
    assert b.local is not None and not a.local.entry.exists()
    # Another process builds a fourth table's copy (it holds that key's lock; nothing written yet).
    b.local.entry.rename(folder / "gone")  # room for exactly one more table
    shutil.rmtree(folder / "gone")
    (folder / "k4.tmp-build").mkdir()
    (folder / "k4.tmp-build" / cache.EXPECTED).write_text(str(size))
    with cache._locked(folder / "k4.lock"):
        assert third.cached(cfg).local is None
    assert third.cached(cfg).local is not None  # that build was abandoned: its folder is cleared
    assert not (folder / "k4.tmp-build").exists()


def test_heads_train_in_memory_within_the_budget_and_stream_above_it(tmp_path):
    table = write_table(tmp_path / "t").cached(TableCacheConfig(cache_dir=str(tmp_path / "c")))
    chans = table.index.select([10, 50], ["up0.res0"])  # 8 channels x 600 rows x 2 bytes = 9.4 KiB
    assert isinstance(head_rows(table, "train", chans, None, 1.0, "cpu"), MemoryRows)
    assert isinstance(head_rows(table, "train", chans, None, 0.005, "cpu"), StreamedRows)
    cfg = build(HeadConfig, {"kind": "residual", "epochs": 4, "patience": 4, "width": 32, "depth": 1})
    in_memory = fit_head(table, [10, 50], ["up0.res0"], cfg, memory_mb=1.0)
    streamed = fit_head(table, [10, 50], ["up0.res0"], cfg, memory_mb=0.0)
    # The first 6 channels separate the classes: both paths learn it, to the same quality.
    assert in_memory.metrics["miou"] > 0.6 and streamed.metrics["miou"] > 0.6
    assert abs(in_memory.metrics["miou"] - streamed.metrics["miou"]) < 0.05
    np.testing.assert_allclose(in_memory.mean, streamed.mean, rtol=1e-5)
    np.testing.assert_allclose(in_memory.std, streamed.std, rtol=1e-4)


def test_bad_cache_settings_name_the_setting():
    with pytest.raises(ConfigError, match=r"table.memory_mb=-1 is out of range"):
        check_ranges(TableCacheConfig(memory_mb=-1), "table.")
    with pytest.raises(ConfigError, match=r"table.max_gb=0 is out of range"):
        check_ranges(TableCacheConfig(max_gb=0), "table.")


def test_patience_zero_means_no_early_stopping_for_heads_as_for_the_scratch_unet(tmp_path):
    """``patience=0`` stopped a feature head after its first epoch without a better val mIoU,
    while the scratch UNet and segmenters read 0 as "run every step"."""
    table = write_table(tmp_path / "t")
    # nothing is learnt at this rate: no epoch beats the first
    settings = {"kind": "residual", "width": 16, "depth": 1, "epochs": 5, "lr": 1e-12, "dropout": 0.0}
    stopped = fit_head(table, [10, 50], ["up0.res0"], build(HeadConfig, {**settings, "patience": 1}))
    assert stopped.metrics["epochs_run"] == 2 and stopped.metrics["best_epoch"] == 1
    patient = fit_head(table, [10, 50], ["up0.res0"], build(HeadConfig, {**settings, "patience": 0}))
    assert patient.metrics["epochs_run"] == 5
    with pytest.raises(ConfigError, match=r"head\.patience=-1 is out of range"):
        fit_head(table, [10, 50], ["up0.res0"], build(HeadConfig, {**settings, "patience": -1}))


def test_streamed_batches_hold_one_group_of_parts_not_the_split_or_two_groups(tmp_path):
    """Streaming a 12-part split four parts at a time from the node copy: the peak of what the
    reader allocates stays under twice one group's features (one group, its shuffle order and a
    batch), not the split's, and every row comes exactly once."""
    import tracemalloc

    table = write_table(tmp_path / "t", parts_per_split=12, rows=20_000)
    table = table.cached(TableCacheConfig(cache_dir=str(tmp_path / "c")))
    chans = table.index.select([10, 50], ["up0.res0", "up1.res0"])  # all 12 channels, by index
    group_bytes = 4 * 20_000 * DIM * 2
    tracemalloc.start()
    seen, total = 0, 0
    for _x, y in table.iter_batches("train", chans, 4096, shuffle=True, seed=1, mix_parts=4):
        seen, total = seen + len(y), total + int(y.sum())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == 12 * 20_000 and total == int(table.class_rows("train")[1])
    assert peak < 2 * group_bytes, (peak, group_bytes)


def test_a_part_holding_other_rows_than_its_table_json_says_is_one_clear_error(tmp_path):
    table = write_table(tmp_path / "t")
    meta = json.loads(json.dumps(table.meta))
    meta["parts"][0]["rows"] += 1
    with pytest.raises(DataError, match=r"holds 200 rows, its table.json says 201: re-extract the table"):
        next(FeatureTable(table.root, meta).iter_batches(meta["parts"][0]["split"], shuffle=True))
