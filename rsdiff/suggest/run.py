"""``jobs/suggest.py``: which tiles of unlabeled scenes to label next, ranked, on Ray.

Each unlabeled scene is predicted like ``jobs/predict.py`` does it (one Ray task per scene,
sliding windows, blended), with per-pixel uncertainty (:mod:`rsdiff.prediction.uncertainty`),
and cut into ``tile`` px candidate tiles summarised by :class:`~rsdiff.prediction.tiles.TileScorer`.
A tile's score is the mean (or the ``quantile``) of the ``measure`` over its valid pixels:
mutual information where the head has members (the ensemble; a residual head with
``mc_samples``), else entropy. Tiles with fewer than ``min_valid`` valid pixels are not candidates.
:func:`~rsdiff.suggest.rank.rank_tiles` then takes the ``budget`` best, at least ``min_distance``
px apart within a scene and no more alike in feature space than ``max_similarity``.

Already labeled scenes are never candidates: scenes of ``inputs`` whose mask exists under the
``masks`` template, and scenes named by ``labeled`` (ingest outputs, whose manifest names their
inputs, or image files/globs).

Outputs under ``output``: ``maps/{scene}.tif`` and ``maps/{scene}.uncertainty.tif`` for every
candidate scene, ``suggestions.geojson`` (tile footprints in the scenes' CRS; one file per CRS
when they differ), ``contact_sheet.png`` and ``suggestions.json`` (the ranked list, paths relative
to ``output``), written last: its presence marks a complete run. All of it is logged to one
MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.config import check_ranges, redact, to_container
from rsdiff.data.scenes import SceneRef, discover
from rsdiff.errors import ConfigError, DataError
from rsdiff.prediction.config import Measure
from rsdiff.prediction.scene import SceneOutputs, UncertaintyOptions
from rsdiff.prediction.tiles import TileOptions
from rsdiff.prediction.uncertainty import check_measure, has_members, max_entropy
from rsdiff.suggest.config import Aggregate, SuggestConfig
from rsdiff.suggest.rank import Candidate, Pick, rank_tiles

log = logging.getLogger(__name__)

SUGGESTIONS = "suggestions.json"
KIND = "rsdiff-suggestions"
FORMAT_VERSION = 1
DESCRIPTOR_DIMS = 16


@dataclass
class SuggestResult:
    output: str
    suggestions: list[dict[str, Any]]  # ranked entries (see suggestions.json)
    excluded: list[str]  # labeled scene ids left out
    geojson: list[str]  # URIs written
    mlflow_run_id: str | None


def labeled_images(items: list[str]) -> set[str]:
    """Absolute image URIs of the scenes ``items`` names: an ingest output (its manifest's inputs)
    or image files/globs/folders.

    Raises:
        ConfigError: an ingest output without labels (pretraining shards are not labeled scenes).
        DataError: an explicit file or folder that does not exist.
    """
    from rsdiff.data.manifest import MANIFEST_NAME, read_manifest

    out: set[str] = set()
    for item in items:
        if storage.exists(storage.join(str(item), MANIFEST_NAME)):
            m = read_manifest(str(item))
            if not m.labeled:
                raise ConfigError(
                    f"labeled={storage.display(str(item))} is an ingest of unlabeled scenes (no classes "
                    "in its manifest); pass the ingest output of the labeled scenes, or their image files"
                )
            out |= {r.image for r in discover(list(m.inputs))}
        else:
            out |= {r.image for r in discover([str(item)])}
    return out


def resolve_measure(cfg: SuggestConfig, head: Any) -> Measure:
    """The configured measure, or mutual information where the head has members, else entropy."""
    if cfg.measure is not None:
        measure = Measure(cfg.measure)
    else:
        members = has_members(head, int(cfg.mc_samples))
        measure = Measure.mutual_information if members else Measure.entropy
    check_measure(head, measure, int(cfg.mc_samples))
    return measure


def _check(cfg: SuggestConfig) -> None:
    check_ranges(cfg)


def split_labeled(cfg: SuggestConfig) -> tuple[list[SceneRef], list[SceneRef]]:
    """``(candidates, labeled)`` scenes of ``cfg.inputs``.

    Raises:
        DataError: no scene is left to suggest from.
    """
    refs = discover(list(cfg.inputs), cfg.masks)
    known = labeled_images(list(cfg.labeled))
    labeled, candidates = [], []
    for ref in refs:
        has_mask = bool(ref.mask) and storage.exists(ref.mask)  # type: ignore[arg-type]
        (labeled if has_mask or ref.image in known else candidates).append(ref)
    if not candidates:
        raise DataError(
            f"all {len(refs)} scene(s) of inputs are labeled (a mask under masks={cfg.masks!r} or listed in "
            "labeled=): pass unlabeled scenes in inputs"
        )
    return [SceneRef(r.id, r.image, None) for r in candidates], labeled


def run_suggest(cfg: SuggestConfig) -> SuggestResult:
    """Rank tiles of the unlabeled scenes of ``cfg.inputs`` for labeling with the head at ``cfg.head``.

    Raises:
        RsdiffError: missing head or checkpoint, a measure the head cannot give, no unlabeled scene,
            band/dtype mismatch, bad window or budget, unwritable output, an existing run without
            ``overwrite``.
    """
    from rsdiff import tracking
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.prediction.tasks import count_windows, load_head_and_checkpoint, window_plan

    t0 = time.perf_counter()
    _check(cfg)
    head_uri = storage.absolute(str(cfg.head))
    head, ddpm = load_head_and_checkpoint(head_uri, device="meta")  # the tasks load the weights
    if head.on_pixels:
        raise ConfigError(
            f"head {storage.display(head_uri)} is a pixel head (scratch UNet): suggestions rank tiles by a "
            "feature head's uncertainty and descriptors; give a residual or ensemble head"
        )
    plan = window_plan(cfg, ddpm)
    measure = resolve_measure(cfg, head)
    candidates, labeled = split_labeled(cfg)
    out = storage.absolute(str(cfg.output))
    if storage.exists(storage.join(out, SUGGESTIONS)) and not cfg.overwrite:
        raise DataError(
            f"{storage.display(out)} already holds suggestions ({SUGGESTIONS}); pass overwrite=true"
        )
    storage.check_writable(out)
    if cfg.tracking.enabled:
        tracking.client(tracking.resolve_uri(cfg.tracking.uri))  # a bad store fails before any work
    extractor = FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed, cfg.precision)
    windows = count_windows(candidates, plan, head, extractor)
    if labeled:
        log.info("suggest: %d labeled scene(s) left out: %s", len(labeled), [r.id for r in labeled][:5])
    storage.delete(storage.join(out, SUGGESTIONS))  # the folder no longer holds a complete run
    tags = {"rsdiff.stage": "suggest", "rsdiff.head": storage.display(head_uri)}
    data = {"head": head_uri, "inputs": list(cfg.inputs), "labeled": list(cfg.labeled), "output": out}
    run = tracking.start_stage_run(cfg.tracking, f"suggest-{cfg.budget}-tiles", tags, cfg, data)
    with tracking.ends_run(run):
        return _suggest(cfg, head, head_uri, plan, measure, candidates, labeled, windows, out, run, t0)


def _suggest(
    cfg: SuggestConfig,
    head: Any,
    head_uri: str,
    plan: Any,
    measure: Measure,
    candidates: list[SceneRef],
    labeled: list[SceneRef],
    windows: int,
    out: str,
    run: Any,
    t0: float,
) -> SuggestResult:
    run_id = uuid.uuid4().hex
    records = _score_tiles(cfg, head, head_uri, plan, measure, candidates, windows, out, run_id)
    pool = [
        Candidate(
            rec["scene"],
            t.row,
            t.col,
            t.height,
            t.width,
            t.mean if Aggregate(cfg.aggregate) is Aggregate.mean else t.quantile,
            t.descriptor,
        )
        for rec in records
        for t in rec["tiles"]
        if t.valid_fraction >= cfg.min_valid
    ]
    if not pool:
        raise DataError(
            f"no candidate tile has >= {cfg.min_valid:.0%} valid pixels in the {len(candidates)} unlabeled "
            "scene(s); lower min_valid or tile"
        )
    min_distance = float(cfg.min_distance if cfg.min_distance is not None else 2 * cfg.tile)
    picks = rank_tiles(pool, int(cfg.budget), min_distance, cfg.max_similarity)
    if len(picks) < cfg.budget:
        log.warning("suggest: only %d of budget=%d tiles could be suggested", len(picks), cfg.budget)
    by_scene = {rec["scene"]: rec for rec in records}
    stats = {(rec["scene"], t.row, t.col): t for rec in records for t in rec["tiles"]}
    entries = [_entry(p, by_scene[p.candidate.scene], stats, out) for p in picks]
    collections = _write_geojson(entries, out)
    sheet = _contact_sheet(entries, by_scene, measure, head, cfg.sheet, out)
    seconds = time.perf_counter() - t0
    doc = {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "run_id": run_id,
        "head": head_uri,
        "checkpoint": head.checkpoint,
        "measure": measure.value,
        "aggregate": Aggregate(cfg.aggregate).value,
        "units": "nats",
        "max_entropy": max_entropy(head.num_classes),
        "tile": int(cfg.tile),
        "candidate_scenes": [r.id for r in candidates],
        "excluded_labeled_scenes": [r.id for r in labeled],
        "candidate_tiles": len(pool),
        "geojson": [g[len(out) + 1 :] for g in collections],
        "contact_sheet": "contact_sheet.png" if sheet is not None else None,
        "suggestions": entries,
        "seconds": seconds,
        "config": redact(to_container(cfg)),
    }
    if run is not None:
        _log_run(run, doc, collections, sheet, len(labeled))
    storage.write_text(storage.join(out, SUGGESTIONS), json.dumps(doc, indent=1))  # published last
    if run is not None:
        run.finish()
    log.info(
        "suggest: %d tile(s) from %d scene(s) -> %s", len(entries), len(candidates), storage.display(out)
    )
    return SuggestResult(out, entries, [r.id for r in labeled], collections, run.run_id if run else None)


def _score_tiles(
    cfg: SuggestConfig,
    head: Any,
    head_uri: str,
    plan: Any,
    measure: Measure,
    candidates: list[SceneRef],
    windows: int,
    out: str,
    run_id: str,
) -> list[dict[str, Any]]:
    """Predict every candidate scene with uncertainty (its map and uncertainty raster under
    ``out/maps``), summarising it per ``tile`` px tile; one record per scene with its ``tiles``."""
    from rsdiff.prediction.tasks import TaskOptions, predict_scenes

    mi = measure is Measure.mutual_information or has_members(head, int(cfg.mc_samples))
    unc = UncertaintyOptions(mi, int(cfg.mc_samples))
    opts = TaskOptions(
        float(cfg.num_gpus), str(cfg.precision), int(cfg.batch_size), 1024, None, unc,
        TileOptions(int(cfg.tile), measure, float(cfg.quantile), DESCRIPTOR_DIMS),
    )  # fmt: skip
    outputs = [
        SceneOutputs(
            class_map=storage.join(out, "maps", f"{r.id}.tif"),
            probabilities=None,
            quicklook=None,
            run_id=run_id,
            uncertainty=storage.join(out, "maps", f"{r.id}.uncertainty.tif"),
        )
        for r in candidates
    ]
    return predict_scenes(head_uri, candidates, plan, outputs, opts, cfg.cpus_per_scene, cfg.ray, windows,
                          desc="suggest")  # fmt: skip


def _log_run(run: Any, doc: dict[str, Any], collections: list[str], sheet: Any, labeled: int) -> None:
    """The suggestion counts and scores, the suggestions document, its GeoJSON and contact sheet."""
    entries = doc["suggestions"]
    scores = [e["score"] for e in entries]
    run.log_metrics(
        {"candidate_scenes": len(doc["candidate_scenes"]), "labeled_scenes_excluded": labeled,
         "candidate_tiles": doc["candidate_tiles"], "suggested": len(entries), "seconds": doc["seconds"],
         "score_first": scores[0] if scores else None, "score_last": scores[-1] if scores else None},
        step=0,
    )  # fmt: skip
    run.set_tags({"rsdiff.measure": doc["measure"]})
    run.log_dict(doc, SUGGESTIONS)
    for uri in collections:
        run.log_dict(json.loads(storage.read_text(uri)), storage.name(uri))
    if sheet is not None:
        run.log_image(sheet, "contact_sheet.png")


def _entry(p: Pick, rec: dict[str, Any], stats: dict, out: str) -> dict[str, Any]:
    c = p.candidate
    t = stats[(c.scene, c.row, c.col)]
    rel = lambda uri: uri[len(out) + 1 :] if uri.startswith(out + "/") else uri  # noqa: E731
    return {
        "rank": p.rank,
        "scene": c.scene,
        "image": storage.display(rec["image"]),
        "window": [c.row, c.col, c.height, c.width],
        "score": c.score,
        "mean": t.mean,
        "quantile": t.quantile,
        "valid_fraction": t.valid_fraction,
        "relaxed": p.relaxed,
        "crs": rec["crs"],
        "transform": rec["transform"],
        "class_map": rel(rec["class_map"]),
        "uncertainty": rel(rec["uncertainty"]),
    }


def _write_geojson(entries: list[dict[str, Any]], out: str) -> list[str]:
    from rsdiff.suggest.outputs import crs_name, feature_collections

    collections = feature_collections(entries)
    missing = sum(1 for e in entries if not e["crs"])
    if missing:
        log.warning("suggest: %d suggested tile(s) lie in scenes without georeference: no footprint", missing)
    uris = []
    for crs, fc in collections.items():
        name = "suggestions.geojson"
        if len(collections) > 1:
            code = crs_name(crs).rsplit(":", 1)[-1]
            name = f"suggestions-{code if code.isdigit() else len(uris)}.geojson"
        uri = storage.join(out, name)
        storage.write_text(uri, json.dumps(fc, indent=1))
        uris.append(uri)
    return uris


def _contact_sheet(
    entries: list[dict[str, Any]], by_scene: dict, measure: Measure, head: Any, n: int, out: str
) -> np.ndarray | None:
    """The first ``n`` suggestions as a picture (also written to ``contact_sheet.png``)."""
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    from rsdiff.data.scenes import SceneReader
    from rsdiff.viz import display_rgb, heat

    shown = entries[:n]
    if not shown:
        return None
    band = 2 if measure is Measure.mutual_information else 1
    reads = []
    for e in shown:
        rec = by_scene[e["scene"]]
        row, col, h, w = e["window"]
        with SceneReader(SceneRef(rec["scene"], rec["image"], None)) as reader:
            pixels, valid = reader.read(row, col, h, w)
            names = reader.band_names
        with storage.local_copy(storage.join(out, e["uncertainty"])) as path, rasterio.open(path) as ds:
            values = ds.read(band, window=Window(col, row, w, h))
        reads.append((display_rgb(pixels, valid, names), values, valid & np.isfinite(values), e))
    # Entropy on its full scale (0 .. log C); mutual information, which rarely nears log C, on the
    # largest value shown, so one colour means one value across the sheet.
    vmax = max_entropy(head.num_classes)
    if measure is Measure.mutual_information:
        vmax = max([float(v[m].max()) for _, v, m, _ in reads if m.any()] + [1e-6])
    cells = [
        (rgb, heat(v, m, vmax), f"#{e['rank']} {e['scene'][-24:]} {e['score']:.3f}") for rgb, v, m, e in reads
    ]
    from rsdiff.suggest.outputs import contact_sheet

    picture = contact_sheet(cells)
    with storage.atomic_local_path(storage.join(out, "contact_sheet.png")) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return picture
