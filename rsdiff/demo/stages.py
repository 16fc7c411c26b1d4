"""The demo's stages as a named pipeline: each builds its stage's typed config (the shipped preset
with the demo's choices merged over it, checked like a user's overrides) and runs the stage, reading
what earlier stages left in :class:`Chain` and adding its own result.

ingest -> pretrain -> extract -> sweep -> predict (the held-out test scenes) -> evaluate. Every
stage's MLflow run is a child of the demo's run. A re-run reuses what is finished: ingest skips
when its manifest exists, pretraining resumes from its checkpoint, the sweep from its trials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.config import build, preset
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.labels import LabelConfig
from rsdiff.demo.config import DemoConfig
from rsdiff.demo.data import discover_colour_classes
from rsdiff.errors import DataError
from rsdiff.evaluate import EvaluateConfig
from rsdiff.features.config import ExtractConfig
from rsdiff.prediction.config import PredictConfig
from rsdiff.sweep.config import SweepConfig
from rsdiff.train.config import PretrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demo:
    """What every stage reads: the demo's config, its local folder, the MLflow store and the
    demo's run (the parent of every stage's run), and the scenes to ingest (empty, with no
    labels, for the generated sample)."""

    cfg: DemoConfig
    work: Path
    uri: str
    parent: str
    inputs: list[str]
    labels: LabelConfig | None

    def tracking(self) -> dict[str, str]:
        """A stage's ``tracking`` section: the demo's store and experiment, under its run."""
        return {"uri": self.uri, "experiment": self.cfg.experiment, "parent_run_id": self.parent}


@dataclass
class Chain:
    """What the stages hand on, filled as each finishes (stage results as the stages return them)."""

    shards: str = ""
    labels: LabelConfig | None = None
    manifest: Any = None
    pretrain: Any = None
    table: Any = None
    sweep: Any = None
    predict: Any = None
    evaluate: Any = None
    test_ids: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)


def ingest_config(demo: Demo, chain: Chain) -> IngestConfig:
    """The ingest preset (the sample's, or the defaults for a folder) with the demo's split and
    tiles; sets ``chain.labels`` (a folder without a class list gets its mask colours as classes)."""
    cfg = demo.cfg
    inputs, labels = demo.inputs, demo.labels
    if cfg.data is None:
        from rsdiff.data.synthetic import write_sample_dataset

        scene_dir = demo.work / "scenes"
        if not (scene_dir / "images").exists():
            write_sample_dataset(scene_dir, scenes=6)
        inputs = [str(scene_dir / "images" / "*.tif")]
        base = build(IngestConfig, preset("ingest", "sample"), {"inputs": inputs})
        labels = base.labels
    else:
        base = IngestConfig(inputs=inputs)
        if not labels.classes:
            found = discover_colour_classes(inputs, labels)
            log.warning("demo: no class list given; using the %d mask colours as classes: %s",
                        len(found), [c["colour"] for c in found])  # fmt: skip
            labels = build(LabelConfig, labels, {"classes": found})
    chain.labels = labels
    return build(IngestConfig, base, {
        "inputs": inputs, "labels": labels, "output": chain.shards, "tile_size": cfg.tile_size,
        "val_fraction": 0.0 if cfg.val_scenes else cfg.val_fraction, "val_scenes": list(cfg.val_scenes),
        "test_fraction": 0.0 if cfg.test_scenes else cfg.test_fraction, "test_scenes": list(cfg.test_scenes),
        "split_seed": cfg.seed, "shard_max_mb": 64.0, "ray": cfg.ray,
    })  # fmt: skip


def ingest(demo: Demo, chain: Chain) -> None:
    """Cut the scenes into shards under ``workdir/shards`` (unless a manifest is there already).

    Raises:
        DataError: the split left no validation or no test scene.
    """
    from rsdiff.data.manifest import read_manifest
    from rsdiff.ingest import run_ingest

    chain.shards = str(demo.work / "shards")
    ingest_cfg = ingest_config(demo, chain)
    if not storage.exists(storage.join(chain.shards, "manifest.json")):
        run_ingest(ingest_cfg)
    chain.manifest = read_manifest(chain.shards)
    if not chain.manifest.scenes.get("val") or not chain.manifest.scenes.get("test"):
        raise DataError(
            "the demo needs at least one validation and one test scene: raise val_fraction/test_fraction "
            "or give more scenes"
        )
    chain.test_ids = chain.manifest.scenes["test"]


def pretrain_config(demo: Demo, chain: Chain) -> PretrainConfig:
    """The tiny preset for ``pretrain_steps`` steps on one CPU worker holding a whole node's cores."""
    from rsdiff.raytools import largest_node_cpus

    cfg, steps = demo.cfg, demo.cfg.pretrain_steps
    return build(PretrainConfig, preset("pretrain", "tiny"), {
        "data": {"shards": chain.shards, "batch_size": cfg.batch_size, "num_workers": 0},
        # one CPU worker with a whole node's cores: torch's threads follow its CPU count
        "scaling": {"cpus_per_worker": largest_node_cpus()},
        "optim": {"max_steps": steps, "warmup_steps": max(1, steps // 10)},
        "checkpoint": {"every_steps": max(1, steps // 3)},
        "tracking": {"log_every": max(1, steps // 20), "sample_every": steps, "sample_steps": 10,
                     **demo.tracking()},
        "model": {"image_size": cfg.tile_size},
        "run": {"storage": str(demo.work / "ray"), "name": "demo-pretrain"},
        "seed": cfg.seed,
        "ray": cfg.ray,
    })  # fmt: skip


def pretrain(demo: Demo, chain: Chain) -> None:
    """Pretrain the DDPM on every shard (a re-run resumes from the last checkpoint)."""
    from rsdiff.pretrain import run_pretrain

    chain.pretrain = run_pretrain(pretrain_config(demo, chain))
    chain.run_ids["pretrain"] = chain.pretrain.mlflow_run_id


def extract(demo: Demo, chain: Chain) -> None:
    """Features of the labeled pixels at the demo's timesteps, from the last checkpoint."""
    from rsdiff.features.extract import run_extract

    cfg = demo.cfg
    chain.table = run_extract(build(ExtractConfig, preset("extract", "tiny"), {
        "checkpoint": chain.pretrain.checkpoint, "shards": chain.shards,
        "output": str(demo.work / "features"), "overwrite": True, "timesteps": list(cfg.timesteps),
        "pixels_per_class": cfg.pixels_per_class, "max_images": cfg.max_images, "ray": cfg.ray,
    }))  # fmt: skip


def sweep_config(demo: Demo, chain: Chain) -> SweepConfig:
    """The tiny sweep over single timesteps and all of them, and three block sets (the deepest
    two, the two before them, every other block), ``trials`` trials selected on val."""
    cfg, meta = demo.cfg, chain.table.meta
    blocks = meta["blocks"]
    return build(SweepConfig, preset("sweep", "tiny"), {
        "features": chain.table.root, "output": str(demo.work / "sweep"),
        "storage": str(demo.work / "tune"), "name": "demo-sweep", "num_samples": cfg.trials,
        "head": {"epochs": cfg.head_epochs}, "grace_period": min(2, cfg.head_epochs),
        "tracking": demo.tracking(), "seed": cfg.seed, "ray": cfg.ray,
        "search": {
            "timesteps": [[t] for t in meta["timesteps"]] + [meta["timesteps"]],
            "blocks": [blocks[-2:], blocks[-4:-2] or blocks[-2:], blocks[1::2] or blocks],
        },
    })  # fmt: skip


def sweep(demo: Demo, chain: Chain) -> None:
    """Sweep the heads with Ray Tune (a re-run continues from the trials' records)."""
    from rsdiff.sweep.run import run_sweep

    chain.sweep = run_sweep(sweep_config(demo, chain))
    chain.run_ids["sweep"] = chain.sweep.parent_run_id


def predict(demo: Demo, chain: Chain) -> None:
    """Map the test scenes (held out of pretraining, extraction and the sweep) with the best head."""
    from rsdiff.prediction.run import run_predict

    images = [chain.manifest.scene_files[i]["image"] for i in chain.test_ids]
    log.info("demo: scoring the %d test scene(s) %s", len(chain.test_ids), chain.test_ids)
    chain.predict = run_predict(build(PredictConfig, {
        "head": chain.sweep.best_head, "inputs": images, "output": str(demo.work / "predictions"),
        "overwrite": True, "overlap": demo.cfg.predict_overlap, "tracking": demo.tracking(),
        "ray": demo.cfg.ray,
    }))  # fmt: skip
    chain.run_ids["predict"] = chain.predict.mlflow_run_id or ""


def evaluate(demo: Demo, chain: Chain) -> None:
    """Score the test maps against their masks."""
    from rsdiff.evaluate import run_evaluate

    chain.evaluate = run_evaluate(build(EvaluateConfig, {
        "predictions": chain.predict.output, "labels": chain.labels, "tracking": demo.tracking(),
    }))  # fmt: skip
    chain.run_ids["evaluate"] = chain.evaluate.mlflow_run_id or ""


STAGES: tuple[tuple[str, Callable[[Demo, Chain], None]], ...] = (
    ("ingest", ingest),
    ("pretrain", pretrain),
    ("extract", extract),
    ("sweep", sweep),
    ("predict", predict),
    ("evaluate", evaluate),
)
