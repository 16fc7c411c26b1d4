"""The small pieces every stage stands on, each checked against values written out by hand: tile
and window grids, blending ramps, the shard split between loader slots, band-statistics merging,
class-map encoding (RGB, palette and index masks) and the learning-rate schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch

from rsdiff.data.bandstats import BandStats
from rsdiff.data.classmap import IGNORE_INDEX, ClassMap, MaskKind, UnknownPolicy
from rsdiff.data.normalize import Normalizer
from rsdiff.data.scenes import SceneReader, SceneRef
from rsdiff.data.tiling import axis_origins, tile_origins
from rsdiff.errors import DataError
from rsdiff.features.extractor import window_noise
from rsdiff.prediction.blend import RowBlender, ramp
from rsdiff.train.loop import lr_factor
from rsdiff.train.stream import ShardStream

pytestmark = pytest.mark.unit


# --- tile and window grids -------------------------------------------------------------------------


def test_tiles_cover_the_scene_with_the_last_ones_shifted_back_to_its_edge():
    assert axis_origins(100, 32, 32) == [0, 32, 64, 68]  # 68 + 32 = 100: no padding, all covered
    assert axis_origins(96, 32, 32) == [0, 32, 64]  # an exact fit adds nothing
    assert axis_origins(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert axis_origins(20, 32, 16) == [0]  # shorter than a window: one window, padded by prediction
    assert tile_origins(64, 100, 32) == [(r, c) for r in (0, 32) for c in (0, 32, 64, 68)]
    with pytest.raises(ValueError, match="smaller than the tile size"):
        tile_origins(20, 100, 32)


# --- blending ----------------------------------------------------------------------------------------


def test_the_blending_ramp_falls_linearly_to_the_window_edge():
    w = ramp(8, 3)
    edge = np.array([1 / 4, 2 / 4, 3 / 4, 1, 1, 3 / 4, 2 / 4, 1 / 4], np.float32)
    np.testing.assert_allclose(w, np.outer(edge, edge), rtol=1e-6)
    np.testing.assert_array_equal(ramp(4, 0), np.ones((4, 4), np.float32))


def test_the_border_band_gets_almost_no_weight_and_the_rest_of_the_overlap_a_ramp():
    w = ramp(16, 8, border=2)[0] / ramp(16, 8, border=2)[0].max()
    # distance to the edge 0 1 | 2 3 4 5 | ...: band of 2 px, then a ramp over 8 - 2*2 = 4 px
    np.testing.assert_allclose(w[:6], [1e-4, 1e-4, 1 / 5, 2 / 5, 3 / 5, 4 / 5], rtol=1e-5)
    np.testing.assert_allclose(w[6:10], 1.0)
    np.testing.assert_allclose(w, w[::-1])
    with pytest.raises(ValueError, match="overlap=3 must be at least 2 x border=2"):
        ramp(16, 3, border=2)
    # overlap = 2 x border: a step; each pixel from the window whose central size - overlap px hold it
    np.testing.assert_allclose(ramp(16, 4, border=2)[8], [1e-4] * 2 + [1.0] * 12 + [1e-4] * 2, rtol=1e-5)
    # Two windows overlapping by 8 with a 2 px band: in the overlap each pixel follows the window
    # that sees it clear of its band; where both do, they cross-fade.
    blend = RowBlender(height=16, width=24, channels=1, size=16, overlap=8, border=2)
    blend.add(0, 0, np.full((1, 16, 16), 1.0, np.float32))
    blend.add(0, 8, np.full((1, 16, 16), 3.0, np.float32))
    (_, out), *_ = list(blend.release(16))
    row = out[0, 8]
    # columns 8, 9: the second window's band -> the first window's value; 14, 15: the first's band
    np.testing.assert_allclose(row[[8, 9, 14, 15]], [1.0, 1.0, 3.0, 3.0], atol=1e-3)
    assert 1.0 < row[11] < 3.0 and (np.diff(row[8:16]) >= -1e-6).all()


def test_overlapping_windows_blend_to_their_weighted_mean():
    """Two windows overlapping by 4 px: inside the overlap each pixel is the ramp-weighted mean of
    the two windows' values; outside, each window's own."""
    size, overlap = 8, 4
    blend = RowBlender(height=8, width=12, channels=1, size=size, overlap=overlap)
    blend.add(0, 0, np.full((1, 8, 8), 1.0, np.float32))
    blend.add(0, 4, np.full((1, 8, 8), 3.0, np.float32))
    (first, out), *rest = list(blend.release(8))
    assert first == 0 and not rest and out.shape == (1, 8, 12)
    w = ramp(size, overlap)[0]  # one row of weights (columns)
    for col in range(4, 8):  # the overlap: window 1's columns 4..7, window 2's columns 0..3
        a, b = w[col], w[col - 4]
        assert out[0, 3, col] == pytest.approx((1.0 * a + 3.0 * b) / (a + b))
    assert (out[0, :, :4] == 1.0).all() and (out[0, :, 8:] == 3.0).all()


def test_window_noise_gives_each_scene_pixel_one_noise_value_in_every_window():
    """Overlapping windows see a shared pixel under the same noise (the fixed noise tiled over the
    scene); windows on the tile grid get the fixed noise itself, as the training tiles did."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((3, 8, 8), generator=gen)
    origins = [(0, 0), (0, 4), (4, 4), (8, 16), (13, 6)]
    windows = window_noise(noise, origins)
    assert windows.shape == (5, 3, 8, 8)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for (r, c), win in zip(origins, windows):
        for i in range(8):
            for j in range(8):
                y, x = r + i, c + j
                assert torch.equal(win[:, i, j], noise[:, y % 8, x % 8])
                if (y, x) in seen:
                    assert torch.equal(seen[(y, x)], win[:, i, j])
                seen[(y, x)] = win[:, i, j]
    assert torch.equal(windows[0], noise) and torch.equal(windows[3], noise)


def test_rows_cannot_be_released_before_a_window_covers_them():
    blend = RowBlender(height=16, width=8, channels=2, size=8, overlap=0)
    blend.add(0, 0, np.zeros((2, 8, 8), np.float32))
    assert [first for first, _ in blend.release(8)] == [0]
    with pytest.raises(ValueError, match="after rows above 8 were released"):
        blend.add(4, 0, np.zeros((2, 8, 8), np.float32))


# --- shard split ---------------------------------------------------------------------------------------


def _orders(shards, world, epoch, seed=0):
    return [ShardStream(shards, rank, world, Normalizer((0.0,), (1.0,)), 8, seed=seed).shard_order(epoch)
            for rank in range(world)]  # fmt: skip


def test_ranks_read_disjoint_shards_that_together_are_all_of_them():
    shards = [f"s3://b/train-{i:04d}.tar" for i in range(10)]
    for epoch in (0, 1):
        orders = _orders(shards, 3, epoch)
        flat = [s for o in orders for s in o]
        assert sorted(flat) == shards and len(set(flat)) == len(flat)
        assert [len(o) for o in orders] == [4, 3, 3]
    assert _orders(shards, 3, 0) != _orders(shards, 3, 1)  # reshuffled every epoch
    assert _orders(shards, 3, 0) == _orders(shards, 3, 0)  # and reproducibly


def test_more_ranks_than_shards_resample_instead_of_idling():
    shards = ["a.tar", "b.tar"]
    orders = _orders(shards, 5, 0)
    assert all(len(o) == 1 and o[0] in shards for o in orders)  # every rank has data each epoch
    assert sorted(o[0] for o in orders[:2]) == shards  # the first ranks still split the real shards


# --- band statistics ---------------------------------------------------------------------------------


def test_merged_band_stats_equal_the_stats_of_all_pixels():
    rng = np.random.default_rng(0)
    parts = [rng.normal(100 * (i + 1), 5 + i, size=(3, n)) for i, n in enumerate([1, 500, 4000, 0])]
    merged = BandStats(3)
    for part in parts:
        worker = BandStats(3)
        worker.update(part)
        merged.merge(worker)
    every = np.concatenate(parts, 1)
    np.testing.assert_allclose(merged.mean, every.mean(1), rtol=1e-12)
    np.testing.assert_allclose(merged.std, every.std(1), rtol=1e-10)
    np.testing.assert_array_equal(merged.min, every.min(1))
    np.testing.assert_array_equal(merged.count, [every.shape[1]] * 3)
    assert BandStats(2).to_json()["min"] == [None, None]  # a band with no pixel is not a number


# --- class maps ----------------------------------------------------------------------------------------

COLOURS = ((60, 16, 152), (132, 41, 246), (226, 169, 41))


def _colour_map(unknown=UnknownPolicy.ignore):
    return ClassMap(names=("building", "land", "water"), colours=COLOURS, values=(0, 1, 2),
                    ignore_colours=((155, 155, 155),), unknown=unknown)  # fmt: skip


def test_rgb_masks_encode_by_colour_with_ignored_and_unknown_colours_counted():
    mask = np.array([[COLOURS[2], COLOURS[0]], [(155, 155, 155), (1, 2, 3)]], np.uint8)
    ids, unknown = _colour_map().encode(mask)
    assert ids.tolist() == [[2, 0], [IGNORE_INDEX, IGNORE_INDEX]] and unknown == 1
    with pytest.raises(DataError, match=r"\(1, 2, 3\)|#010203"):
        _colour_map(UnknownPolicy.error).encode(mask, "mask m.png")


def test_index_masks_encode_by_value():
    cm = ClassMap(names=("water", "land"), colours=((0, 0, 255), (0, 255, 0)), values=(7, 3),
                  kind=MaskKind.index, ignore_values=(0,))  # fmt: skip
    ids, unknown = cm.encode(np.array([[3, 7], [0, 9]], np.uint8))
    assert ids.tolist() == [[1, 0], [IGNORE_INDEX, IGNORE_INDEX]] and unknown == 1


def test_palette_masks_are_read_through_their_colour_table(tmp_path):
    """A one-band PNG with a colour table (as GIS tools save class masks) encodes like its RGB."""
    values = np.array([[0, 1], [2, 1]], np.uint8)
    path = tmp_path / "mask.png"
    with rasterio.open(path, "w", driver="PNG", width=2, height=2, count=1, dtype="uint8") as ds:
        ds.write(values, 1)
        ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(COLOURS)})
    image = tmp_path / "image.png"
    with rasterio.open(image, "w", driver="PNG", width=2, height=2, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 2, 2), np.uint8))
    with SceneReader(SceneRef("s", str(image), str(path)), _colour_map()) as reader:
        rgb = reader.mask_rgb()
        ids, unknown = reader.read_labels(0, 0, 2)
    assert rgb.tolist() == [[list(COLOURS[0]), list(COLOURS[1])], [list(COLOURS[2]), list(COLOURS[1])]]
    assert ids.tolist() == [[0, 1], [2, 1]] and unknown == 0


# --- learning rate -------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_follows_a_cosine_to_its_floor():
    assert [lr_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 100) == pytest.approx(1.0)
    mid = 4 + 48
    assert lr_factor(mid, 4, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 4, 100) == pytest.approx(0.1) and lr_factor(500, 4, 100) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)  # no warmup


def test_the_ensemble_is_validated_by_the_rule_its_maps_use():
    """Two of three members lean to class 0, one is sure of class 1: the vote says 0, the mean
    distribution says 1. Validation, the head's labels and the map's probabilities agree on 1."""
    from torch import nn

    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.heads.ensemble import DDPMSegEnsembleHead
    from rsdiff.heads.fit import evaluate
    from rsdiff.prediction.uncertainty import PixelOutputs

    head = DDPMSegEnsembleHead(4, 2, members=3).eval()
    with torch.no_grad():
        for member, bias in zip(head.members, ([0.1, 0.0], [0.1, 0.0], [0.0, 5.0])):
            last = member[-1]
            assert isinstance(last, nn.Linear)
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
    x = torch.randn(5, 4)
    labels, probs = head.predict(x)
    assert probs[:, 1].gt(0.5).all() and labels.eq(1).all()
    rows = SimpleNamespace(batches=lambda n: iter([(x.numpy(), np.ones(5, np.int64))]))
    cm = evaluate(head, rows, 2, torch.zeros(4), torch.ones(4))
    assert cm.matrix[1, 1] == 5  # every pixel of class 1 called 1 on validation
    trained = TrainedHead(head, {"kind": "ensemble"}, [10], ["up0.res0"], np.zeros(4, np.float32),
                          np.ones(4, np.float32), [{"name": "a"}, {"name": "b"}], "ckpt")  # fmt: skip
    assert PixelOutputs(trained)(x)[:, :2].argmax(1).eq(1).all()  # what a map shows


def test_files_whose_names_differ_only_in_non_ascii_are_named_when_they_share_a_scene_id(tmp_path):
    from rsdiff.data.scenes import discover

    for name in ("é2.tif", "ü2.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"the files \[.*é2\.tif', .*ü2\.tif'\] all map to the scene id '2'"):
        discover([str(tmp_path / "*.tif")], None)


def test_one_dihedral_transform_serves_arrays_and_tensors_with_all_eight_symmetries():
    """Training streams (NumPy) and dense heads (torch) augmented with two hand-written copies."""
    import torch

    from rsdiff.data.dihedral import dihedral

    tile = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    seen = set()
    for turns in range(4):
        for flip in (False, True):
            a = np.ascontiguousarray(dihedral(tile, turns, flip))
            t = dihedral(torch.from_numpy(tile), turns, flip).numpy()
            np.testing.assert_array_equal(a, t)
            np.testing.assert_array_equal(a[1] - a[0], np.full((3, 3), 9))  # bands move together
            seen.add(a[0].tobytes())
    assert len(seen) == 8
    np.testing.assert_array_equal(dihedral(tile, 1, False)[0], np.rot90(tile[0]))
    np.testing.assert_array_equal(dihedral(tile, 0, True)[0], tile[0][:, ::-1])
