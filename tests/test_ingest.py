"""Ingest through its public entries (``run_ingest`` and ``jobs/ingest.py``) against real Ray,
rasterio and the loopback S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import REPO, run_job_inline
from PIL import Image

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.shards import iter_shard
from rsdiff.data.synthetic import write_scene
from rsdiff.errors import ConfigError, DataError, StorageError
from rsdiff.ingest import run_ingest
from rsdiff.train.shuffle import ShardIndex

pytestmark = pytest.mark.integration

DUBAI_PRESET = REPO / "configs" / "ingest" / "dubai.yaml"
SAMPLE_PRESET = REPO / "configs" / "ingest" / "sample.yaml"
DUBAI_COLOURS = {  # independent of the preset: the dataset README's table
    (60, 16, 152): 0,
    (132, 41, 246): 1,
    (110, 193, 228): 2,
    (254, 221, 58): 3,
    (226, 169, 41): 4,
}


def _all_samples(manifest):
    """``(split, sample)`` of every shard."""
    for split in sorted(manifest.shards):
        for uri in manifest.shard_uris(split):
            for sample in iter_shard(uri):
                yield split, sample


def test_dubai_to_s3_decodes_to_source_pixels_and_stats(dubai, bucket, ray_cluster):
    """Three images of each of the six tiles: every tile's imagery, a third of the decoding."""
    out = f"{bucket}/dubai"
    inputs = f"inputs=['{dubai}/*/images/image_part_00[1-3].jpg']"
    cfg = load_config(IngestConfig, DUBAI_PRESET, [inputs, f"output={out}"])
    manifest = run_ingest(cfg)

    assert storage.exists(f"{out}/manifest.json")
    again = read_manifest(out)
    assert again.samples == manifest.samples and again.shards == manifest.shards
    assert set(manifest.samples) == {"train", "val"}
    assert set(manifest.scenes["train"]).isdisjoint(manifest.scenes["val"])
    assert len(manifest.scenes["train"]) + len(manifest.scenes["val"]) == 18
    assert {s.split("-")[0] for v in manifest.scenes.values() for s in v} >= {"tile_1", "tile_8"}
    assert manifest.dtype == "uint8" and manifest.bands == ["red", "green", "blue"]
    assert [c["name"] for c in manifest.classes] == ["building", "land", "road", "vegetation", "water"]
    assert all(storage.exists(u) for u in manifest.shard_uris())

    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    n_seen = 0
    checked = 0
    for split, sample in _all_samples(manifest):
        n_seen += 1
        if split == "train":  # the band statistics are fit on the train split only
            x = sample.image.astype(np.float64).reshape(3, -1)
            total += x.sum(1)
            total_sq += (x**2).sum(1)
            count += x.shape[1]
        if n_seen % 41 == 1:  # a dozen tiles spread over every shard, bit for bit
            row, col, h, w = sample.meta["window"]
            src = sample.meta["source"]
            with rasterio.open(src) as ds:
                expect = ds.read(window=rasterio.windows.Window(col, row, w, h))
            assert sample.image.dtype == np.uint8 and sample.image.shape == (3, 256, 256)
            np.testing.assert_array_equal(sample.image, expect)
            mask = np.array(
                Image.open(src.replace("/images/", "/masks/").replace(".jpg", ".png")).convert("RGB")
            )
            mask = mask[row : row + h, col : col + w]
            expect_label = np.full((h, w), 255, np.uint8)
            for rgb, cid in DUBAI_COLOURS.items():
                expect_label[(mask == rgb).all(-1)] = cid
            np.testing.assert_array_equal(sample.label, expect_label)
            assert sample.key == f"{sample.meta['scene']}/{row}_{col}"
            checked += 1
    assert checked >= 10
    assert n_seen == sum(manifest.samples.values())
    mean = total / count
    std = np.sqrt(total_sq / count - mean**2)
    np.testing.assert_allclose(manifest.band_stats["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(manifest.band_stats["std"], std, rtol=1e-6)
    assert manifest.band_stats["count"] == [count] * 3


def test_uint16_geotiff_keeps_georeference_and_drops_nodata_tiles(tmp_path, ray_cluster):
    write_scene(
        tmp_path / "src", "border", height=160, width=192, bands=4, dtype="uint16", nodata_border=40, seed=3
    )
    out = tmp_path / "shards"
    cfg = load_config(
        IngestConfig,
        SAMPLE_PRESET,
        [f"inputs=[{tmp_path}/src/images/*.tif]", f"output={out}", "val_fraction=0", "shard_max_mb=0.05"],
    )
    manifest = run_ingest(cfg)
    # Tile origins: rows {0, 64, 96} x cols {0, 64, 128}; those in row 0 or col 0 are >= 40/64 nodata.
    assert manifest.dropped["nodata_tiles"] == 5
    assert manifest.samples == {"train": 4}
    assert len(manifest.shards["train"]) >= 2  # the small shard cap rolls shards
    # Per-shard counts, as read back: what a resumed pretraining stream replays its shuffle from.
    held = {u: sum(1 for _ in iter_shard(u)) for u in manifest.shard_uris()}
    index = ShardIndex.of(read_manifest(str(out)))
    assert index is not None and index.samples == held and index.tile_shape == (4, 64, 64)
    assert manifest.dtype == "uint16" and manifest.bands == ["red", "green", "blue", "nir"]
    with rasterio.open(tmp_path / "src/images/border.tif") as ds:
        crs = ds.crs
        for _, sample in _all_samples(manifest):
            row, col, h, w = sample.meta["window"]
            window = rasterio.windows.Window(col, row, w, h)
            np.testing.assert_array_equal(sample.image, ds.read(window=window))
            assert sample.image.dtype == np.uint16 and sample.image.shape == (4, 64, 64)
            assert rasterio.crs.CRS.from_wkt(sample.meta["crs"]) == crs
            t = rasterio.windows.transform(window, ds.transform)
            assert sample.meta["transform"] == pytest.approx([t.a, t.b, t.c, t.d, t.e, t.f])
            assert sample.meta["transform"][2] == 300000.0 + 0.5 * col
            assert sample.meta["nodata_fraction"] <= 0.1
            assert set(np.unique(sample.label)) <= {0, 1, 2, 3, 4, 255}


def test_a_driver_counts_the_progress_of_all_its_stages_on_one_actor(sample_scenes, tmp_path, ray_cluster):
    """Each stage's tasks bump counters the driver's progress bar reads. They live on one actor per
    driver process, started once: a job running many stages (the label-efficiency protocol predicts
    once per run) does not start a process per stage, and each stage's counts are its own."""
    from rsdiff.progress import ProgressCounter

    inputs = [f"inputs=[{sample_scenes}/images/*.tif]", "val_fraction=0"]
    before = ProgressCounter.open()
    first = run_ingest(load_config(IngestConfig, SAMPLE_PRESET, [*inputs, f"output={tmp_path / 'a'}"]))
    second = run_ingest(load_config(IngestConfig, SAMPLE_PRESET, [*inputs, f"output={tmp_path / 'b'}"]))
    after = ProgressCounter.open()
    # Both stages opened their counters on the board that numbered ``before``'s: a board of their
    # own would have numbered them from 1 again.
    assert after.tally == before.tally + 3
    assert first.samples and second.samples == first.samples

    before.add(tiles=3)
    before.add(tiles=2, scenes=1)
    for i in range(25):
        after.note("damaged", f"shard {i}")
    assert before.get() == {"tiles": 5, "scenes": 1} and after.get() == {}
    assert after.notes() == {"damaged": [f"shard {i}" for i in range(20)]}  # examples, not all
    before.close()
    before.add(tiles=1)  # a task's last word after its driver moved on is dropped, not an error
    assert before.get() == {} and after.get() == {}
    after.close()


def test_ingest_job_script_on_sample(sample_scenes, tmp_path, ray_address):
    out = tmp_path / "out"
    proc = run_job_inline(
        "ingest.py",
        "--config",
        str(SAMPLE_PRESET),
        f"inputs=[{sample_scenes}/images/*.tif]",
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["samples"]["train"] > 0 and summary["samples"]["val"] > 0
    manifest = read_manifest(str(out))
    assert manifest.class_pixels is not None and sum(manifest.class_pixels) > 0
    # A second run refuses to overwrite a complete output unless asked.
    again = run_job_inline(
        "ingest.py",
        "--config",
        str(SAMPLE_PRESET),
        f"inputs=[{sample_scenes}/images/*.tif]",
        f"output={out}",
    )
    assert again.returncode == 2 and "already holds an ingest output" in again.stderr


# ----------------------------------------------------------------------------------------------
# Bad input: one clear message each, and nothing left that looks complete.


def _bad_scene_dir(tmp_path, kind: str):
    src = tmp_path / "src"
    write_scene(src, "good", height=96, width=96, bands=4, seed=1)
    if kind == "unreadable":
        (src / "images" / "zz_broken.tif").write_text("this is not a raster")
        (src / "labels" / "zz_broken.tif").write_text("nor this")
    elif kind == "mask_size":
        write_scene(src, "zz_mismatch", height=96, width=96, bands=4, seed=2)
        with rasterio.open(
            src / "labels/zz_mismatch.tif", "w", driver="GTiff", width=90, height=96, count=1, dtype="uint8"
        ) as dst:
            dst.write(np.ones((1, 96, 90), np.uint8))
    elif kind == "small":
        write_scene(src, "zz_small", height=40, width=96, bands=4, seed=4)
    elif kind == "unknown_colour":
        write_scene(src, "zz_unknown", height=96, width=96, bands=4, seed=5)
        with rasterio.open(src / "labels/zz_unknown.tif", "r+") as dst:
            labels = dst.read()
            labels[0, :10, :10] = 7  # a value no class claims
            dst.write(labels)
    elif kind == "bands":
        write_scene(src, "zz_three_bands", height=96, width=96, bands=3, seed=6)
    return src


@pytest.mark.parametrize(
    ("kind", "overrides", "error", "needle"),
    [
        ("unreadable", [], DataError, "zz_broken.tif is not a readable raster"),
        ("mask_size", [], DataError, "is 90x96 px but its image"),
        ("small", [], DataError, "zz_small.tif is 96x40 px, smaller than tile_size=64"),
        ("unknown_colour", [], DataError, "index(s) no class claims: [7]"),
        ("bands", [], DataError, "has 3 band(s) of uint16, but the first scene has 4"),
        ("none", ["bands=[1,2,5]"], DataError, "asks for band 5"),
        ("none", ["inputs=[/nonexistent/*.tif]"], DataError, "match no image file"),
    ],
)
def test_bad_inputs_fail_clearly_and_leave_no_output(tmp_path, ray_cluster, kind, overrides, error, needle):
    src = _bad_scene_dir(tmp_path, kind)
    out = tmp_path / "out"
    cfg = load_config(
        IngestConfig,
        SAMPLE_PRESET,
        [f"inputs=[{src}/images/*.tif]", f"output={out}", "val_fraction=0", "parallelism=2", *overrides],
    )
    with pytest.raises(error) as err:
        run_ingest(cfg)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)  # one line, not a remote traceback
    assert storage.list_uris(str(out)) == []


def test_missing_bucket_fails_before_work(sample_scenes, s3_endpoint, ray_cluster):
    cfg = load_config(
        IngestConfig,
        SAMPLE_PRESET,
        [f"inputs=[{sample_scenes}/images/*.tif]", "output=s3://rsdiff-missing/x"],
    )
    with pytest.raises(StorageError, match="bucket 'rsdiff-missing' does not exist"):
        run_ingest(cfg)


def test_bad_class_map_is_a_config_error(sample_scenes, tmp_path):
    cfg = load_config(
        IngestConfig,
        DUBAI_PRESET,
        [f"inputs=[{sample_scenes}/images/*.tif]", f"output={tmp_path}", "labels.classes=[{name: a}]"],
    )
    with pytest.raises(ConfigError, match=r"labels.classes\[0\] \(a\) needs a colour"):
        run_ingest(cfg)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["tile_sise=64"], "unknown config key 'tile_sise'"),
        (["labels.unknown=skip"], "Invalid value 'skip', expected one of [ignore, error]"),
        (["inputs=[/nonexistent/dir/*.tif]"], "match no image file"),
        (["output=s3://rsdiff-no-bucket/x"], "bucket 'rsdiff-no-bucket' does not exist"),
    ],
)
def test_job_script_reports_one_line_and_exit_2(sample_scenes, tmp_path, ray_address, args, needle):
    base = [f"inputs=[{sample_scenes}/images/*.tif]", f"output={tmp_path / 'o'}"]
    proc = run_job_inline("ingest.py", "--config", str(SAMPLE_PRESET), *base, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_driver_in_another_directory_writes_where_its_manifest_says(sample_scenes, tmp_path, ray_address):
    """A relative ``output`` means the driver's folder, whatever the Ray workers' working directory."""
    import os
    import shutil
    import uuid

    driver = tmp_path / "driver"
    driver.mkdir()
    rel = f"rsdiff-cwd-{uuid.uuid4().hex[:8]}"
    workers_dir = Path(os.getcwd()) / rel  # the session's Ray workers run in the pytest folder
    try:
        proc = run_job_inline(
            "ingest.py", "--config", str(SAMPLE_PRESET), f"inputs=[{sample_scenes}/images/*.tif]",
            f"output={rel}", cwd=driver,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = read_manifest(str(driver / rel))
        uris = manifest.shard_uris()
        assert uris and all(Path(u).is_file() and Path(u).parent == driver / rel for u in uris)
        assert sum(1 for u in uris for _ in iter_shard(u)) == sum(manifest.samples.values())
        assert not workers_dir.exists()
    finally:
        shutil.rmtree(workers_dir, ignore_errors=True)


def test_band_names_come_from_the_scene_when_not_given(tmp_path, ray_cluster):
    from rasterio.enums import ColorInterp

    write_scene(tmp_path / "src", "described", height=64, width=64, bands=4, seed=2)
    with rasterio.open(tmp_path / "src/images/described.tif", "r+") as ds:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
        ds.set_band_description(4, "nir")
    src = f"inputs=[{tmp_path}/src/images/*.tif]"
    cfg = load_config(IngestConfig, None, [src, f"output={tmp_path}/out", "tile_size=32"])
    assert run_ingest(cfg).bands == ["red", "green", "blue", "nir"]
    cfg = load_config(IngestConfig, None, [src, f"output={tmp_path}/out2", "tile_size=32", "bands=[4,1]"])
    assert run_ingest(cfg).bands == ["nir", "red"]


def test_many_unknown_label_pixels_warn_loudly_and_json_stays_standard(
    sample_scenes, tmp_path, ray_cluster, caplog
):
    """A mask where a fifth of the pixels match no class (as in a JPEG-compressed colour mask)."""
    import logging
    import shutil

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(sample_scenes / "images" / "scene_00.tif", tmp_path / "images" / "a.tif")
    with rasterio.open(sample_scenes / "labels" / "scene_00.tif") as src:
        profile, mask = src.profile, src.read(1)
    mask[: mask.shape[0] // 5] = 7  # no such class
    with rasterio.open(tmp_path / "labels" / "a.tif", "w", **profile) as dst:
        dst.write(mask[None])
    cfg = load_config(
        IngestConfig,
        SAMPLE_PRESET,
        [
            f"inputs=[{tmp_path}/images/a.tif]",
            f"output={tmp_path / 'out'}",
            "labels.unknown=ignore",
            "val_fraction=0",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="rsdiff.ingest"):
        manifest = run_ingest(cfg)
    warned = [r.getMessage() for r in caplog.records if "match no class" in r.getMessage()]
    assert len(warned) == 1 and "labels.warn_unknown_fraction=0.05" in warned[0], caplog.text
    assert manifest.dropped["unknown_label_pixels"] > 0
    text = (tmp_path / "out" / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
