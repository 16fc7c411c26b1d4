"""Ingest: GeoTIFF / JPG+mask scenes -> WebDataset tar shards + ``manifest.json``.

Scenes are split by scene into train/val/test, grouped into chunks and cut into tiles by parallel Ray
tasks; each task streams its tiles into size-capped shards and returns per-band statistics
(merged exactly on the driver), class pixel counts and drop counts. The manifest is written last,
so its presence marks a complete output.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from rsdiff import storage
from rsdiff.config import check_ranges, to_container
from rsdiff.data.bandstats import BandStats
from rsdiff.data.classmap import IGNORE_INDEX, ClassMap, MaskKind
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.labels import build_classmap
from rsdiff.data.manifest import MANIFEST_NAME, Manifest, write_manifest
from rsdiff.data.scenes import SceneReader, SceneRef, discover
from rsdiff.data.shards import Sample, ShardWriter
from rsdiff.data.tiling import tile_origins
from rsdiff.errors import ConfigError, DataError
from rsdiff.progress import ProgressCounter, wait_with_progress
from rsdiff.raytools import connect, stop_tasks, user_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingPlan:
    """How every ingest task cuts its scenes (from the ingest config)."""

    tile_size: int  # px
    stride: int | None  # px; None = tile_size
    bands: list[int] | None  # 0-based band indexes to keep; None = all
    max_nodata_fraction: float
    shard_max_bytes: int


@dataclass
class ChunkResult:
    """What one ingest task produced."""

    shards: dict[str, list[str]]
    samples: dict[str, int]
    scenes: dict[str, list[str]]
    stats: BandStats
    dropped_nodata: int
    unknown_label_pixels: int
    class_pixels: np.ndarray | None
    shard_samples: dict[str, int]  # shard file name -> tiles it holds


def _matching(refs: list[SceneRef], patterns: list[str], what: str) -> list[SceneRef]:
    """The scenes whose id or image path matches one of ``patterns`` (globs).

    Raises:
        ConfigError: a pattern that matches no scene (a typo would otherwise empty a split).
    """
    chosen = []
    for pattern in patterns:
        hit = [r for r in refs if fnmatch.fnmatchcase(r.id, pattern) or fnmatch.fnmatchcase(r.image, pattern)]
        if not hit:
            raise ConfigError(
                f"{what}: {pattern!r} matches no scene id or image path (ids look like "
                f"{[r.id for r in refs[:3]]}); fix the pattern"
            )
        chosen += hit
    return sorted(set(chosen), key=lambda r: r.id)


def split_scenes(
    refs: list[SceneRef],
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
    val_scenes: list[str] | None = None,
    test_scenes: list[str] | None = None,
) -> dict[str, list[SceneRef]]:
    """Deterministic scene-level split: ``{"train": [...], "val": [...], "test": [...]}`` (empty
    splits left out).

    ``test`` is ``test_scenes`` (globs over ids or image paths) when given, else the first
    ``ceil(test_fraction * N)`` scenes of a seeded shuffle; ``val`` likewise from what is left
    (``val_fraction`` counts all N scenes). With ``test_fraction=0`` and no lists this is the
    train/val split earlier versions made. At least one scene stays in train.

    Raises:
        ConfigError: a fraction out of range, a pattern matching nothing, a scene in both val and
            test, or no scene left for train.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{name}={f} must be in [0, 1)")
    order = sorted(refs, key=lambda r: r.id)
    random.Random(seed).shuffle(order)
    n = len(order)
    if test_scenes:
        test = _matching(refs, list(test_scenes), "test_scenes")
    else:
        test = order[: min(math.ceil(test_fraction * n), n - 1)] if test_fraction > 0 else []
    rest = [r for r in order if r not in set(test)]
    if val_scenes:
        val = _matching(refs, list(val_scenes), "val_scenes")
        both = sorted({r.id for r in val} & {r.id for r in test})
        if both:
            raise ConfigError(f"scenes {both[:5]} are in both val_scenes and the test split; keep them apart")
    else:
        n_val = min(math.ceil(val_fraction * n), len(rest) - 1) if val_fraction > 0 else 0
        val = rest[: max(0, n_val)]
    train = [r for r in rest if r not in set(val)]
    if not train:
        raise ConfigError(
            f"no scene is left for train ({len(val)} val, {len(test)} test of {n}); hold out fewer scenes"
        )
    splits = {
        "train": sorted(train, key=lambda r: r.id),
        "val": sorted(val, key=lambda r: r.id),
        "test": sorted(test, key=lambda r: r.id),
    }
    return {k: v for k, v in splits.items() if v}


def _validate(cfg: IngestConfig) -> None:
    check_ranges(cfg)
    if cfg.stride is not None and not 0 < cfg.stride <= cfg.tile_size:
        raise ConfigError(f"stride={cfg.stride} must be in (0, tile_size={cfg.tile_size}]")
    if cfg.test_scenes and cfg.test_fraction:
        raise ConfigError("give test_scenes or test_fraction, not both")
    if cfg.val_scenes and cfg.val_fraction:
        raise ConfigError("give val_scenes or val_fraction, not both")
    if cfg.bands is not None and not cfg.bands:
        raise ConfigError("bands=[] keeps no band: give 1-based band indexes, or null for all")


def _probe(ref: SceneRef, cfg: IngestConfig) -> tuple[int, str, list[str]]:
    """Band count, dtype and kept band names of the first scene: the contract every other scene
    must meet. Names come from ``band_names``, else from the scene (see ``SceneReader.band_names``)."""
    with SceneReader(ref) as reader:
        count, dtype, names = reader.bands, reader.dtype, reader.band_names
    if cfg.bands is not None and max(cfg.bands) > count:
        raise DataError(
            f"scene {storage.display(ref.image)} has {count} band(s) but bands={list(cfg.bands)} asks "
            f"for band {max(cfg.bands)}; choose bands within 1..{count}"
        )
    n = len(cfg.bands) if cfg.bands is not None else count
    if cfg.band_names is not None and len(cfg.band_names) != n:
        raise ConfigError(f"band_names has {len(cfg.band_names)} names for {n} band(s)")
    if cfg.band_names is not None:
        return count, dtype, list(cfg.band_names)
    return count, dtype, [names[b - 1] for b in cfg.bands] if cfg.bands is not None else names


def run_ingest(cfg: IngestConfig) -> Manifest:
    """Cut the configured scenes into shards at ``cfg.output`` and write the manifest.

    Raises:
        RsdiffError: bad config, no scenes, unreadable scene/mask, size mismatch, scene smaller than
            a tile, inconsistent bands, unwritable output. Nothing that looks complete is left
            behind: shards already written are deleted and no manifest is written.
    """
    _validate(cfg)
    classmap = build_classmap(cfg.labels)
    refs = discover(list(cfg.inputs), cfg.labels.mask_template)
    out = storage.absolute(str(cfg.output))
    manifest_uri = storage.join(out, MANIFEST_NAME)
    if storage.exists(manifest_uri):
        if not cfg.overwrite:
            raise DataError(
                f"{storage.display(out)} already holds an ingest output; pass overwrite=true or a new output"
            )
        storage.delete(manifest_uri)
        for old in storage.list_uris(out, ".tar"):
            storage.delete(old)
    storage.check_writable(out)
    band_count, dtype, band_names = _probe(refs[0], cfg)
    splits = split_scenes(
        refs, cfg.val_fraction, cfg.split_seed, cfg.test_fraction, list(cfg.val_scenes), list(cfg.test_scenes)
    )
    log.info("ingest: scenes per split %s", {k: len(v) for k, v in splits.items()})

    connect(cfg.ray.address, cfg.ray.num_cpus)
    n_tasks = cfg.parallelism or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    jobs: list[tuple[str, int, list[SceneRef]]] = []
    for split, scenes in splits.items():
        k = max(1, min(len(scenes), round(n_tasks * len(scenes) / len(refs))))
        jobs += [(split, i, scenes[i::k]) for i in range(k)]
    plan = TilingPlan(
        tile_size=int(cfg.tile_size),
        stride=cfg.stride,
        bands=[b - 1 for b in cfg.bands] if cfg.bands else None,
        max_nodata_fraction=float(cfg.max_nodata_fraction),
        shard_max_bytes=int(cfg.shard_max_mb * 2**20),
    )
    counter = ProgressCounter.open()
    refs_out = [
        _ingest_chunk.remote(split, i, chunk, out, plan, classmap, band_count, dtype, counter)
        for split, i, chunk in jobs
    ]
    t0 = time.perf_counter()
    try:
        results: list[ChunkResult] = wait_with_progress(
            refs_out, counter, total=len(refs), unit="scenes", desc="ingest", extra="tiles"
        )
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: stop every task now; no manifest, no shards
        stop_tasks(refs_out)  # an interrupted task deletes the shards it published
        _cleanup_after_failure(refs_out)  # and those of the tasks that had finished go too
        raise
    except Exception as exc:
        _cleanup_after_failure(refs_out)
        if (err := user_error(exc)) is not None:
            raise err from None
        raise
    finally:
        counter.close()
    try:
        manifest = _merge(results, cfg, classmap, band_count, dtype, band_names, out)
    except DataError:  # a refused dataset leaves no orphan shards behind
        _delete_shards(results)
        raise
    manifest.scene_files = {r.id: {"image": r.image, "mask": r.mask} for r in refs}
    manifest.labels = to_container(cfg.labels) if classmap is not None else None
    write_manifest(out, manifest)
    seconds = time.perf_counter() - t0
    log.info(
        "ingest: %d scenes -> %s tiles in %d shards at %s (%.1fs); dropped %s",
        len(refs),
        manifest.samples,
        sum(len(v) for v in manifest.shards.values()),
        storage.display(out),
        seconds,
        manifest.dropped,
    )
    return manifest


def _cleanup_after_failure(refs_out: list[ray.ObjectRef]) -> None:
    """Wait for every task and delete the shards of those that succeeded (a failed or interrupted
    task deleted its own)."""
    done: list[ChunkResult] = []
    for ref in refs_out:
        try:
            done.append(ray.get(ref))
        except Exception:
            continue  # a failed task already deleted its own shards
    _delete_shards(done)


def _delete_shards(results: list[ChunkResult]) -> None:
    for result in results:
        for uris in result.shards.values():
            for uri in uris:
                storage.delete(uri)


def _check_labels(class_pixels: int, unknown: int, cfg: IngestConfig) -> None:
    """Refuse labels of which no pixel matched a class; warn loudly when many did not."""
    hint = (
        f"check labels.classes and labels.kind={MaskKind(cfg.labels.kind).value}: colour masks must hold "
        "the exact class colours (JPEG compression changes them; use PNG or index masks)"
    )
    if class_pixels == 0 and unknown > 0:
        raise DataError(f"no label pixel matched a class ({unknown} matched none); {hint}")
    if class_pixels == 0:
        log.warning("every label pixel is an ignore colour/value: these shards can pretrain, not fit a head")
        return
    fraction = unknown / (class_pixels + unknown)
    if fraction > cfg.labels.warn_unknown_fraction:
        log.warning(
            "%.2f%% of the label pixels (%d) match no class and are ignored "
            "(labels.warn_unknown_fraction=%g); %s",
            100 * fraction, unknown, cfg.labels.warn_unknown_fraction, hint,
        )  # fmt: skip


def _merge(
    results: list[ChunkResult],
    cfg: IngestConfig,
    classmap: ClassMap | None,
    band_count: int,
    dtype: str,
    band_names: list[str],
    out: str,
) -> Manifest:
    stats = BandStats(len(cfg.bands) if cfg.bands is not None else band_count)
    shards: dict[str, list[str]] = {}
    samples: dict[str, int] = {}
    shard_samples: dict[str, int] = {}
    scenes: dict[str, list[str]] = {}
    dropped = {"nodata_tiles": 0, "unknown_label_pixels": 0}
    class_pixels = np.zeros(classmap.num_classes, np.int64) if classmap else None
    # The normaliser is fit on the train split alone: val and test pixels inform nothing a model
    # learns from (every split is train when none is held out).
    fit_on = [r for r in results if r.samples.get("train", 0)] or results
    for r in fit_on:
        stats.merge(r.stats)
    for r in results:
        for split in r.shards:
            shards.setdefault(split, []).extend(storage.name(u) for u in r.shards[split])
            samples[split] = samples.get(split, 0) + r.samples[split]
            scenes.setdefault(split, []).extend(r.scenes[split])
        shard_samples.update(r.shard_samples)
        dropped["nodata_tiles"] += r.dropped_nodata
        dropped["unknown_label_pixels"] += r.unknown_label_pixels
        if class_pixels is not None and r.class_pixels is not None:
            class_pixels += r.class_pixels
    if sum(samples.values()) == 0:
        raise DataError(
            f"every tile was dropped as nodata (max_nodata_fraction={cfg.max_nodata_fraction}); "
            "raise max_nodata_fraction or check the scenes' nodata value"
        )
    if stats.count.sum() == 0:
        raise DataError(
            "the kept tiles hold no valid pixel (every pixel is nodata); lower max_nodata_fraction "
            "or check the scenes' nodata value and masks"
        )
    if class_pixels is not None:
        _check_labels(int(class_pixels.sum()), dropped["unknown_label_pixels"], cfg)
    return Manifest(
        bands=band_names,
        dtype=dtype,
        tile_size=cfg.tile_size,
        stride=cfg.stride or cfg.tile_size,
        samples=samples,
        shards={k: sorted(v) for k, v in shards.items()},
        scenes={k: sorted(v) for k, v in scenes.items()},
        band_stats=stats.to_json(),
        dropped=dropped,
        classes=classmap.to_json() if classmap else None,
        ignore_index=IGNORE_INDEX,
        class_pixels=class_pixels.tolist() if class_pixels is not None else None,
        inputs=[storage.display(i) for i in cfg.inputs],
        shard_samples=dict(sorted(shard_samples.items())),
        root=out,
    )


@ray.remote(num_cpus=1)
def _ingest_chunk(
    split: str,
    index: int,
    scenes: list[SceneRef],
    out: str,
    plan: TilingPlan,
    classmap: ClassMap | None,
    band_count: int,
    dtype: str,
    counter: Any,
) -> ChunkResult:
    """Tile ``scenes`` into shards ``{split}-{index:04d}-NNNNN.tar`` (a Ray task)."""
    from rsdiff.tempfiles import remove_orphans

    remove_orphans()  # what tasks of a stopped job left on this node
    size, bands = plan.tile_size, plan.bands
    stats = BandStats(len(bands) if bands else band_count)
    class_pixels = np.zeros(classmap.num_classes, np.int64) if classmap else None
    dropped = unknown = kept = 0
    done: list[str] = []
    with ShardWriter(out, f"{split}-{index:04d}", plan.shard_max_bytes) as w:
        for ref in scenes:
            n_before = kept
            with SceneReader(ref, classmap) as reader:
                where = storage.display(ref.image)
                if (reader.bands, reader.dtype) != (band_count, dtype):
                    raise DataError(
                        f"scene {where} has {reader.bands} band(s) of {reader.dtype}, but the first scene "
                        f"has {band_count} of {dtype}; ingest scenes of one sensor together"
                    )
                if reader.height < size or reader.width < size:
                    raise DataError(
                        f"scene {where} is {reader.width}x{reader.height} px, smaller than tile_size={size}; "
                        "lower tile_size or leave the scene out"
                    )
                crs = reader.crs
                for row, col in tile_origins(reader.height, reader.width, size, plan.stride):
                    pixels, valid = reader.read(row, col, size)
                    if bands is not None:
                        pixels = pixels[bands]
                    nodata = 1.0 - float(valid.mean())
                    if nodata > plan.max_nodata_fraction:
                        dropped += 1
                        continue
                    label = None
                    if classmap is not None:
                        label, n_unknown = reader.read_labels(row, col, size)
                        label[~valid] = IGNORE_INDEX
                        unknown += n_unknown
                        assert class_pixels is not None
                        class_pixels += np.bincount(label.ravel(), minlength=256)[: classmap.num_classes]
                    stats.update(pixels[:, valid])
                    meta = {
                        "scene": ref.id,
                        "window": [row, col, size, size],
                        "crs": crs,
                        "transform": reader.window_transform(row, col, size),
                        "nodata_fraction": round(nodata, 6),
                        "source": storage.display(ref.image),
                    }
                    w.write(Sample(f"{ref.id}/{row}_{col}", pixels, label, meta))
                    kept += 1
            done.append(ref.id)
            counter.add(scenes=1, tiles=kept - n_before)
    return ChunkResult(
        shards={split: [s.uri for s in w.shards]},
        samples={split: kept},
        scenes={split: done},
        stats=stats,
        dropped_nodata=dropped,
        unknown_label_pixels=unknown,
        class_pixels=class_pixels,
        shard_samples={storage.name(s.uri): s.samples for s in w.shards},
    )
