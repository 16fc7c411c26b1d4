"""What to label next: uncertainty rasters from jobs/predict.py and ranked tiles from
jobs/suggest.py, against a real local Ray, sqlite MLflow and real GeoTIFFs; the tile statistics,
ranking and footprints checked against independent computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_job_inline
from mlflow import MlflowClient
from omegaconf import OmegaConf
from rasterio.transform import from_origin

from rsdiff.config import build, to_container
from rsdiff.data.synthetic import SAMPLE_CRS, sample_pixels
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.ensemble import DDPMSegEnsembleHead
from rsdiff.prediction.config import PredictConfig
from rsdiff.prediction.run import run_predict
from rsdiff.prediction.tiles import TileScorer
from rsdiff.prediction.uncertainty import entropy, mutual_information
from rsdiff.prediction.writer import quicklook_font
from rsdiff.suggest.outputs import feature_collections, footprint
from rsdiff.suggest.rank import Candidate, rank_tiles
from rsdiff.viz import label_height

# ---------------------------------------------------------------------------------------------
# Unit: the pieces against independent computations.


@pytest.mark.unit
def test_tile_scorer_matches_a_direct_computation_whatever_the_row_bands():
    rng = np.random.default_rng(0)
    h, w, tile = 150, 130, 32
    values = rng.random((h, w)).astype(np.float32)
    valid = rng.random((h, w)) > 0.2
    valid[64:96, 32:64] = False  # one tile without any valid pixel
    desc = rng.normal(size=(3, h, w)).astype(np.float32)
    scorer = TileScorer(h, w, tile, 0.9, descriptor_dims=3)
    first = 0
    for n in (7, 50, 1, 33, 59):  # bands of any height, crossing tile rows
        scorer.add_rows(
            first, values[first : first + n], valid[first : first + n], desc[:, first : first + n]
        )
        first += n
    tiles = scorer.finish()
    assert len(tiles) == math.ceil(h / tile) * math.ceil(w / tile)
    for t in tiles:
        sl = (slice(t.row, t.row + t.height), slice(t.col, t.col + t.width))
        assert (t.height, t.width) == (min(tile, h - t.row), min(tile, w - t.col))
        v, m = values[sl], valid[sl]
        assert t.valid_fraction == pytest.approx(m.mean())
        if not m.any():
            assert math.isnan(t.mean) and (t.row, t.col) == (64, 32)
            continue
        assert t.mean == pytest.approx(v[m].mean(), rel=1e-5)
        assert t.quantile == pytest.approx(np.quantile(v[m], 0.9), rel=1e-5)
        np.testing.assert_allclose(t.descriptor, desc[:, sl[0], sl[1]][:, m].mean(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="in order"):
        TileScorer(h, w, tile, 0.9).add_rows(5, values[:5], valid[:5])
    short = TileScorer(h, w, tile, 0.9)
    short.add_rows(0, values[:40], valid[:40])
    with pytest.raises(ValueError, match="40 of 150"):
        short.finish()


def _cand(scene, row, col, score, desc=(1.0, 0.0)):
    return Candidate(scene, row, col, 64, 64, score, np.asarray(desc, np.float32))


@pytest.mark.unit
def test_rank_tiles_orders_by_score_and_keeps_picks_apart():
    cands = [
        _cand("a", 0, 0, 0.9),
        _cand("a", 0, 64, 0.8),  # next to the best one: too close with min_distance=100
        _cand("b", 0, 0, 0.7, (0.99, 0.1)),  # another scene but looks like the best one
        _cand("b", 512, 512, 0.6, (0.0, 1.0)),
        _cand("c", 0, 0, float("nan")),  # never picked
        _cand("c", 256, 0, 0.1, (-1.0, 0.2)),
    ]
    plain = rank_tiles(cands, 3)
    assert [(p.candidate.scene, p.candidate.col) for p in plain] == [("a", 0), ("a", 64), ("b", 0)]
    assert [p.rank for p in plain] == [1, 2, 3] and not any(p.relaxed for p in plain)
    apart = rank_tiles(cands, 3, min_distance=100, max_similarity=0.9)
    assert [(p.candidate.scene, p.candidate.row) for p in apart] == [("a", 0), ("b", 512), ("c", 256)]
    # The similarity rule is dropped before a list comes out short; the distance rule is kept.
    filled = rank_tiles(cands, 5, min_distance=100, max_similarity=0.9)
    assert [(p.candidate.scene, p.candidate.row, p.relaxed) for p in filled][3:] == [("b", 0, True)]
    assert len(rank_tiles(cands, 10)) == 5  # NaN never
    with pytest.raises(ValueError, match="budget"):
        rank_tiles(cands, 0)


@pytest.mark.unit
def test_uncertainty_measures_and_footprints(tmp_path):
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert entropy(p).tolist() == pytest.approx([0.0, math.log(3)], abs=1e-6)
    agree = torch.tensor([[0.5, 0.5], [0.5, 0.5]])[:, None]  # two members, one pixel, both 50/50
    disagree = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, None]
    assert mutual_information(agree).item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information(disagree).item() == pytest.approx(math.log(2), abs=1e-6)
    t = from_origin(300000.0, 2800000.0, 0.5, 0.5)
    ring = footprint(list(t)[:6], 10, 20, 64, 32)
    assert ring[0] == list(t * (20, 10)) and ring[2] == list(t * (52, 74)) and ring[-1] == ring[0]
    entry = {"rank": 1, "scene": "s", "score": 0.5, "mean": 0.5, "quantile": 0.6, "valid_fraction": 1.0,
             "relaxed": False, "image": "s.tif", "window": [10, 20, 64, 32], "crs": SAMPLE_CRS,
             "transform": list(t)[:6]}  # fmt: skip
    fc = feature_collections([entry, {**entry, "crs": None, "transform": None}])
    assert list(fc) == [SAMPLE_CRS] and len(fc[SAMPLE_CRS]["features"]) == 1
    assert fc[SAMPLE_CRS]["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32640"
    # GDAL's OGR (what QGIS reads GeoJSON with) places it in the scene's CRS, on the window's bounds.
    import pyogrio
    from rasterio.windows import Window, bounds

    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(fc[SAMPLE_CRS]))
    info = pyogrio.read_info(path)
    assert info["crs"] == SAMPLE_CRS and info["features"] == 1 and "rank" in list(info["fields"])
    _, box = pyogrio.read_bounds(path)
    assert box[:, 0].tolist() == list(bounds(Window(20, 10, 32, 64), t))


# ---------------------------------------------------------------------------------------------
# End to end: a head whose training labels make one texture ambiguous.

CLASSES = [
    {"id": 0, "name": "water", "colour": "#1f5fbf"},
    {"id": 1, "name": "land", "colour": "#c8a064"},
    {"id": 2, "name": "pond", "colour": "#40c0e0"},
]


def _write(path: Path, pixels: np.ndarray, mask: np.ndarray | None = None, origin=(301000.0, 2801000.0)):
    geo = {"crs": SAMPLE_CRS, "transform": from_origin(*origin, 0.5, 0.5)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=pixels.shape[1], width=pixels.shape[2],
                       count=pixels.shape[0], dtype="uint16", nodata=0, **geo) as dst:  # fmt: skip
        dst.write(pixels)
    if mask is not None:
        lab = path.parent.parent / "labels" / path.name
        lab.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(lab, "w", driver="GTiff", height=mask.shape[0], width=mask.shape[1], count=1,
                           dtype="uint8", nodata=255, **geo) as dst:  # fmt: skip
            dst.write(mask[None])


@pytest.fixture(scope="module")
def ambiguous(sample_demo, tmp_path_factory):
    """A 3-member ensemble head on the demo's frozen features, trained where the water texture is
    labeled water or pond at random (identical features, two classes) and land is land; and the
    scenes to suggest from."""
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.prediction.run import load_head_and_checkpoint

    root = tmp_path_factory.mktemp("ambiguous")
    demo_head, ddpm = load_head_and_checkpoint(str(sample_demo / "sweep" / "best"))
    ext = FeatureExtractor(ddpm, demo_head.timesteps, demo_head.blocks, demo_head.noise_seed, "fp32")
    layout = np.ones((64, 128), np.uint8)  # land (1) with water texture (0) on the left half
    layout[:, :64] = 0
    train_px = sample_pixels(layout, 4, "uint16", seed=3)
    x = ddpm.normalizer.torch(
        torch.from_numpy(np.stack([train_px[:, :, :64], train_px[:, :, 64:]]).astype(np.float32))
    )
    with torch.no_grad():
        feats = ext.dense_rows(ext.activations(x), (64, 64), 0, 64)  # (2, D, 64, 64)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.choice([0, 2], size=64 * 64), np.ones(64 * 64, int)])
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    z = (flat - mean) / std
    module = DDPMSegEnsembleHead(z.shape[1], 3, members=3, seed=0)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    y = torch.from_numpy(labels)
    for step in range(150):
        idx = torch.randint(0, len(y), (512,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        module.loss(z[idx], y[idx], None, 255).backward()
        opt.step()
    module.eval()
    head = TrainedHead(
        module=module, config=to_container(build(HeadConfig, {"kind": "ensemble", "members": 3})),
        timesteps=demo_head.timesteps, blocks=demo_head.blocks, mean=mean.numpy(), std=std.numpy(),
        classes=CLASSES, checkpoint=demo_head.checkpoint, noise_seed=demo_head.noise_seed,
    )  # fmt: skip
    head_uri = head.save(str(root / "head"))
    # The scene to suggest from: land, with the water texture on one 64 px tile (rows 64..127,
    # cols 128..191); a labeled scene (its mask exists) that is all water texture; one listed as
    # labeled.
    layout = np.ones((192, 256), np.uint8)
    layout[64:128, 128:192] = 0
    scenes = root / "scenes" / "images"
    _write(scenes / "unlabeled.tif", sample_pixels(layout, 4, "uint16", seed=5))
    water = np.zeros((128, 128), np.uint8)
    _write(scenes / "masked.tif", sample_pixels(water, 4, "uint16", seed=6), mask=water)
    _write(scenes / "listed.tif", sample_pixels(water, 4, "uint16", seed=7), origin=(302000.0, 2802000.0))
    return {"head": head_uri, "scenes": scenes, "root": root}


@pytest.mark.integration
def test_predict_writes_an_uncertainty_raster_on_the_class_map_grid(ambiguous, tmp_path, ray_cluster):
    scene = ambiguous["scenes"] / "unlabeled.tif"
    cfg = build(
        PredictConfig,
        {"head": ambiguous["head"], "inputs": [str(scene)], "output": str(tmp_path / "maps"),
         "tracking": {"enabled": False}},
        OmegaConf.from_dotlist(["uncertainty=true", "probabilities=true", "window=64", "overlap=16"]),
    )  # fmt: skip
    result = run_predict(cfg)
    rec = result.scenes[0]
    with (
        rasterio.open(rec["class_map"]) as cls,
        rasterio.open(rec["uncertainty"]) as unc,
        rasterio.open(rec["probabilities"]) as prob,
    ):
        assert (unc.crs, unc.transform, unc.shape) == (cls.crs, cls.transform, cls.shape)
        assert unc.count == 2 and unc.dtypes[0] == "float32"
        assert unc.descriptions == ("entropy_nats", "mutual_information_nats")
        assert float(unc.tags()["rsdiff_max_entropy"]) == pytest.approx(math.log(3), abs=1e-5)
        ent, mi = unc.read(1), unc.read(2)
        p = prob.read().astype(np.float64) / 255
    assert np.isfinite(ent).all() and (ent >= 0).all() and (ent <= math.log(3) + 1e-4).all()
    assert (mi >= 0).all() and (mi <= ent + 1e-4).all()  # BALD never exceeds the total entropy
    # Band 1 is the entropy of the class distribution the probabilities raster holds (uint8 rounding).
    direct = -(p * np.log(np.clip(p, 1e-12, None))).sum(0)
    assert np.abs(direct - ent).mean() < 0.03
    # The ambiguous tile is the uncertain one: water and pond at random on identical features.
    assert ent[72:120, 136:184].mean() > 0.5 > ent[:48, :100].mean() + 0.3
    summary = json.loads((tmp_path / "maps" / "predictions.json").read_text())
    assert summary["uncertainty"] == ["entropy_nats", "mutual_information_nats"]
    assert summary["scenes"][0]["uncertainty"] == "unlabeled.uncertainty.tif"
    from PIL import Image

    look = np.asarray(Image.open(rec["quicklook"]).convert("RGB"))
    top = label_height(quicklook_font(256))  # panel titles above, the legend below
    assert look.shape[1] == 3 * 256 + 2 * 4 and look.shape[0] > top + 192  # scene | map | uncertainty
    panel = look[top : top + 192, 2 * 260 :].astype(int)
    assert panel[72:120, 136:184].mean() > panel[:48, :100].mean() + 40  # brighter where uncertain


@pytest.mark.integration
def test_suggest_ranks_the_ambiguous_tile_first_and_never_a_labeled_scene(
    ambiguous, tmp_path, ray_cluster, weight_reads
):
    out = tmp_path / "suggestions"
    db = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run_job_inline(
        "suggest.py",
        f"head={ambiguous['head']}",
        f"inputs=[{ambiguous['scenes']}/*.tif]",
        "masks={dir}/../labels/{stem}.tif",
        f"labeled=[{ambiguous['scenes']}/listed.tif]",
        f"output={out}",
        "tile=64",
        "budget=4",
        "min_distance=64",
        "measure=entropy",
        "window=64",
        f"tracking.uri={db}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weight_reads == []  # the driver plans from the model's structure; the tasks load it
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(printed["excluded_labeled_scenes"]) == ["listed", "masked"]
    doc = json.loads((out / "suggestions.json").read_text())
    assert doc["candidate_scenes"] == ["unlabeled"] and doc["measure"] == "entropy"
    assert doc["candidate_tiles"] == 12 and len(doc["suggestions"]) == 4
    first = doc["suggestions"][0]
    assert (first["rank"], first["scene"], first["window"]) == (1, "unlabeled", [64, 128, 64, 64])
    assert all(e["scene"] == "unlabeled" for e in doc["suggestions"])
    scores = [e["score"] for e in doc["suggestions"]]
    assert scores == sorted(scores, reverse=True) or any(e["relaxed"] for e in doc["suggestions"])
    # The score is the tile's mean entropy, read back from the uncertainty raster it names.
    with (
        rasterio.open(out / first["uncertainty"]) as unc,
        rasterio.open(ambiguous["scenes"] / "unlabeled.tif") as src,
    ):
        assert (unc.crs, unc.transform) == (src.crs, src.transform)
        assert unc.read(1)[64:128, 128:192].mean() == pytest.approx(first["score"], rel=1e-4)
        transform = src.transform
    # Picks keep min_distance between their centres in one scene.
    centres = [(e["window"][0] + 32, e["window"][1] + 32) for e in doc["suggestions"]]
    assert all(math.dist(a, b) >= 64 for i, a in enumerate(centres) for b in centres[i + 1 :])
    # GeoJSON footprints in the scene's CRS, computed here from the raster's own transform.
    fc = json.loads((out / "suggestions.geojson").read_text())
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32640"
    poly = fc["features"][0]["geometry"]["coordinates"][0]
    corners = [transform * (128, 64), transform * (192, 64), transform * (192, 128), transform * (128, 128)]
    np.testing.assert_allclose(poly[:4], corners)
    assert [f["properties"]["rank"] for f in fc["features"]] == [1, 2, 3, 4]
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[0] > 128 and sheet.std() > 20
    client = MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("rsdiff-suggest").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["rsdiff.stage"] == "suggest"
    assert run.data.metrics["labeled_scenes_excluded"] == 2 and run.data.metrics["suggested"] == 4
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"suggestions.json", "suggestions.geojson", "contact_sheet.png"} <= arts


@pytest.mark.integration
def test_suggest_bad_input_is_one_clear_error(ambiguous, sample_demo, tmp_path, ray_cluster):
    scenes = ambiguous["scenes"]
    base = [f"head={ambiguous['head']}", f"output={tmp_path / 'o'}", "tracking.enabled=false", "tile=64"]
    cases = [
        ([f"inputs=[{scenes}/masked.tif]", "masks={dir}/../labels/{stem}.tif"], "are labeled"),
        ([f"inputs=[{scenes}/unlabeled.tif]", "budget=0"], "budget=0"),
        (
            [
                f"inputs=[{scenes}/unlabeled.tif]",
                f"head={sample_demo / 'sweep' / 'best'}",
                "measure=mutual_information",
            ],
            "mc_samples=N",
        ),
        ([f"inputs=[{scenes}/unlabeled.tif]", "mc_samples=1"], "mc_samples=1"),
        ([f"inputs=[{scenes}/unlabeled.tif]", f"labeled=[{tmp_path}/gone.tif]"], "does not exist"),
        ([f"inputs=[{scenes}/unlabeled.tif]", "measure=variance"], "measure"),
    ]
    for extra, expected in cases:
        proc = run_job_inline("suggest.py", *base, *extra)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert expected in last and "Traceback" not in proc.stderr, (extra, last)
    assert not (tmp_path / "o" / "suggestions.json").exists()


@pytest.mark.integration
def test_a_residual_head_gives_entropy_alone_or_with_mc_dropout(sample_demo, tmp_path, ray_cluster):
    scene = next((sample_demo / "scenes" / "images").glob("*.tif"))
    maps = {}
    for name, extra in (("plain", []), ("mc", ["mc_samples=4"])):
        cfg = build(
            PredictConfig,
            {"head": str(sample_demo / "sweep" / "best"), "inputs": [str(scene)],
             "output": str(tmp_path / name), "tracking": {"enabled": False}, "quicklook": False},
            OmegaConf.from_dotlist(["uncertainty=true", *extra]),
        )  # fmt: skip
        rec = run_predict(cfg).scenes[0]
        with rasterio.open(rec["uncertainty"]) as unc, rasterio.open(rec["class_map"]) as cls:
            maps[name] = (unc.read(), unc.descriptions, cls.read(1))
    plain, mc = maps["plain"], maps["mc"]
    assert plain[1] == ("entropy_nats",) and mc[1] == ("entropy_nats", "mutual_information_nats")
    np.testing.assert_array_equal(plain[2], mc[2])  # dropout samples leave the map alone
    np.testing.assert_allclose(plain[0][0], mc[0][0], atol=1e-6)  # entropy of the same distribution
    mi = mc[0][1]
    assert (mi >= 0).all() and mi.max() > 0 and (mi <= mc[0][0] + 1e-4).all()


@pytest.mark.integration
def test_suggest_reads_scenes_from_s3_and_writes_its_outputs_there(ambiguous, bucket, tmp_path, ray_cluster):
    import boto3

    from rsdiff import storage

    s3 = boto3.client("s3")
    name = bucket.removeprefix("s3://").split("/")[0]
    s3.upload_file(str(ambiguous["scenes"] / "unlabeled.tif"), name, "scenes/unlabeled.tif")
    out = f"{bucket}/suggestions"
    proc = run_job_inline(
        "suggest.py", f"head={ambiguous['head']}", f"inputs=[{bucket}/scenes/]", f"output={out}", "tile=64",
        "budget=2", "min_distance=64", "window=64", "tracking.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(storage.read_text(f"{out}/suggestions.json"))
    assert doc["measure"] == "mutual_information"  # the ensemble's default
    assert [e["rank"] for e in doc["suggestions"]] == [1, 2] and doc["geojson"] == ["suggestions.geojson"]
    for rel in (
        "suggestions.geojson",
        "contact_sheet.png",
        "maps/unlabeled.tif",
        "maps/unlabeled.uncertainty.tif",
    ):
        assert storage.exists(f"{out}/{rel}"), rel
    with storage.local_copy(f"{out}/maps/unlabeled.uncertainty.tif") as path, rasterio.open(path) as unc:
        assert unc.count == 2 and unc.crs.to_epsg() == 32640
        first = doc["suggestions"][0]
        r, c, h, w = first["window"]
        assert unc.read(2)[r : r + h, c : c + w].mean() == pytest.approx(first["score"], rel=1e-4)
    again = run_job_inline("suggest.py", f"head={ambiguous['head']}", f"inputs=[{bucket}/scenes/]",
                           f"output={out}", "tracking.enabled=false")  # fmt: skip
    assert again.returncode == 2 and "already holds suggestions" in again.stderr.strip().splitlines()[-1]
