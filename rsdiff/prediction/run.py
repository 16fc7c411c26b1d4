"""``jobs/predict.py``: a head artifact + scenes -> georeferenced class maps, on Ray.

Each scene is one Ray task (``cpus_per_scene``/``num_gpus`` each), so many scenes run in parallel
across a cluster; a task loads the head and its checkpoint once per worker process. Outputs per
scene under ``output``: ``{scene}.tif`` (class map COG), ``{scene}.proba.tif`` (optional),
``{scene}.uncertainty.tif`` (optional: entropy and, for heads with members, mutual information, in
nats; see :mod:`rsdiff.prediction.uncertainty`), ``{scene}.quicklook.png``; ``predictions.json``
lists them (paths relative to ``output``, so a copied or moved folder stays whole) and is written
last, after MLflow, so its presence marks a complete prediction run. Each run has an id, tagged
into every map it writes (``rsdiff_prediction_run``) and recorded in ``predictions.json``;
``overwrite=true`` removes the old ``predictions.json`` before any map is replaced, so an
interrupted overwrite never leaves a mix of old and new maps that looks complete.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from rsdiff import storage
from rsdiff.config import check_ranges, redact, to_container
from rsdiff.data.scenes import SceneRef, discover
from rsdiff.errors import DataError
from rsdiff.prediction.config import Measure, PredictConfig
from rsdiff.prediction.scene import SceneOutputs, UncertaintyOptions, WindowPlan
from rsdiff.prediction.summary import FORMAT_VERSION as SUMMARY_FORMAT
from rsdiff.prediction.summary import KIND as SUMMARY_KIND
from rsdiff.prediction.summary import SUMMARY, relative_record
from rsdiff.prediction.tasks import (
    TaskOptions,
    count_windows,
    load_head_and_checkpoint,
    predict_scenes,
    window_plan,
)
from rsdiff.prediction.uncertainty import check_measure, has_members

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What a prediction run produced."""

    output: str
    scenes: list[dict[str, Any]]
    mlflow_run_id: str | None
    tracking_uri: str | None


def scene_outputs(cfg: PredictConfig, out: str, ref: SceneRef, run_id: str = "") -> SceneOutputs:
    return SceneOutputs(
        class_map=storage.join(out, f"{ref.id}.tif"),
        probabilities=storage.join(out, f"{ref.id}.proba.tif") if cfg.probabilities else None,
        quicklook=storage.join(out, f"{ref.id}.quicklook.png") if cfg.quicklook else None,
        run_id=run_id,
        uncertainty=storage.join(out, f"{ref.id}.uncertainty.tif") if cfg.uncertainty else None,
    )


def uncertainty_options(head: Any, mc_samples: int, wanted: bool) -> UncertaintyOptions | None:
    """What uncertainty a head gives (mutual information where it has members), or None.

    Raises:
        ConfigError: an unusable ``mc_samples`` (see :func:`check_measure`).
    """
    check_measure(head, Measure.entropy, int(mc_samples))
    if not wanted:
        return None
    return UncertaintyOptions(has_members(head, int(mc_samples)), int(mc_samples))


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every scene of ``cfg.inputs`` with the head at ``cfg.head``.

    Raises:
        RsdiffError: missing head or checkpoint, no scenes, band/dtype mismatch, bad window,
            unwritable output, existing predictions without ``overwrite``.
    """

    import uuid

    from rsdiff import tracking

    t0 = time.perf_counter()
    check_ranges(cfg)
    head_uri = storage.absolute(str(cfg.head))
    head, ddpm = load_head_and_checkpoint(head_uri, device="meta")  # the tasks load the weights
    plan = window_plan(cfg, ddpm)
    unc = uncertainty_options(head, cfg.mc_samples, cfg.uncertainty)
    refs = discover(list(cfg.inputs))
    out = storage.absolute(str(cfg.output))
    if storage.exists(storage.join(out, SUMMARY)) and not cfg.overwrite:
        raise DataError(f"{storage.display(out)} already holds predictions ({SUMMARY}); pass overwrite=true")
    storage.check_writable(out)
    if cfg.tracking.enabled:
        tracking.client(tracking.resolve_uri(cfg.tracking.uri))  # a bad store fails before any work
    from rsdiff.prediction.scene import make_extractor

    extractor = make_extractor(ddpm, head, cfg.precision)
    windows_total = count_windows(refs, plan, head, extractor, cfg.region)  # before any work
    run_id = uuid.uuid4().hex
    # From here on the folder no longer holds a complete prediction: the old marker goes first.
    storage.delete(storage.join(out, SUMMARY))
    tags = {
        "rsdiff.stage": "predict",
        "rsdiff.head": storage.display(head_uri),
        "rsdiff.prediction_run": run_id,
    }
    data = {"head": head_uri, "checkpoint": head.checkpoint, "inputs": [r.image for r in refs], "output": out}
    run = tracking.start_stage_run(cfg.tracking, f"predict-{len(refs)}-scenes", tags, cfg, data)
    with tracking.ends_run(run):
        return _predict_all(cfg, refs, head, head_uri, plan, out, run, run_id, windows_total, t0, unc)


def _predict_all(
    cfg: PredictConfig,
    refs: list[SceneRef],
    head: Any,
    head_uri: str,
    plan: WindowPlan,
    out: str,
    run: Any,
    run_id: str,
    windows_total: int,
    t0: float,
    unc: UncertaintyOptions | None,
) -> PredictResult:
    opts = TaskOptions(
        float(cfg.num_gpus), str(cfg.precision), int(cfg.batch_size), int(cfg.quicklook_size),
        None if cfg.region is None else [int(v) for v in cfg.region], unc,
    )  # fmt: skip
    outputs = [scene_outputs(cfg, out, ref, run_id) for ref in refs]
    records = predict_scenes(head_uri, refs, plan, outputs, opts, cfg.cpus_per_scene, cfg.ray, windows_total)
    seconds = time.perf_counter() - t0
    pixels = sum(r["width"] * r["height"] for r in records)
    summary = {
        "kind": SUMMARY_KIND,
        "format": SUMMARY_FORMAT,
        "run_id": run_id,
        "head": head_uri,
        "checkpoint": head.checkpoint,
        "classes": head.classes,
        "timesteps": head.timesteps,
        "blocks": head.blocks,
        "window": plan.size,
        "overlap": plan.overlap,
        "border": plan.border,
        "uncertainty": unc.bands if unc else None,
        "scenes": [relative_record(r, out) for r in records],
        "seconds": seconds,
        "config": redact(to_container(cfg)),
    }
    ungeo = [r["scene"] for r in records if not r["georeferenced"]]
    if ungeo:
        log.warning(
            "%d scene(s) had no georeference; their maps are in pixel coordinates: %s", len(ungeo), ungeo[:5]
        )
    if run is not None:
        run.log_metrics(
            {
                "scenes": len(records),
                "pixels": pixels,
                "seconds": seconds,
                "pixels_per_second": pixels / max(seconds, 1e-9),
            },
            step=0,
        )
        run.log_dict(summary, SUMMARY)
        for r in records[: cfg.tracking.quicklooks]:
            if r["quicklook"]:
                picture = np.array(Image.open(io.BytesIO(storage.read_bytes(r["quicklook"]))))
                run.log_image(picture, f"quicklooks/{r['scene']}.png")
    storage.write_text(storage.join(out, SUMMARY), json.dumps(summary, indent=1))  # published last
    if run is not None:
        run.finish()
    log.info(
        "predict: %d scene(s), %.1f Mpx in %.1f s -> %s",
        len(records),
        pixels / 1e6,
        seconds,
        storage.display(out),
    )
    return PredictResult(out, records, run.run_id if run else None, run.uri if run else None)
