"""``jobs/evaluate.py``: predicted class maps vs label masks -> confusion matrix, IoU, OA, F1.

Reads a prediction run's ``predictions.json`` (which scene each map came from), finds each
scene's label mask through ``labels.mask_template`` and compares them block by block (memory
bounded by ``block_rows`` x width). Label classes default to the head's classes (their colours
for colour masks, their values for index masks); given explicitly they are matched to the
head's classes by name. Pixels that are nodata in the prediction or unlabeled in the mask are
left out. Every map must carry the prediction run id that ``predictions.json`` records (an
interrupted ``overwrite`` could otherwise leave a mix of two runs), and outputs are resolved
relative to the folder read (a copied folder scores its own maps). The MLflow run is opened before
the work and ``metrics.json`` is written last (atomically), after MLflow has everything, so a
failed job never leaves a complete-looking result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import MISSING

from rsdiff import storage
from rsdiff.config import bounded, redact, to_container
from rsdiff.data import remote
from rsdiff.data.classmap import IGNORE_INDEX, ClassMap, MaskKind, UnknownPolicy, parse_colour
from rsdiff.data.labels import LabelConfig, build_classmap
from rsdiff.data.scenes import SceneReader, SceneRef, mask_uri
from rsdiff.errors import ConfigError, DataError
from rsdiff.metrics import ConfusionMatrix, worst_class
from rsdiff.prediction.summary import read_summary, resolve_output
from rsdiff.tracking import StageTracking

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Config of ``jobs/evaluate.py``."""

    predictions: str = MISSING  # a jobs/predict.py output (holds predictions.json)
    labels: LabelConfig = field(
        default_factory=lambda: LabelConfig(mask_template="{dir}/../masks/{stem}.png")
    )
    output: str | None = None  # metrics JSON; default {predictions}/metrics.json
    block_rows: int = 512
    # Errors figures (image | truth | prediction | errors) of the first N scenes, written under
    # errors/ beside the metrics JSON and logged to the run; 0: none.
    error_figures: int = bounded(8, ge=0)
    tracking: StageTracking = field(default_factory=lambda: StageTracking(experiment="rsdiff-evaluate"))


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    output: str
    mlflow_run_id: str | None
    tracking_uri: str | None


def _label_classmap(cfg: EvaluateConfig, head_classes: list[dict[str, Any]]) -> tuple[ClassMap, np.ndarray]:
    """The mask's class map and a lookup ``mask id -> head id`` (IGNORE_INDEX where absent)."""
    if cfg.labels.classes:
        cm = build_classmap(cfg.labels)
        assert cm is not None
    else:
        kind = MaskKind(cfg.labels.kind)
        cm = ClassMap(
            names=tuple(c["name"] for c in head_classes),
            colours=tuple(parse_colour(c["colour"]) for c in head_classes),
            values=tuple(int(c.get("value", c["id"])) for c in head_classes),
            kind=kind,
            ignore_colours=tuple(parse_colour(c) for c in cfg.labels.ignore_colours),
            ignore_values=tuple(int(v) for v in cfg.labels.ignore_values),
            unknown=UnknownPolicy(cfg.labels.unknown),
        )
    names = [c["name"] for c in head_classes]
    missing = [n for n in cm.names if n not in names]
    if missing:
        raise ConfigError(
            f"label classes {missing} are not classes of the head ({names}); fix labels.classes"
        )
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for i, n in enumerate(cm.names):
        lut[i] = names.index(n)
    return cm, lut


def evaluate_scene(
    record: dict[str, Any],
    classmap: ClassMap,
    lut: np.ndarray,
    template: str,
    num_classes: int,
    block_rows: int,
    run_id: str | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of one predicted scene against its mask (streamed in row blocks).

    ``record["class_map"]`` is the map's URI; with ``run_id`` the map must carry that prediction
    run id in its tags (else :class:`DataError`).
    """
    import rasterio
    from rasterio.windows import Window

    ref = SceneRef(
        record["scene"], record["image"], record.get("mask") or mask_uri(record["image"], template)
    )
    cm = ConfusionMatrix(num_classes)
    with warnings.catch_warnings():  # maps of JPG/PNG scenes carry no georeference, as expected
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with (
            SceneReader(ref, classmap, region=record.get("region")) as reader,
            contextlib.ExitStack() as stack,
        ):
            pred = remote.open_dataset(record["class_map"], stack)
            if run_id is not None and pred.tags().get("rsdiff_prediction_run") != run_id:
                raise DataError(
                    f"map {storage.display(record['class_map'])} was not written by the prediction run its "
                    "predictions.json names (a mix of two runs, e.g. an interrupted overwrite); re-run "
                    "jobs/predict.py with overwrite=true"
                )
            if (pred.width, pred.height) != (reader.width, reader.height):
                raise DataError(
                    f"prediction {storage.display(record['class_map'])} is {pred.width}x{pred.height} px but "
                    f"mask {storage.display(ref.mask or '')} is {reader.width}x{reader.height} px"
                )
            for r in range(0, reader.height, block_rows):
                h = min(block_rows, reader.height - r)
                where = f"rows {r}..{r + h}"
                p = remote.retrying_read(
                    lambda r=r, h=h: pred.read(1, window=Window(0, r, reader.width, h)),
                    record["class_map"],
                    where,
                )
                labels = _read_label_rows(reader, r, h)
                cm.update(p, lut[labels])
    return cm


def _error_figures(
    cfg: EvaluateConfig,
    records: list[dict[str, Any]],
    classmap: ClassMap,
    lut: np.ndarray,
    summary: dict[str, Any],
    out: str,
    run: Any,
) -> list[str]:
    """Write (and log to ``run``) the errors figure of each of ``records``; their names, relative to
    the folder of ``out``."""
    from rsdiff.diffusion.checkpoint import read_meta
    from rsdiff.error_figure import error_figure, error_panels, write_png

    if not records:
        return []
    try:
        bands = list(read_meta(str(summary["checkpoint"])).get("bands", []))
    except Exception:  # the checkpoint moved: show the first three bands
        bands = []
    written = []
    for record in records:
        ref = SceneRef(
            record["scene"],
            record["image"],
            record.get("mask") or mask_uri(record["image"], cfg.labels.mask_template),
        )
        panels = error_panels(
            ref, record["class_map"], classmap, lut, summary["classes"], bands, record.get("region")
        )
        picture = error_figure(panels, record["scene"], summary["classes"])
        name = f"errors/{record['scene']}.png"
        write_png(picture, storage.join(storage.parent(out), name))
        if run is not None:
            run.log_image(picture, name)
        written.append(name)
    return written


def _read_label_rows(reader: SceneReader, row: int, rows: int) -> np.ndarray:
    """``(rows, width)`` class ids of the mask."""
    ids, _ = reader.read_labels(row, 0, rows, reader.width)
    return ids


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate a prediction run against label masks.

    Raises:
        RsdiffError: no predictions.json, missing masks, size mismatch, class names not in the head.
    """
    from rsdiff import tracking

    pred_root = storage.absolute(str(cfg.predictions))
    summary = read_summary(pred_root)
    if not cfg.labels.mask_template:
        raise ConfigError("labels.mask_template is not set: say where each scene's label mask is")
    if cfg.block_rows < 16:
        raise ConfigError("block_rows must be >= 16")
    classes = summary["classes"]
    names = [c["name"] for c in classes]
    classmap, lut = _label_classmap(cfg, classes)
    run_id = summary.get("run_id")  # None: written by an rsdiff before run ids
    records = []
    for record in summary["scenes"]:
        records.append({**record, "class_map": resolve_output(pred_root, str(record["class_map"]))})
    tags = {"rsdiff.stage": "evaluate", "rsdiff.head": storage.display(summary["head"])}
    data = {"predictions": pred_root, "masks": cfg.labels.mask_template, "checkpoint": summary["checkpoint"]}
    run = tracking.start_stage_run(cfg.tracking, f"evaluate-{len(records)}-scenes", tags, cfg, data)
    with tracking.ends_run(run):
        total = ConfusionMatrix(len(classes))
        per_scene = {}
        for record in records:
            cm = evaluate_scene(
                record, classmap, lut, cfg.labels.mask_template, len(classes), cfg.block_rows, run_id
            )
            total.merge(cm)
            per_scene[record["scene"]] = {
                "miou": cm.miou(),
                "overall_accuracy": cm.overall_accuracy(),
                "pixels": int(cm.matrix.sum()),
            }
        if total.matrix.sum() == 0:
            raise DataError(
                "no pixel is both predicted and labeled: check labels.mask_template and the classes"
            )
        metrics = {
            **total.summary(names),
            "confusion_matrix": total.matrix.tolist(),
            "classes": names,
            "scenes": per_scene,
            "predictions": pred_root,
            "prediction_run": run_id,
            "head": summary["head"],
            "checkpoint": summary["checkpoint"],
            "config": redact(to_container(cfg)),
        }
        out = storage.absolute(str(cfg.output)) if cfg.output else storage.join(pred_root, "metrics.json")
        metrics["error_figures"] = _error_figures(
            cfg, records[: cfg.error_figures], classmap, lut, summary, out, run
        )
        if run is not None:
            _log_run(run, metrics, total, names)
        storage.write_text(out, json.dumps(metrics, indent=1))  # published last
    if run is not None:
        run.finish()
    log.info(
        "evaluate: mIoU %.3f OA %.3f over %d px -> %s",
        metrics["miou"],
        metrics["overall_accuracy"],
        metrics["pixels"],
        storage.display(out),
    )
    return EvaluateResult(metrics, out, run.run_id if run else None, run.uri if run else None)


def _log_run(run: Any, metrics: dict[str, Any], total: ConfusionMatrix, names: list[str]) -> None:
    """The headline metrics, per-class and per-scene results as two tables and one chart, the
    confusion-matrix PNG and the metrics JSON/text into ``run``."""
    import matplotlib.pyplot as plt

    flat = {k: metrics[k] for k in ("miou", "overall_accuracy", "macro_f1", "pixels")}
    run.log_metrics(flat, step=0)
    run.set_tags({"mlflow.note.content": describe_scores(metrics)})
    classes, scenes = result_tables(metrics, total)
    run.client.log_table(run.run_id, classes, "per_class.json")
    run.client.log_table(run.run_id, scenes, "per_scene.json")
    for fig, name in (
        (scores_figure(classes, scenes), "scores.png"),
        (total.plot(names), "confusion_matrix.png"),
    ):
        run.log_figure(fig, name)
        plt.close(fig)
    run.log_dict(metrics, "metrics.json")
    run.client.log_text(run.run_id, format_metrics(metrics), "metrics.txt")


def result_tables(metrics: dict[str, Any], total: ConfusionMatrix) -> tuple[dict[str, list], dict[str, list]]:
    """``(per class, per scene)`` as column dicts (MLflow tables): IoU, F1, precision, recall and
    pixel counts per class; mIoU, accuracy and pixels per scene, worst first."""
    names = list(metrics["classes"])
    matrix = total.matrix
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(matrix) / matrix.sum(1)
    per_class = {
        "class": names,
        "iou": [metrics["iou"][n] for n in names],
        "f1": [metrics["f1"][n] for n in names],
        "precision": [None if np.isnan(v) else float(v) for v in total.precision()],
        "recall": [None if np.isnan(v) else float(v) for v in recall],
        "true_pixels": [int(v) for v in matrix.sum(1)],
        "predicted_pixels": [int(v) for v in matrix.sum(0)],
    }
    order = sorted(metrics["scenes"], key=lambda s: metrics["scenes"][s]["miou"])
    per_scene = {
        "scene": order,
        "miou": [metrics["scenes"][s]["miou"] for s in order],
        "overall_accuracy": [metrics["scenes"][s]["overall_accuracy"] for s in order],
        "pixels": [metrics["scenes"][s]["pixels"] for s in order],
    }
    return per_class, per_scene


def scores_figure(per_class: dict[str, list], per_scene: dict[str, list]) -> Any:
    """One chart, one shared 0-1 axis: IoU per class and mIoU per scene (worst first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [max(len(per_class["class"]), 2), max(len(per_scene["scene"]), 2)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(3 + 0.5 * sum(widths), 4), sharey=True,
                                 gridspec_kw={"width_ratios": widths})  # fmt: skip
    ax.bar(per_class["class"], [v if v is not None else 0.0 for v in per_class["iou"]], color="tab:blue")
    bx.bar(per_scene["scene"], per_scene["miou"], color="tab:orange")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title("per class (IoU)")
    bx.set_title("per scene (mIoU, worst first)")
    for a in (ax, bx):
        a.tick_params(axis="x", labelrotation=45)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def describe_scores(metrics: dict[str, Any]) -> str:
    """The evaluate run's description (MLflow's ``mlflow.note.content``): mIoU and accuracy, the
    worst class and the worst scene, and the head that made the maps."""
    scenes = metrics["scenes"]
    parts = [f"**mIoU {metrics['miou']:.3f}** (overall accuracy {metrics['overall_accuracy']:.3f}) over "
             f"{len(scenes)} scene(s), {metrics['pixels']:,} labeled px"]  # fmt: skip
    parts += [worst_class(metrics["iou"])] if worst_class(metrics["iou"]) else []
    if len(scenes) > 1:
        scene = min(scenes, key=lambda k: scenes[k]["miou"])
        parts.append(f"worst scene: {scene} (mIoU {scenes[scene]['miou']:.3f})")
    return "; ".join(parts) + f". Head: `{metrics.get('head')}`."


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table: per-class IoU and F1, then mIoU, OA and macro F1."""

    def num(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f"{'class':<16} {'IoU':>6} {'F1':>6}"]
    for n in metrics["classes"]:
        lines.append(f"{n:<16} {num(metrics['iou'][n])} {num(metrics['f1'][n])}")
    lines.append(f"{'mIoU':<16} {num(metrics['miou'])}")
    lines.append(f"{'overall acc.':<16} {num(metrics['overall_accuracy'])}")
    lines.append(f"{'macro F1':<16} {num(metrics['macro_f1'])}")
    lines.append(f"pixels: {metrics['pixels']}")
    scenes = metrics.get("scenes") or {}
    if scenes:
        width = max(16, *(len(s) for s in scenes))
        lines += ["", f"{'scene':<{width}} {'mIoU':>6} {'OA':>6} {'pixels':>10}"]
        for scene, m in sorted(
            scenes.items(), key=lambda kv: kv[1]["miou"] if kv[1]["miou"] is not None else -1
        ):
            lines.append(f"{scene:<{width}} {num(m['miou'])} {num(m['overall_accuracy'])} {m['pixels']:>10}")
    return "\n".join(lines)
