"""``jobs/demo.py``: the whole chain on one machine, from scenes to an evaluated land-cover map.

ingest -> pretrain (tiny preset) -> extract -> sweep (a few trials) -> predict (the held-out test
scenes) -> evaluate, with a local Ray, local storage under ``workdir`` and one MLflow experiment
that holds each stage's runs plus a ``demo`` run summarising them. With ``data`` (a folder of
image/mask pairs such as dubai-aerial) it uses that; without it generates six small 4-band
uint16 GeoTIFF scenes with index masks (synthetic and easy: a sanity check, not a benchmark).
Scenes are split train/val/test; the sweep selects on val only, and the final metrics are those of
the test scenes, which nothing before the final evaluation reads. Re-running resumes: finished
stages are reused (pretraining resumes from its checkpoint, the sweep continues from its trial
records); ``fresh=true`` starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.config import build, load_section, preset
from rsdiff.data.labels import LabelConfig
from rsdiff.errors import ConfigError, DataError
from rsdiff.provenance import provenance_tags
from rsdiff.ray_config import RayConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Config of ``jobs/demo.py``: the few knobs that matter; every stage keeps its preset otherwise."""

    data: str | None = None  # folder of image/mask pairs (e.g. dubai-aerial); null = generated sample
    images: list[str] = field(default_factory=lambda: ["*/images/*", "images/*"])  # globs under data
    labels: LabelConfig = field(default_factory=LabelConfig)  # mask template + classes for data
    labels_preset: str | None = None  # an ingest preset whose `labels` to use (configs/ingest/dubai.yaml)
    workdir: str = "runs/demo"
    fresh: bool = False  # delete workdir first
    tile_size: int = 64
    val_fraction: float = 0.17  # of all scenes (the generated sample: 2 of 6)
    test_fraction: float = 0.17  # held out for the final score (the generated sample: 2 of 6)
    test_scenes: list[str] = field(default_factory=list)  # instead: globs of test scene ids (tile_8-*)
    val_scenes: list[str] = field(default_factory=list)  # instead of val_fraction: globs of val scene ids
    pretrain_steps: int = 200
    batch_size: int = 8
    timesteps: list[int] = field(default_factory=lambda: [50, 150, 250])
    pixels_per_class: int = 64
    max_images: int | None = None  # labeled tiles per split to extract features from (null = all)
    trials: int = 4
    head_epochs: int = 8
    tracking_uri: str | None = None  # null = MLFLOW_TRACKING_URI or {workdir}/mlflow.db
    experiment: str = "rsdiff-demo"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class DemoResult:
    metrics: dict[str, Any]  # of the test scenes
    stages: dict[str, float]  # seconds per stage
    predictions: list[dict[str, Any]]
    metrics_json: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    run_ids: dict[str, str]
    test_scenes: list[str] = field(default_factory=list)
    data: str = ""  # what the data was (the generated sample says it is synthetic)


def _labels_for(cfg: DemoConfig) -> tuple[list[str], LabelConfig | None, str]:
    """``(inputs, labels, description)`` of the demo's data (no labels: the generated sample's)."""
    if cfg.data is None:
        return (
            [],
            None,
            (
                "generated sample (6 synthetic scenes, 4-band uint16 GeoTIFF, index masks: easy by design, "
                "a check that the chain works, not a measure of accuracy)"
            ),
        )
    root = storage.absolute(str(cfg.data))
    inputs = [storage.join(root, g) for g in cfg.images]
    labels = cfg.labels
    if cfg.labels_preset:
        labels = load_section(LabelConfig, preset("ingest", cfg.labels_preset), "labels")
    if not labels.mask_template:
        labels = build(LabelConfig, labels, {"mask_template": "{dir}/../masks/{stem}.png"})
    return inputs, labels, f"{storage.display(root)}"


def discover_colour_classes(inputs: list[str], labels: LabelConfig, limit: int = 24) -> list[dict[str, str]]:
    """Classes named after the colours found in the masks (for a folder with no class list).

    Raises:
        DataError: masks missing, or more than ``limit`` colours (not a class mask).
    """
    import numpy as np

    from rsdiff.data.classmap import ClassMap, colour_hex
    from rsdiff.data.scenes import SceneReader, discover

    refs = discover(inputs, labels.mask_template)
    counts: dict[str, int] = {}
    dummy = ClassMap(names=("x",), colours=((1, 2, 3),), values=(0,))
    for ref in refs:
        with SceneReader(ref, dummy) as reader:
            rgb = reader.mask_rgb()
            uniq, n = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
            for c, k in zip(uniq, n):
                counts[colour_hex(c)] = counts.get(colour_hex(c), 0) + int(k)
            if len(counts) > limit:
                raise DataError(
                    f"masks under {inputs} hold more than {limit} colours: not class masks? Give "
                    "labels.classes (or labels_preset=configs/ingest/<preset>.yaml)"
                )
    return [{"name": f"class_{h[1:].lower()}", "colour": h} for h in sorted(counts)]


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the whole chain; returns the evaluation metrics and where everything is.

    Each stage's config is its shipped preset with the demo's choices merged over it (typed, and
    checked like a user's overrides), never a string of overrides.
    """
    from rsdiff import tracking
    from rsdiff.raytools import connect

    if cfg.trials < 1 or cfg.pretrain_steps < 1 or cfg.head_epochs < 1:
        raise ConfigError("trials, pretrain_steps and head_epochs must be >= 1")
    work = Path(storage.absolute(str(cfg.workdir)))
    if storage.is_s3(str(work)):
        raise ConfigError("the demo runs on local storage: workdir must be a local folder")
    if cfg.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_uri(cfg.tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
    tracking.client(uri)  # fail early when unreachable
    inputs, labels, described = _labels_for(cfg)
    log.info("demo: data = %s; working in %s", described, work)
    connect(cfg.ray.address, cfg.ray.num_cpus)
    stages: dict[str, float] = {}
    run_ids: dict[str, str] = {}
    # The demo's run is the parent of every stage's run (MLflow nests them under it).
    demo_run = tracking.RunHandle.create(
        uri, cfg.experiment, "demo", {**provenance_tags({"data": described, "workdir": str(work)}),
                                      "rsdiff.stage": "demo"}
    )  # fmt: skip
    demo_run.log_params(tracking.config_params(cfg))
    with tracking.ends_run(demo_run):
        return _run_stages(cfg, work, uri, inputs, labels, described, demo_run, stages, run_ids)


def _run_stages(
    cfg: DemoConfig,
    work: Path,
    uri: str,
    inputs: list[str],
    labels: LabelConfig | None,
    described: str,
    demo_run: Any,
    stages: dict[str, float],
    run_ids: dict[str, str],
) -> DemoResult:
    """The five stages, each a child run of ``demo_run``; then the demo run's own summary."""
    from rsdiff.data.ingest_config import IngestConfig
    from rsdiff.data.manifest import read_manifest
    from rsdiff.evaluate import EvaluateConfig, run_evaluate
    from rsdiff.features.config import ExtractConfig
    from rsdiff.features.extract import run_extract
    from rsdiff.ingest import run_ingest
    from rsdiff.prediction.config import PredictConfig
    from rsdiff.prediction.run import run_predict
    from rsdiff.pretrain import run_pretrain
    from rsdiff.raytools import largest_node_cpus
    from rsdiff.sweep.config import SweepConfig
    from rsdiff.sweep.run import run_sweep
    from rsdiff.train.config import PretrainConfig

    parent = demo_run.run_id

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("demo: --- %s ---", name)
        yield
        stages[name] = time.perf_counter() - t0

    # 1. ingest
    shards = str(work / "shards")
    with timed("ingest"):
        if cfg.data is None:
            from rsdiff.data.synthetic import write_sample_dataset

            scene_dir = work / "scenes"
            if not (scene_dir / "images").exists():
                write_sample_dataset(scene_dir, scenes=6)
            inputs = [str(scene_dir / "images" / "*.tif")]
            base = build(IngestConfig, preset("ingest", "sample"), {"inputs": inputs})
            labels = base.labels
        else:
            base = IngestConfig(inputs=inputs)
            if not labels.classes:
                found = discover_colour_classes(inputs, labels)
                log.warning(
                    "demo: no class list given; using the %d mask colours as classes: %s",
                    len(found),
                    [c["colour"] for c in found],
                )
                labels = build(LabelConfig, labels, {"classes": found})
        ingest_cfg = build(
            IngestConfig,
            base,
            {
                "inputs": inputs,
                "labels": labels,
                "output": shards,
                "tile_size": cfg.tile_size,
                "val_fraction": 0.0 if cfg.val_scenes else cfg.val_fraction,
                "val_scenes": list(cfg.val_scenes),
                "test_fraction": 0.0 if cfg.test_scenes else cfg.test_fraction,
                "test_scenes": list(cfg.test_scenes),
                "split_seed": cfg.seed,
                "shard_max_mb": 64.0,
                "ray": cfg.ray,
            },
        )
        if not storage.exists(storage.join(shards, "manifest.json")):
            run_ingest(ingest_cfg)
    manifest = read_manifest(shards)
    if not manifest.scenes.get("val") or not manifest.scenes.get("test"):
        raise DataError(
            "the demo needs at least one validation and one test scene: raise val_fraction/test_fraction "
            "or give more scenes"
        )

    # 2. pretrain
    with timed("pretrain"):
        steps = cfg.pretrain_steps
        pre_cfg = build(
            PretrainConfig,
            preset("pretrain", "tiny"),
            {
                "data": {"shards": shards, "batch_size": cfg.batch_size, "num_workers": 0},
                # one CPU worker with a whole node's cores: torch's threads follow its CPU count
                "scaling": {"cpus_per_worker": largest_node_cpus()},
                "optim": {"max_steps": steps, "warmup_steps": max(1, steps // 10)},
                "checkpoint": {"every_steps": max(1, steps // 3)},
                "tracking": {
                    "log_every": max(1, steps // 20), "sample_every": steps, "sample_steps": 10,
                    "uri": uri, "experiment": cfg.experiment, "parent_run_id": parent,
                },
                "model": {"image_size": cfg.tile_size},
                "run": {"storage": str(work / "ray"), "name": "demo-pretrain"},
                "seed": cfg.seed,
                "ray": cfg.ray,
            },
        )  # fmt: skip
        pre = run_pretrain(pre_cfg)
        run_ids["pretrain"] = pre.mlflow_run_id

    # 3. extract
    with timed("extract"):
        ext_cfg = build(
            ExtractConfig,
            preset("extract", "tiny"),
            {
                "checkpoint": pre.checkpoint,
                "shards": shards,
                "output": str(work / "features"),
                "overwrite": True,
                "timesteps": list(cfg.timesteps),
                "pixels_per_class": cfg.pixels_per_class,
                "max_images": cfg.max_images,
                "ray": cfg.ray,
            },
        )
        table = run_extract(ext_cfg)
    blocks = table.meta["blocks"]
    search_blocks = [blocks[-2:], blocks[-4:-2] or blocks[-2:], blocks[1::2] or blocks]
    # 4. sweep
    with timed("sweep"):
        sw_cfg = build(
            SweepConfig,
            preset("sweep", "tiny"),
            {
                "features": table.root,
                "output": str(work / "sweep"),
                "storage": str(work / "tune"),
                "name": "demo-sweep",
                "num_samples": cfg.trials,
                "head": {"epochs": cfg.head_epochs},
                "grace_period": min(2, cfg.head_epochs),
                "tracking": {"uri": uri, "experiment": cfg.experiment, "parent_run_id": parent},
                "seed": cfg.seed,
                "search": {
                    "timesteps": [[t] for t in table.meta["timesteps"]] + [table.meta["timesteps"]],
                    "blocks": search_blocks,
                },
                "ray": cfg.ray,
            },
        )
        sweep = run_sweep(sw_cfg)
        run_ids["sweep"] = sweep.parent_run_id

    # 5. predict the test scenes (held out of pretraining, extraction and the sweep)
    test_ids = manifest.scenes["test"]
    test_images = [manifest.scene_files[i]["image"] for i in test_ids]
    log.info("demo: scoring the %d test scene(s) %s", len(test_ids), test_ids)
    with timed("predict"):
        pr_cfg = build(
            PredictConfig,
            {
                "head": sweep.best_head,
                "inputs": test_images,
                "output": str(work / "predictions"),
                "overwrite": True,
                "tracking": {"uri": uri, "experiment": cfg.experiment, "parent_run_id": parent},
                "ray": cfg.ray,
            },
        )
        pred = run_predict(pr_cfg)
        run_ids["predict"] = pred.mlflow_run_id or ""

    # 6. evaluate
    with timed("evaluate"):
        ev_cfg = build(
            EvaluateConfig,
            {
                "predictions": pred.output,
                "labels": labels,
                "tracking": {"uri": uri, "experiment": cfg.experiment, "parent_run_id": parent},
            },
        )
        ev = run_evaluate(ev_cfg)
        run_ids["evaluate"] = ev.mlflow_run_id or ""

    demo_run.set_tags({f"rsdiff.run.{k}": v for k, v in run_ids.items()})
    demo_run.log_params(
        {
            "data_description": described,
            "checkpoint": pre.checkpoint,
            "best_head": sweep.best_head,
            "pretrain.device": "cpu",
            "test_scene_ids": json.dumps(test_ids),
        }
    )
    demo_run.log_metrics(
        {
            **{f"seconds_{k}": v for k, v in stages.items()},
            "seconds_total": sum(stages.values()),
            "test_miou": ev.metrics["miou"],
            "test_overall_accuracy": ev.metrics["overall_accuracy"],
            "sweep_best_val_miou": sweep.best["best_val_miou"],
        },
        step=0,
    )
    if pred.scenes and pred.scenes[0].get("quicklook"):
        import numpy as np
        from PIL import Image

        demo_run.log_image(np.array(Image.open(pred.scenes[0]["quicklook"])), "quicklook.png")
    demo_run.log_dict(
        {
            "stages_seconds": stages,
            "data": described,
            "test_scenes": test_ids,
            "test_metrics": {k: ev.metrics[k] for k in ("miou", "overall_accuracy", "macro_f1", "iou", "f1")},
        },
        "demo.json",
    )
    demo_run.finish()
    run_ids["demo"] = demo_run.run_id
    (work / "demo.json").write_text(
        json.dumps(
            {
                "stages_seconds": stages,
                "run_ids": run_ids,
                "data": described,
                "test_scenes": test_ids,
                "metrics": ev.output,
                "predictions": pred.output,
            },
            indent=1,
        )
    )
    experiment_id = demo_run.client.get_run(demo_run.run_id).info.experiment_id
    return DemoResult(
        ev.metrics,
        stages,
        pred.scenes,
        ev.output,
        uri,
        cfg.experiment,
        experiment_id,
        run_ids,
        test_ids,
        described,
    )
