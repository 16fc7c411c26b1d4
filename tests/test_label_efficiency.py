"""The evaluation protocol nothing tunes on: the ingest's test split, label efficiency counted in
labeled scenes and scored on whole test scenes, and window borders that do not show in the map."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_job_inline
from mlflow import MlflowClient

from rsdiff.config import build, load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.scenes import SceneRef
from rsdiff.errors import ConfigError
from rsdiff.ingest import run_ingest, split_scenes
from rsdiff.label_efficiency import draw_units
from rsdiff.prediction.config import PredictConfig

REPO = Path(__file__).resolve().parents[1]


def _refs(n: int) -> list[SceneRef]:
    return [
        SceneRef(f"tile_{i // 3}-images-part_{i % 3}", f"/data/tile_{i // 3}/images/part_{i % 3}.jpg")
        for i in range(n)
    ]


@pytest.mark.unit
def test_scene_split_holds_out_test_by_fraction_or_by_pattern():
    refs = _refs(9)
    # Without a test split, the split is the one earlier versions made (a seeded shuffle, val first).
    order = sorted(refs, key=lambda r: r.id)
    random.Random(5).shuffle(order)
    assert split_scenes(refs, 0.34, 5) == {
        "train": sorted(order[4:], key=lambda r: r.id),
        "val": sorted(order[:4], key=lambda r: r.id),
    }
    # Fractions count all scenes: ceil(0.2 * 9) = 2 test, then ceil(0.3 * 9) = 3 val of the rest.
    s = split_scenes(refs, 0.3, 5, test_fraction=0.2)
    assert [len(s[k]) for k in ("train", "val", "test")] == [4, 3, 2]
    assert s["test"] == sorted(order[:2], key=lambda r: r.id)
    assert s["val"] == sorted(order[2:5], key=lambda r: r.id)
    # Whole tiles by pattern, over ids or image paths.
    s = split_scenes(refs, 0.0, 0, test_scenes=["tile_2-*"], val_scenes=["*/tile_1/*"])
    assert [r.id for r in s["test"]] == [f"tile_2-images-part_{i}" for i in range(3)]
    assert [r.id for r in s["val"]] == [f"tile_1-images-part_{i}" for i in range(3)]
    assert {r.id[:6] for r in s["train"]} == {"tile_0"}
    with pytest.raises(ConfigError, match="test_scenes: 'tile_9-\\*' matches no scene"):
        split_scenes(refs, 0.0, 0, test_scenes=["tile_9-*"])
    with pytest.raises(ConfigError, match="in both val_scenes and the test split"):
        split_scenes(refs, 0.0, 0, test_scenes=["tile_1-*"], val_scenes=["tile_1-images-part_0"])
    with pytest.raises(ConfigError, match="no scene is left for train"):
        split_scenes(refs, 0.0, 0, test_scenes=["tile_[12]-*"], val_scenes=["tile_0-*"])


def _ingest_sample(scenes: Path, out: Path, *overrides: str):
    """The generated sample ingested with ``val_fraction=0`` and ``overrides``: its manifest."""
    preset = REPO / "configs/ingest/sample.yaml"
    args = [f"inputs=[{scenes}/images/*.tif]", f"output={out}", "val_fraction=0", *overrides]
    return run_ingest(load_config(IngestConfig, preset, args))


@pytest.mark.integration
def test_ingest_records_the_test_split_its_files_and_labels(sample_scenes, tmp_path, ray_cluster):
    out = tmp_path / "shards"
    manifest = _ingest_sample(sample_scenes, out, "test_scenes=['scene_0[45]']")
    assert manifest.scenes == {"train": [f"scene_0{i}" for i in range(4)], "test": ["scene_04", "scene_05"]}
    assert all(n.startswith("test-") for n in manifest.shards["test"])
    assert manifest.scene_files["scene_05"] == {
        "image": str(sample_scenes / "images" / "scene_05.tif"),
        "mask": str(sample_scenes / "labels" / "scene_05.tif"),
    }
    assert manifest.labels["kind"] == "index" and manifest.labels["classes"][0] == {
        "name": "water", "colour": None, "value": 0,
    }  # fmt: skip
    # Pretraining and extraction read train and val only: the test shards are in neither list.
    from rsdiff.train.config import DataConfig

    assert "test" not in DataConfig().splits
    written = json.loads((out / "manifest.json").read_text())
    assert written["scenes"]["test"] == ["scene_04", "scene_05"]


@pytest.mark.integration
def test_the_normaliser_is_fit_on_the_train_scenes_only(sample_scenes, tmp_path, ray_cluster):
    """The band statistics every model normalises with come from the train split: before, val and
    test pixels were in them (the test scenes informed what the models saw)."""
    from rsdiff.data.shards import iter_shard

    out = tmp_path / "shards"
    manifest = _ingest_sample(sample_scenes, out, "val_scenes=['scene_03']", "test_scenes=['scene_0[45]']")
    pixels = {split: [] for split in ("train", "val", "test")}
    for split in pixels:
        for uri in manifest.shard_uris(split):
            pixels[split] += [
                s.image.reshape(s.image.shape[0], -1).astype(np.float64) for s in iter_shard(uri)
            ]
    train = np.concatenate(pixels["train"], axis=1)
    everything = np.concatenate([np.concatenate(v, axis=1) for v in pixels.values()], axis=1)
    stats = manifest.band_stats
    assert stats["count"] == [train.shape[1]] * train.shape[0]
    assert stats["mean"] == pytest.approx(train.mean(1).tolist(), rel=1e-9)
    assert stats["std"] == pytest.approx(train.std(1).tolist(), rel=1e-9)
    assert not np.allclose(stats["mean"], everything.mean(1), rtol=1e-6)  # the splits do differ


def _hand_confusion(map_path: Path, mask_path: str, values: list[int], n: int) -> np.ndarray:
    """The confusion matrix of one predicted map against its index mask, computed with numpy only."""
    with rasterio.open(map_path) as m, rasterio.open(mask_path) as k:
        pred, mask = m.read(1).astype(np.int64), k.read(1).astype(np.int64)
    truth = np.full(mask.shape, -1)
    for i, v in enumerate(values):
        truth[mask == v] = i
    keep = (truth >= 0) & (pred < n)
    return np.bincount(truth[keep] * n + pred[keep], minlength=n * n).reshape(n, n)


def _iou(cm: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))


@pytest.mark.integration
def test_label_efficiency_counts_scenes_and_scores_whole_test_scenes(
    sample_demo, tmp_path, mlflow_uri, ray_cluster
):
    work = sample_demo
    out = tmp_path / "le"
    proc = run_job_inline(
        "label_efficiency.py",
        f"features={work / 'features'}",
        f"selection={work / 'sweep' / 'best'}",
        "ks=[1,2]",
        "draws=2",
        "methods=[residual,ensemble,scratch_unet]",
        "unet.steps=20",
        "unet.eval_every=10",
        "head.epochs=3",
        "ensemble.epochs=2",
        "ensemble.members=3",
        "overlap=16",  # 3x fewer prediction windows than the default 5/8; the scoring is the same
        f"output={out}",
        f"tracking.uri={mlflow_uri}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    test, train = manifest["scenes"]["test"], manifest["scenes"]["train"]
    assert results["unit"] == "scenes" and results["test_scenes"] == test
    runs = results["runs"]
    assert len(runs) == 2 * 2 * 3
    for k in (1, 2):
        for d in (0, 1):
            same = [r for r in runs if r["k"] == k and r["draw"] == d]
            assert {r["method"] for r in same} == {"residual", "ensemble", "scratch_unet"}
            # the same k training scenes (and tiles) for every method, never a test scene
            assert all(r["drawn"] == same[0]["drawn"] and r["tiles"] == same[0]["tiles"] for r in same)
            assert same[0]["drawn"] == same[0]["scenes"] and len(same[0]["scenes"]) == k
            assert set(same[0]["scenes"]) <= set(train)
    # Every run predicted the whole test scenes; check one of each method against a confusion
    # matrix built here from its maps and the masks.
    values = [c["value"] for c in manifest["labels"]["classes"]]
    n = len(values)
    for r in [x for x in runs if x["k"] == 2 and x["draw"] == 1]:
        pred_dir = out / "predictions" / f"{r['method']}-k2-d1"
        summary = json.loads((pred_dir / "predictions.json").read_text())
        assert sorted(s["scene"] for s in summary["scenes"]) == sorted(test)
        total = np.zeros((n, n), np.int64)
        for s in summary["scenes"]:
            with rasterio.open(pred_dir / s["class_map"]) as m, rasterio.open(s["image"]) as src:
                assert m.shape == src.shape and m.crs == src.crs and m.transform == src.transform
            cm = _hand_confusion(
                pred_dir / s["class_map"], manifest["scene_files"][s["scene"]]["mask"], values, n
            )
            assert r["test_scenes"][s["scene"]]["miou"] == pytest.approx(np.nanmean(_iou(cm)))
            total += cm
        assert r["test_miou"] == pytest.approx(np.nanmean(_iou(total)))
        names = [c["name"] for c in manifest["labels"]["classes"]]
        for name, v in zip(names, _iou(total)):
            assert (r["test_iou"][name] is None) if math.isnan(v) else r["test_iou"][name] == pytest.approx(v)
    # The scratch UNet is a pixel head, predicted through the same path.
    head = json.loads((out / "heads" / "scratch_unet-k1-d0" / "head.json").read_text())
    assert head["config"]["kind"] == "scratch_unet" and head["timesteps"] == [] and head["in_dim"] == 4
    scratch = [r for r in runs if r["method"] == "scratch_unet"]
    assert all(r["labeled_pixels"] > 0 and 10 <= r["best_step"] <= 20 and r["params"] > 0 for r in scratch)
    # input_noise unset: the selected head keeps its own (swept) value; the other methods use 0.1.
    selected = json.loads((work / "sweep" / "best" / "head.json").read_text())["config"]["input_noise"]
    assert {r["input_noise"] for r in runs if r["method"] == "residual"} == {selected}
    assert {r["input_noise"] for r in runs if r["method"] != "residual"} == {0.1}
    # labeled_pixels is exact: the sampled pixels of the drawn scenes, never the whole split.
    table_rows = sum(p["rows"] for p in json.loads((work / "features" / "table.json").read_text())["parts"]
                     if p["split"] == "train")  # fmt: skip
    assert all(
        0 < r["labeled_pixels"] < table_rows for r in runs if r["method"] == "residual" and r["k"] == 1
    )
    table = (out / "table.md").read_text()
    assert "| scratch_unet |" in table and "k=2 scenes" in table and "| residual | 2 |" in table
    mean = np.mean([r["test_miou"] for r in runs if r["method"] == "residual" and r["k"] == 2])
    row = next(line for line in table.splitlines() if line.startswith("| residual | 0"))
    assert row.split(" | ")[2].startswith(f"{mean:.3f} ± ")  # the k=2 column
    assert (out / "label_efficiency.png").stat().st_size > 1000
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("rsdiff-label-efficiency").experiment_id])[0]
    assert {"label_efficiency.png", "results.json", "table.md"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    hist = client.get_metric_history(run.info.run_id, "test_miou_residual_mean")
    assert {m.step: m.value for m in hist}[2] == pytest.approx(mean)
    assert json.loads(run.data.params["test_scenes"]) == test
    # The answer first: the description states each paired difference per k.
    results = json.loads((out / "results.json").read_text())
    first = results["paired"][0]
    said = (
        f"**{first['method']} minus {first['baseline']}**, k={first['k']} scenes: {100 * first['mean']:+.1f}"
    )
    assert said in run.data.tags["mlflow.note.content"]


@pytest.mark.integration
def test_the_denoiser_as_segmenter_against_the_same_network_from_random_init(
    sample_demo, tmp_path, ray_cluster
):
    """The fair protocol end to end: nested draws, k val scenes per draw (counted in the labels
    used), the fine-tuned denoiser, the same network from random initialisation, the dense decoder on
    frozen feature maps and the scratch UNet, each predicted through predict + evaluate; the paired
    differences recomputed from results.json, one test scene's score from a confusion matrix built
    here, and the heads' weights checked against the pretrained checkpoint."""
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.heads.artifact import TrainedHead

    out = tmp_path / "le"
    proc = run_job_inline(
        "label_efficiency.py", f"features={sample_demo / 'features'}", "ks=[1,2]", "draws=2",
        "methods=[finetune,finetune_random,dense_decoder,scratch_unet]", "val_budget=k",
        "unet.steps=4", "unet.eval_every=4", "finetune.steps=4", "finetune.eval_every=4",
        "dense_decoder.steps=4", "dense_decoder.eval_every=4", "dense_decoder.width=8",
        "unet.batch_size=2", "finetune.batch_size=2", "dense_decoder.batch_size=2", "overlap=16",
        "unet.class_weighting=balanced", "unet.lr_schedule=cosine", "grid.lr_scale=[0.5,2.0]",
        f"output={out}", "tracking.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((sample_demo / "shards" / "manifest.json").read_text())
    runs = results["runs"]
    assert len(runs) == 2 * 2 * 4 and results["val_budget"] == "k"
    for d in (0, 1):
        one, two = ([r for r in runs if r["k"] == k and r["draw"] == d] for k in (1, 2))
        assert set(one[0]["scenes"]) <= set(two[0]["scenes"])  # nested: k=1 inside k=2
        assert set(one[0]["val_scenes"]) <= set(two[0]["val_scenes"])
        for r in one + two:
            assert set(r["val_scenes"]) <= set(manifest["scenes"]["val"]) and len(r["val_scenes"]) == r["k"]
            assert (r["train_scenes"], r["selection_scenes"], r["recipe_scenes"]) == (r["k"], r["k"], 0)
            assert r["labeled_scenes_used"] == 2 * r["k"]
    # The same per-draw grid for every dense method, the trial kept the one best on the draw's val scenes.
    for r in runs:
        assert [g["lr_scale"] for g in r["grid"]] == [0.5, 2.0]
        best = max(r["grid"], key=lambda g: g["val_miou"])
        assert r["chosen"]["lr_scale"] == best["lr_scale"] and r["val_miou"] == best["val_miou"]
        head = json.loads((out / "heads" / f"{r['method']}-k{r['k']}-d{r['draw']}" / "head.json").read_text())
        base = 2e-3 if r["method"] == "scratch_unet" else 1e-3  # the methods' own lr
        assert head["config"]["lr"] == pytest.approx(base * r["chosen"]["lr_scale"])
    # Paired differences, recomputed from the runs.
    by = {(r["method"], r["k"], r["draw"]): r["test_miou"] for r in runs}
    pairs = {(e["method"], e["baseline"], e["k"]): e for e in results["paired"]}
    assert set(pairs) == {
        (m, b, k) for k in (1, 2)
        for m, b in [("finetune", "scratch_unet"), ("finetune_random", "scratch_unet"),
                     ("dense_decoder", "scratch_unet"), ("finetune", "finetune_random")]
    }  # fmt: skip
    for (m, b, k), e in pairs.items():
        diffs = [by[(m, k, d)] - by[(b, k, d)] for d in (0, 1)]
        assert e["differences"] == pytest.approx(diffs) and e["mean"] == pytest.approx(np.mean(diffs))
        assert min(diffs) - 1e-12 <= e["low"] <= e["mean"] <= e["high"] <= max(diffs) + 1e-12
    table = (out / "table.md").read_text()
    e = pairs[("finetune", "finetune_random", 2)]
    assert f"| finetune vs finetune_random | 2 scenes | {100 * e['mean']:+.1f} |" in table
    assert "| finetune_random | 1 / 1 / 0 (2) | 2 / 2 / 0 (4) |" in table
    # One test scene of the fine-tuned network, scored by hand.
    values = [c["value"] for c in manifest["labels"]["classes"]]
    r = next(x for x in runs if x["method"] == "finetune" and x["k"] == 2 and x["draw"] == 1)
    pred_dir = out / "predictions" / "finetune-k2-d1"
    scene = json.loads((pred_dir / "predictions.json").read_text())["scenes"][0]
    cm = _hand_confusion(pred_dir / scene["class_map"], manifest["scene_files"][scene["scene"]]["mask"],
                         values, len(values))  # fmt: skip
    assert r["test_scenes"][scene["scene"]]["miou"] == pytest.approx(np.nanmean(_iou(cm)))
    # Weights: fine-tuning starts from the checkpoint and moves a little; the random network does not
    # start there; the dense decoder leaves the denoiser exactly as it was.
    ddpm = load_pretrained(json.loads((sample_demo / "features" / "table.json").read_text())["checkpoint"])
    pre = ddpm.model.state_dict()

    def distance(method: str) -> float:
        unet = TrainedHead.load(str(out / "heads" / f"{method}-k2-d1")).module.unet.state_dict()
        keys = [k for k in pre if not k.startswith("conv_out")]
        return max(float((unet[k] - pre[k]).abs().max()) for k in keys)

    assert distance("dense_decoder") == 0.0
    assert 0.0 < distance("finetune") < distance("finetune_random")
    head = json.loads((out / "heads" / "finetune_random-k1-d0" / "head.json").read_text())
    assert head["config"]["kind"] == "segmenter" and head["config"]["pretrained"] is False
    assert head["config"]["backbone_lr_scale"] == 1.0
    assert (out / "label_efficiency.png").stat().st_size > 1000


@pytest.mark.integration
def test_a_stopped_label_efficiency_run_keeps_its_finished_runs_and_a_rerun_resumes(
    sample_demo, tmp_path, ray_cluster
):
    out = tmp_path / "le"
    args = [f"features={sample_demo / 'features'}", "ks=[1]", "methods=[scratch_unet]", "unet.steps=4",
            "unet.eval_every=2", f"output={out}", "tracking.enabled=false"]  # fmt: skip
    first = run_job_inline("label_efficiency.py", *args, "draws=1")
    assert first.returncode == 0, first.stderr[-3000:]
    (kept,) = json.loads((out / "results.json").read_text())["runs"]
    journal = json.loads((out / "journal.json").read_text())
    assert list(journal["runs"]) == ["scratch_unet-k1-d0"]
    # More draws of the same settings: draw 0 is taken from the journal, not trained again.
    more = run_job_inline("label_efficiency.py", *args, "draws=2")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming: 1 finished run(s) in" in more.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["draw"] for r in runs] == [0, 1] and runs[0]["train_seconds"] == kept["train_seconds"]
    # Other settings start over; a kept run whose head is gone is run again.
    changed = [*args[:-3], "unet.eval_every=4", *args[-2:], "draws=2"]
    other = run_job_inline("label_efficiency.py", *changed)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "resuming" not in other.stderr and "made with other settings: starting over" in other.stderr
    (out / "heads" / "scratch_unet-k1-d1" / "head.json").unlink()
    last = run_job_inline("label_efficiency.py", *changed)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resuming: 2 finished run(s) in" in last.stderr
    assert (
        "scratch_unet-k1-d1 finished before, but" in last.stderr
        and "is gone: running it again" in last.stderr
    )
    assert (out / "heads" / "scratch_unet-k1-d1" / "head.json").exists()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2


@pytest.mark.integration
def test_label_efficiency_in_tiles_draws_k_tiles_and_scores_a_test_region(sample_demo, tmp_path, ray_cluster):
    """``unit=tiles`` draws k tiles; ``test_region`` predicts and scores only that part of each test
    scene (the map covers it, and the scored pixels are its pixels)."""
    out = tmp_path / "le"
    proc = run_job_inline(
        "label_efficiency.py", f"features={sample_demo / 'features'}", "unit=tiles", "ks=[3]", "draws=1",
        "methods=[scratch_unet]", "unet.steps=10", "unet.eval_every=5", "test_region=[16,32,64,96]",
        f"output={out}", "tracking.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["tiles"] == 3 and len(run["drawn"]) == 3 and all("/" in t for t in run["drawn"])
    assert set(run["scenes"]) == {t.split("/")[0] for t in run["drawn"]}
    assert 0.0 <= run["test_miou"] <= 1.0
    assert run["test_scenes"] and all(s["pixels"] <= 64 * 96 for s in run["test_scenes"].values())
    maps = sorted((out / "predictions").rglob("scene_*.tif"))
    assert len(maps) == len(run["test_scenes"]), maps
    for tif in maps:
        with rasterio.open(tif) as ds:
            assert (ds.height, ds.width) == (64, 96), tif


@pytest.mark.integration
def test_label_efficiency_refuses_shards_without_a_test_split(labeled_table, tmp_path):
    proc = run_job_inline(
        "label_efficiency.py", f"features={labeled_table.root}", f"output={tmp_path / 'le'}"
    )
    assert proc.returncode == 2
    assert "have no 'test' split" in proc.stderr and "test_fraction" in proc.stderr
    assert not (tmp_path / "le" / "results.json").exists()


def _blend_uniform_scene(p: np.ndarray, h: int, w: int, overlap: int, border: int) -> np.ndarray:
    """The class map of an ``h x w`` uniform scene of which every window predicts ``p``
    ``(C, size, size)``, blended the way prediction blends."""
    from rsdiff.data.tiling import axis_origins
    from rsdiff.prediction.blend import RowBlender

    size = p.shape[-1]
    blender = RowBlender(h, w, p.shape[0], size, overlap, border)
    rows, cols = axis_origins(h, size, size - overlap), axis_origins(w, size, size - overlap)
    out = np.zeros((h, w), np.int64)
    for i, r in enumerate(rows):
        for c in cols:
            blender.add(r, c, p)
        for first, probs in blender.release(rows[i + 1] if i + 1 < len(rows) else h):
            out[first : first + probs.shape[1]] = probs.argmax(0)
    return out


@pytest.mark.unit
def test_draws_of_one_k_are_different_scenes_while_the_pool_has_them():
    """Independent draws put tile_6's image_part_005 into draws 0 and 2 of k=1 (seed 0), so a
    3-draw spread came from 2 scenes; the draws of one k now differ while the pool allows it."""
    pool = [f"tile_6-images-image_part_{i:03d}" for i in range(1, 10)]
    for k in (1, 2, 5):
        draws = [draw_units(pool, k, d, seed=0) for d in range(3)]
        assert len({tuple(x) for x in draws}) == 3 and all(len(set(x)) == k for x in draws)
        assert draws == [draw_units(list(reversed(pool)), k, d, seed=0) for d in range(3)]  # reproducible
    singles = [draw_units(pool, 1, d, seed=3)[0] for d in range(9)]
    assert sorted(singles) == pool  # 9 draws of 1 scene: every scene once
    assert [draw_units(pool[:2], 2, d, seed=0) for d in range(3)] == [pool[:2]] * 3  # one subset: repeats


@pytest.mark.unit
def test_a_uniform_scene_predicts_uniformly_with_the_default_windows():
    """Uniform water used to come out with a grid of stray pixels at the window corners: near its
    own edges a window's features are degraded (the UNet sees padding), and with a 16 px overlap
    a pixel where four windows meet is within 8 px of an edge in every one of them. Here every
    window of a uniform scene says water (class 1) except in a band of 8 px at its edges (class
    0); the default windows (5/8 of a window of overlap, plain ramp) must give a uniform map away
    from the scene's own edge, and so must ``border=8``, which gives that band almost no weight."""
    from types import SimpleNamespace

    from rsdiff.prediction.tasks import window_plan

    size, band, h, w = 64, 8, 200, 232
    edge = np.minimum(np.arange(size), size - 1 - np.arange(size))
    in_band = np.minimum(edge[:, None], edge[None, :]) < band
    p = np.where(in_band[None], np.array([0.6, 0.4])[:, None, None], np.array([0.3, 0.7])[:, None, None])
    ddpm = SimpleNamespace(meta={"image_size": size, "model": {"channel_mult": [1, 2, 2]}})
    cfg = build(PredictConfig, {"head": "h", "inputs": ["s"]})
    plan = window_plan(cfg, ddpm)
    assert (plan.size, plan.overlap, plan.border) == (64, 40, 0)
    for border in (plan.border, band):
        got = _blend_uniform_scene(p.astype(np.float32), h, w, plan.overlap, border)
        inner = got[band:-band, band:-band]
        assert (inner == 1).all(), (border, np.argwhere(inner != 1)[:5])
        # pixels within the band of the scene's own edge have no better window: they keep its class
        assert (got[:band] == 0).any()
    # the earlier defaults (overlap 16, plain ramp): stray pixels where windows meet, in a regular grid
    old = _blend_uniform_scene(p.astype(np.float32), h, w, 16, 0)[band:-band, band:-band]
    stray = np.argwhere(old != 1) + band
    assert len(stray) > 0 and set(np.unique(stray[:, 0] % 48)) <= set(range(48 - band, 48)) | set(
        range(16 + band)
    )


@pytest.mark.unit
def test_per_scene_scores_are_keyed_by_the_manifests_scene_ids_for_nested_folders():
    """Prediction names a scene by its file (``a``), the manifest by its path under the ingest root
    (``tile_1-images-a``): results.json uses the manifest's ids, which the drawn scenes use too."""
    from rsdiff.data.labels import LabelConfig
    from rsdiff.label_efficiency import _TestScenes, manifest_scene_ids

    test = _TestScenes(["tile_1-images-a", "tile_2-images-a2"], ["/d/tile_1/images/a.jpg",
                       "/d/tile_2/images/a2.jpg"], LabelConfig())  # fmt: skip
    records = [
        {"scene": "a", "image": "/d/tile_1/images/a.jpg"},
        {"scene": "a2", "image": "/d/tile_2/images/a2.jpg"},
    ]
    got = manifest_scene_ids({"a": {"miou": 0.5}, "a2": {"miou": 0.25}}, records, test)
    assert got == {"tile_1-images-a": {"miou": 0.5}, "tile_2-images-a2": {"miou": 0.25}}


def _tile_pool(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three shards of 200 labeled 4-band 32 px tiles (scenes of 20) with a manifest at ``root``;
    returns ``{key: (image, label)}``."""
    from rsdiff.data.manifest import Manifest, write_manifest
    from rsdiff.data.shards import Sample, ShardWriter

    rng = np.random.default_rng(0)
    names, want = [], {}
    for part in range(3):
        with ShardWriter(root, f"train-{part:04d}", 1 << 30) as w:
            for i in range(200):
                key = f"scene{part}-{i // 20}/{i}_0"
                image = rng.integers(0, 1000, (4, 32, 32), dtype=np.uint16)
                label = rng.integers(0, 3, (32, 32), dtype=np.uint8)
                w.write(Sample(key, image, label, {}))
                want[key] = (image, label)
        names += [s.uri.rsplit("/", 1)[1] for s in w.shards]
    write_manifest(root, Manifest(["b", "g", "r", "n"], "uint16", 32, 32, {"train": 600},
                                  {"train": names}, {}, {}))  # fmt: skip
    return want


@pytest.mark.unit
def test_dense_tiles_decode_only_the_asked_samples_so_memory_follows_the_draw(tmp_path):
    """A pool of 600 labeled tiles (9 MiB as float32): indexing it decodes nothing, and a draw of
    12 tiles holds those 12 alone; the tiles are exactly what the shards hold, normalised."""
    import tracemalloc

    from rsdiff.data.normalize import Normalizer
    from rsdiff.label_efficiency import DenseTiles

    want = _tile_pool(str(tmp_path))
    norm = Normalizer((500.0,) * 4, (100.0,) * 4)
    tracemalloc.start()
    tiles = DenseTiles(str(tmp_path), set(want), norm)
    _, indexing_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    drawn = sorted(want)[::50]  # 12 tiles from every shard
    x, y = tiles.get(drawn)
    _, draw_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pool_bytes = 600 * 4 * 32 * 32 * 4
    assert indexing_peak < pool_bytes / 10 and draw_peak < pool_bytes / 10, (indexing_peak, draw_peak)
    assert x.shape == (12, 4, 32, 32) and x.dtype == np.float32 and y.shape == (12, 32, 32)
    for n, key in enumerate(drawn):
        assert np.array_equal(x[n], norm(want[key][0])) and np.array_equal(y[n], want[key][1])


@pytest.mark.unit
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_draw_reads_only_its_tiles_bytes_not_their_shards(tmp_path, where, request, monkeypatch):
    """After indexing, a draw of 12 tiles scattered over 3 shards (4.9 MB) fetches about their
    own bytes with ranged reads (one per tile, neighbours merged), from disk or S3, and no shard
    is streamed whole; the tiles are exactly what the shards hold."""
    from rsdiff import storage
    from rsdiff.data.normalize import Normalizer
    from rsdiff.label_efficiency import DenseTiles

    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('bucket')}/pool"
    staged = tmp_path if where == "local" else tmp_path / "staged"
    want = _tile_pool(str(staged))
    if where == "s3":
        for f in staged.iterdir():
            storage.upload(f, f"{root}/{f.name}")
    norm = Normalizer((500.0,) * 4, (100.0,) * 4)
    tiles = DenseTiles(root, set(want), norm)
    streamed, ranged = [], []
    real_range = storage.read_range
    monkeypatch.setattr(storage, "open_stream", lambda uri: streamed.append(uri))
    monkeypatch.setattr(storage, "read_range", lambda u, a, b: ranged.append(b - a) or real_range(u, a, b))
    drawn = sorted(want)[7::50]
    x, y = tiles.get(drawn)
    sample_bytes = sum(f.stat().st_size for f in staged.glob("*.tar")) / 600  # members, headers, padding
    assert not streamed and len(ranged) == 12 and sum(ranged) <= 12 * sample_bytes, ranged
    for n, key in enumerate(drawn):
        assert np.array_equal(x[n], norm(want[key][0])) and np.array_equal(y[n], want[key][1])


@pytest.mark.unit
def test_a_corrupt_shard_or_one_changed_since_indexing_is_one_clear_error(tmp_path):
    """Indexing a shard that is not a tar, or reading tiles from a shard rewritten since it was
    indexed, fails naming the shard (not a bare tar or key error)."""
    from rsdiff.data.normalize import Normalizer
    from rsdiff.errors import DataError, StorageError
    from rsdiff.label_efficiency import DenseTiles

    want = _tile_pool(str(tmp_path))
    norm = Normalizer((500.0,) * 4, (100.0,) * 4)
    tiles = DenseTiles(str(tmp_path), set(want), norm)
    shard = tmp_path / "train-0001-00000.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated since indexed
    with pytest.raises(StorageError, match=r"train-0001-00000\.tar gave .* it changed since it was indexed"):
        tiles.get([k for k in sorted(want) if k.startswith("scene1-")][-1:])
    shard.write_bytes(np.random.default_rng(1).bytes(len(original)))  # same size, other bytes
    with pytest.raises(DataError, match=r"0001-00000\.tar (changed since it was indexed|no longer holds)"):
        tiles.get([k for k in sorted(want) if k.startswith("scene1-")][:1])
    with pytest.raises(DataError, match=r"train-0001-00000\.tar is not a readable tar"):
        DenseTiles(str(tmp_path), set(want), norm)
