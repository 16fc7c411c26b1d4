"""Run the demo: its folder, MLflow store and parent run, the stages in order, and a summary."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.data.scenes import discover
from rsdiff.demo.config import DemoConfig, DemoResult
from rsdiff.demo.data import labels_for
from rsdiff.demo.stages import STAGES, Chain, Demo
from rsdiff.errors import ConfigError
from rsdiff.metrics import worst_class
from rsdiff.provenance import provenance_tags
from rsdiff.sweep.report import winner_line

log = logging.getLogger(__name__)


# What the demo writes in its workdir; ``fresh=true`` deletes these and nothing else.
OUTPUTS = ("scenes", "shards", "ray", "features", "tune", "sweep", "predictions", "demo.json", "mlflow.db",
           "mlartifacts")  # fmt: skip


def _open_workdir(cfg: DemoConfig, work: Path) -> str:
    """Check the tracking store and join Ray, then (``fresh``) delete the demo's own outputs from an
    earlier run, so a config that fails its checks deletes nothing; returns the tracking URI."""
    from rsdiff import tracking
    from rsdiff.raytools import connect

    own_store = not cfg.tracking_uri
    uri = tracking.resolve_uri(cfg.tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
    if not own_store:
        tracking.client(uri)  # fail early when unreachable
    connect(cfg.ray.address, cfg.ray.num_cpus)
    if cfg.fresh:
        removed = [name for name in OUTPUTS if (work / name).exists()]
        for name in removed:
            shutil.rmtree(work / name) if (work / name).is_dir() else (work / name).unlink()
        others = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
        log.info("demo: fresh=true deleted %s from %s%s", removed or "nothing", work,
                 f"; left what the demo did not write: {others}" if others else "")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    if own_store:
        tracking.client(uri)
    return uri


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the whole chain; returns the evaluation metrics and where everything is.

    The stages are :data:`~rsdiff.demo.stages.STAGES`, each a child run of the demo's run; each
    stage's config is its shipped preset with the demo's choices merged over it (typed, and checked
    like a user's overrides), never a string of overrides.
    """
    from rsdiff import tracking

    if cfg.trials < 1 or cfg.pretrain_steps < 1 or cfg.head_epochs < 1:
        raise ConfigError("trials, pretrain_steps and head_epochs must be >= 1")
    if cfg.predict_overlap is not None and not 0 <= cfg.predict_overlap < cfg.tile_size:
        raise ConfigError(f"predict_overlap={cfg.predict_overlap} must be in [0, tile_size={cfg.tile_size})")
    work = Path(storage.absolute(str(cfg.workdir)))
    if storage.is_s3(str(work)):
        raise ConfigError("the demo runs on local storage: workdir must be a local folder")
    inputs, labels, described = labels_for(cfg)
    if inputs:  # a folder of scenes: a wrong path is one line before any folder, store or Ray starts
        discover(inputs, labels.mask_template)
    uri = _open_workdir(cfg, work)
    log.info("demo: data = %s; working in %s", described, work)
    # The demo's run is the parent of every stage's run (MLflow nests them under it).
    demo_run = tracking.RunHandle.create(
        uri, cfg.experiment, "demo", {**provenance_tags({"data": described, "workdir": str(work)}),
                                      "rsdiff.stage": "demo"}
    )  # fmt: skip
    demo_run.log_params(tracking.config_params(cfg))
    with tracking.ends_run(demo_run):
        demo = Demo(cfg, work, uri, demo_run.run_id, inputs, labels)
        chain, seconds = Chain(), {}
        for name, stage in STAGES:
            log.info("demo: --- %s ---", name)
            t0 = time.perf_counter()
            stage(demo, chain)
            seconds[name] = time.perf_counter() - t0
        return _summarise(demo, chain, seconds, described, demo_run)


def _summarise(
    demo: Demo, chain: Chain, stages: dict[str, float], described: str, demo_run: Any
) -> DemoResult:
    """Log the demo run's params, metrics, quicklook and ``demo.json`` (also written to ``workdir``)
    and finish it."""
    run_ids, test_ids, work, cfg, uri = chain.run_ids, chain.test_ids, demo.work, demo.cfg, demo.uri
    pre, sweep, pred, ev = chain.pretrain, chain.sweep, chain.predict, chain.evaluate
    winner = f"{winner_line(sweep.best)}: val mIoU {sweep.best['best_val_miou']:.3f}"
    worst = worst_class(ev.metrics["iou"])
    note = (
        f"**Winner**: {winner}. **Test mIoU {ev.metrics['miou']:.3f}** on {len(test_ids)} held-out scene(s)"
    )
    note += f"; {worst}." if worst else "."
    demo_run.set_tags({**{f"rsdiff.run.{k}": v for k, v in run_ids.items()}, "mlflow.note.content": note})
    demo_run.log_params(
        {
            "data_description": described,
            "checkpoint": pre.checkpoint,
            "best_head": sweep.best_head,
            "best.timesteps": ",".join(str(t) for t in sweep.best["timesteps"]),  # as the sweep's runs
            "best.blocks": ",".join(str(b) for b in sweep.best["blocks"]),
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
            "best_val_miou": sweep.best["best_val_miou"],  # the name the sweep's runs use
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
        winner,
    )
