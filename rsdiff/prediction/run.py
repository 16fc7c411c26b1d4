"""``jobs/predict.py``: a head artifact + scenes -> georeferenced class maps, on Ray.

Each scene is one Ray task (``cpus_per_scene``/``num_gpus`` each), so many scenes run in parallel
across a cluster; a task loads the head and its checkpoint once per worker process. Outputs per
scene under ``output``: ``{scene}.tif`` (class map COG), ``{scene}.proba.tif`` (optional),
``{scene}.quicklook.png``; ``predictions.json`` lists them (paths relative to ``output``, so a
copied or moved folder stays whole) and is written last, after MLflow, so its presence marks a
complete prediction run. Each run has an id, tagged into every map it writes
(``rsdiff_prediction_run``) and recorded in ``predictions.json``; ``overwrite=true`` removes the
old ``predictions.json`` before any map is replaced, so an interrupted overwrite never leaves a
mix of old and new maps that looks complete.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import MISSING
from PIL import Image

from rsdiff import storage
from rsdiff.config import redact, require, to_container
from rsdiff.data.scenes import SceneRef, discover
from rsdiff.errors import CheckpointError, ConfigError, DataError
from rsdiff.prediction.scene import SceneOutputs, WindowPlan
from rsdiff.prediction.summary import FORMAT_VERSION as SUMMARY_FORMAT
from rsdiff.prediction.summary import KIND as SUMMARY_KIND
from rsdiff.prediction.summary import SUMMARY, relative_record
from rsdiff.raytools import RayConfig
from rsdiff.tracking import StageTracking

log = logging.getLogger(__name__)


@dataclass
class PredictTracking(StageTracking):
    """MLflow (see :class:`StageTracking`), plus how many quicklooks to log."""

    experiment: str = "rsdiff-predict"
    quicklooks: int = 8  # quicklook PNGs logged as artifacts (the first N scenes)


@dataclass
class PredictConfig:
    """Config of ``jobs/predict.py``."""

    head: str = MISSING  # a head artifact (e.g. the sweep's {output}/best); it names its checkpoint
    inputs: list[str] = MISSING  # scenes: globs, folders, files or s3:// prefixes (GeoTIFF, JPG, PNG)
    output: str = "runs/predictions"
    window: int | None = None  # px; default: the checkpoint's training tile size
    overlap: int | None = None  # px shared by neighbouring windows; default window // 4
    batch_size: int = 4  # windows per UNet pass
    probabilities: bool = False  # also write {scene}.proba.tif (uint8, 255 = 1.0)
    quicklook: bool = True
    quicklook_size: int = 1024  # px, longest side
    overwrite: bool = False
    cpus_per_scene: float = 1.0
    num_gpus: float = 0.0  # per scene task (1 on GPU clusters)
    precision: str = "auto"  # UNet inference: auto (bf16 on CUDA where supported) | fp32 | bf16
    region: list[int] | None = None  # [row, col, height, width] px of every scene to predict; null = all
    tracking: PredictTracking = field(default_factory=PredictTracking)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class PredictResult:
    """What a prediction run produced."""

    output: str
    scenes: list[dict[str, Any]]
    mlflow_run_id: str | None
    tracking_uri: str | None


def load_head_and_checkpoint(head_uri: str, device: Any = "cpu") -> tuple[Any, Any]:
    """``(TrainedHead, PretrainedDDPM)`` of a head artifact, with a clear error if its checkpoint is gone."""
    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.train.checkpoint import load_pretrained

    head = TrainedHead.load(head_uri)
    try:
        ddpm = load_pretrained(head.checkpoint, device=device)
    except CheckpointError as exc:
        raise CheckpointError(
            f"head {storage.display(head_uri)} was fitted on features of checkpoint "
            f"{storage.display(head.checkpoint)}, which cannot be loaded: {exc}. Restore that checkpoint "
            "or fit a new head on features of an existing one"
        ) from None
    return head, ddpm


def window_plan(cfg: PredictConfig, ddpm: Any) -> WindowPlan:
    """The window geometry, validated against the UNet (size divisible by its downsampling)."""
    size = int(cfg.window or ddpm.meta["image_size"])
    factor = 2 ** (len(ddpm.meta["model"]["channel_mult"]) - 1)
    overlap = int(cfg.overlap if cfg.overlap is not None else size // 4)
    if size < factor or size % factor:
        raise ConfigError(f"window={size} must be a positive multiple of {factor} (the UNet's downsampling)")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap={overlap} must be in [0, window={size})")
    if cfg.batch_size < 1 or cfg.quicklook_size < 16:
        raise ConfigError("batch_size must be >= 1 and quicklook_size >= 16")
    require("cpus_per_scene", cfg.cpus_per_scene, gt=0)
    require("num_gpus", cfg.num_gpus, ge=0)
    return WindowPlan(size, overlap)


def scene_outputs(cfg: PredictConfig, out: str, ref: SceneRef, run_id: str = "") -> SceneOutputs:
    return SceneOutputs(
        class_map=storage.join(out, f"{ref.id}.tif"),
        probabilities=storage.join(out, f"{ref.id}.proba.tif") if cfg.probabilities else None,
        quicklook=storage.join(out, f"{ref.id}.quicklook.png") if cfg.quicklook else None,
        run_id=run_id,
    )


_CACHE: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # (head, device, precision) -> loaded


@dataclass(frozen=True)
class TaskOptions:
    """How every scene task runs (from the predict config)."""

    num_gpus: float  # per task
    precision: str  # auto | fp32 | bf16
    batch_size: int  # windows per UNet pass
    quicklook_size: int  # px, longest side
    region: list[int] | None = None  # [row, col, height, width] px of each scene; None: all of it


def _predict_task(
    head_uri: str, ref: SceneRef, plan: WindowPlan, outputs: SceneOutputs, opts: TaskOptions, counter: Any
) -> dict[str, Any]:
    """A Ray task: one scene. Raises RsdiffError subclasses unchanged (the driver reports them)."""
    from rsdiff.devices import pick_device
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.prediction.scene import predict_scene

    device = pick_device(opts.num_gpus)
    key = (head_uri, str(device), opts.precision)
    if key not in _CACHE:
        head, ddpm = load_head_and_checkpoint(head_uri, device)
        _CACHE[key] = (
            head,
            FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed, opts.precision),
        )
    head, extractor = _CACHE[key]
    record = predict_scene(
        ref,
        head,
        extractor,
        plan,
        outputs,
        opts.batch_size,
        opts.quicklook_size,
        on_windows=lambda n: counter.add.remote(windows=n),
        region=opts.region,
    )
    counter.add.remote(scenes=1)
    return record


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every scene of ``cfg.inputs`` with the head at ``cfg.head``.

    Raises:
        RsdiffError: missing head or checkpoint, no scenes, band/dtype mismatch, bad window,
            unwritable output, existing predictions without ``overwrite``.
    """

    import uuid

    from rsdiff import tracking
    from rsdiff.data.scenes import SceneReader
    from rsdiff.data.tiling import axis_origins
    from rsdiff.prediction.scene import check_scene

    t0 = time.perf_counter()
    head_uri = storage.absolute(str(cfg.head))
    head, ddpm = load_head_and_checkpoint(head_uri)
    plan = window_plan(cfg, ddpm)
    refs = discover(list(cfg.inputs))
    out = storage.absolute(str(cfg.output))
    if storage.exists(storage.join(out, SUMMARY)) and not cfg.overwrite:
        raise DataError(f"{storage.display(out)} already holds predictions ({SUMMARY}); pass overwrite=true")
    storage.check_writable(out)
    if cfg.tracking.enabled:
        tracking.client(tracking.resolve_uri(cfg.tracking.uri))  # a bad store fails before any work
    from rsdiff.features.extractor import FeatureExtractor

    extractor = FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed, cfg.precision)
    windows_total = 0
    for ref in refs:  # header checks before any work (S3 scenes: their headers only)
        with SceneReader(ref, region=cfg.region) as reader:
            check_scene(reader, head, extractor)
            windows_total += len(axis_origins(reader.height, plan.size, plan.stride)) * len(
                axis_origins(reader.width, plan.size, plan.stride)
            )
    run_id = uuid.uuid4().hex
    # From here on the folder no longer holds a complete prediction: the old marker goes first.
    storage.delete(storage.join(out, SUMMARY))
    tags = {
        "rsdiff.stage": "predict",
        "rsdiff.head": storage.display(head_uri),
        "rsdiff.prediction_run": run_id,
    }
    run = tracking.start_stage_run(cfg.tracking, f"predict-{len(refs)}-scenes", tags, cfg)
    with tracking.ends_run(run):
        return _predict_all(cfg, refs, head, head_uri, plan, out, run, run_id, windows_total, t0)


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
) -> PredictResult:
    import ray

    from rsdiff.raytools import ProgressCounter, connect, user_error, wait_with_progress

    connect(cfg.ray.address, cfg.ray.num_cpus)
    counter = ProgressCounter.remote()
    opts = TaskOptions(
        float(cfg.num_gpus), str(cfg.precision), int(cfg.batch_size), int(cfg.quicklook_size),
        None if cfg.region is None else [int(v) for v in cfg.region],
    )  # fmt: skip
    task = ray.remote(_predict_task).options(
        num_cpus=cfg.cpus_per_scene, num_gpus=cfg.num_gpus or None, max_retries=2, retry_exceptions=False
    )
    refs_out = [
        task.remote(head_uri, ref, plan, scene_outputs(cfg, out, ref, run_id), opts, counter) for ref in refs
    ]
    try:
        records = wait_with_progress(refs_out, counter, windows_total, "windows", "predict", extra="scenes")
    except BaseException as exc:  # a failed scene, Ctrl-C or SIGTERM: stop the other scenes too
        for r in refs_out:
            ray.cancel(r, force=True)
        if (err := user_error(exc)) is not None:
            raise err from None
        raise
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
