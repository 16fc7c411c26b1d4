"""Feature extraction with Ray Data: labeled tiles -> frozen-UNet features at sampled pixels.

``shards -> flat_map(read tiles) -> map_batches(FeatureActor, ActorPoolStrategy(size=k))``: each actor holds
one frozen UNet (one GPU each on a cluster), normalises a batch of tiles, samples labeled pixels
per image (stratified by class, capped), reads the superset of timesteps x blocks at those
pixels, and writes one fp16 part per batch straight to storage. The driver only collects part
summaries and writes ``table.json`` last. The reader streams each shard one tile at a time and
waits while ``read_ahead_mb`` of tiles are in flight, so memory is bounded by that budget and the
batch size, never by the number of images or the size of a shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rsdiff import storage
from rsdiff.config import check_ranges, redact, to_container
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.data.manifest import read_manifest
from rsdiff.data.shards import iter_shard
from rsdiff.errors import CheckpointError, ConfigError, DataError
from rsdiff.features.config import ExtractConfig
from rsdiff.features.parts import write_part
from rsdiff.features.table import FORMAT_VERSION, KIND, TABLE_META, FeatureTable
from rsdiff.raytools import user_error

log = logging.getLogger(__name__)


def sample_pixels(
    label: np.ndarray, num_classes: int, cap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Labeled pixels of one ``(H, W)`` label tile, at most ``cap`` per class, as sorted (rows, cols)."""
    flat = label.ravel()
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(flat == c)
        if len(idx) > cap:
            idx = rng.choice(idx, cap, replace=False)
        chosen.append(idx)
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return (picked // label.shape[1]).astype(np.int32), (picked % label.shape[1]).astype(np.int32)


def _image_rng(key: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def tile_draw(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by a tile's key and ``seed`` (which tiles a cap keeps)."""
    digest = hashlib.sha256(f"tiles:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def keep_fraction(max_images: int | None, tiles: int) -> float:
    """Share of a split's ``tiles`` to keep so that about ``max_images`` remain (1.0: all)."""
    if not max_images or tiles <= max_images:
        return 1.0
    return max_images / tiles


@dataclass(frozen=True)
class ActorPlan:
    """What every feature actor is told (resolved and checked on the driver)."""

    checkpoint: str
    checkpoint_sha256: str  # of the weights the driver loaded: every actor must load the same
    timesteps: list[int]
    blocks: list[str]  # resolved block names
    output: str  # absolute table folder
    num_classes: int
    pixels_per_class: int
    noise_seed: int
    sample_seed: int
    num_gpus: float
    precision: str


class FeatureActor:
    """A Ray Data callable class: one frozen UNet per actor; a batch of tiles in, part summaries out."""

    def __init__(self, plan: ActorPlan) -> None:
        from rsdiff.devices import pick_device
        from rsdiff.diffusion.checkpoint import load_pretrained
        from rsdiff.features.extractor import FeatureExtractor

        device = pick_device(plan.num_gpus)
        self.ddpm = load_pretrained(
            plan.checkpoint,
            device=device,
            expect_sha256=plan.checkpoint_sha256,
            expected_by="this extraction",
        )
        self.extractor = FeatureExtractor(
            self.ddpm, plan.timesteps, plan.blocks, plan.noise_seed, plan.precision
        )
        self.plan = plan
        self.num_classes = plan.num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, list] = {
            "part": [],
            "split": [],
            "rows": [],
            "images": [],
            "class_rows": [],
            "skipped": [],
        }
        for split in sorted(set(batch["split"].tolist())):
            sel = np.flatnonzero(batch["split"] == split)
            keys = [str(k) for k in batch["key"][sel]]
            rows, cols, keep = [], [], []
            for i, key in zip(sel, keys):
                r, c = sample_pixels(
                    batch["label"][i],
                    self.num_classes,
                    self.plan.pixels_per_class,
                    _image_rng(key, self.plan.sample_seed),
                )
                if len(r):
                    rows.append(r)
                    cols.append(c)
                    keep.append(i)
            skipped = len(sel) - len(keep)
            if not keep:
                out["part"].append("")
                out["split"].append(split)
                out["rows"].append(0)
                out["images"].append(0)
                out["class_rows"].append([0] * self.num_classes)
                out["skipped"].append(skipped)
                continue
            images = np.stack([self.ddpm.normalizer(batch["image"][i]) for i in keep])
            feats = self.extractor.sample(
                torch.from_numpy(images),
                [torch.from_numpy(r) for r in rows],
                [torch.from_numpy(c) for c in cols],
            )
            labels = [batch["label"][i][r, c] for i, r, c in zip(keep, rows, cols)]
            info = write_part(
                self.plan.output,
                split,
                {
                    "features": torch.cat(feats).half().cpu().numpy(),
                    "labels": np.concatenate(labels).astype(np.uint8),
                    "image": np.concatenate(
                        [np.full(len(r), str(batch["key"][i])) for i, r in zip(keep, rows)]
                    ),
                    "rows": np.concatenate(rows),
                    "cols": np.concatenate(cols),
                },
                self.num_classes,
            )
            out["part"].append(info.name)
            out["split"].append(split)
            out["rows"].append(info.rows)
            out["images"].append(info.images)
            out["class_rows"].append(info.class_rows)
            out["skipped"].append(skipped)
        return {
            k: np.asarray(v) if k != "class_rows" else np.asarray(v, dtype=np.int64) for k, v in out.items()
        }


def read_labeled_tiles(
    shard: str, split: str, bands: int, size: int, share: float, seed: int, report: Callable[[str, str], None]
) -> Iterator[dict[str, Any]]:
    """The labeled tiles of one shard as Ray Data rows (``key``, ``split``, ``(bands, size, size)``
    ``image``, ``(size, size)`` ``label``), **streamed**: one decoded sample at a time, so a reader
    holds what Ray Data has not yet cut into a block, never the whole shard (shards are up to
    ``shard_max_mb``; Ray Data's blocks up to its ``target_max_block_size``).

    Only tiles whose :func:`tile_draw` is below ``share`` are kept (every tile at 1.0), so a
    ``max_images`` cap samples every scene alike instead of taking the first shards' scenes whole.
    A malformed sample (wrong array shape, undecodable) is skipped, and an unreadable shard ends
    with the samples read before the damage; both go to ``report(kind, why)`` (``bad_samples``,
    ``bad_shards``) with the shard named, never silently lost.
    """
    read = 0
    try:
        for s in iter_shard(shard):
            if s.label is None or (share < 1.0 and tile_draw(s.key, seed) >= share):
                continue
            image, label = np.asarray(s.image), np.asarray(s.label)
            if image.ndim != 3 or image.shape != (bands, size, size) or label.shape != (size, size):
                report("bad_samples", f"sample {s.key} has tile {image.shape} and label {label.shape}, "
                       f"expected ({bands}, {size}, {size}) and ({size}, {size})")  # fmt: skip
                continue
            read += 1
            yield {"key": s.key, "split": split, "image": image, "label": label}
    except Exception as exc:  # truncated or corrupt tar, undecodable sample, flaky store
        report("bad_shards", f"unreadable after {read} samples ({type(exc).__name__}: {str(exc)[:120]})")


@dataclass(frozen=True)
class _CountBad:
    """``report(kind, why)`` for :func:`read_labeled_tiles`: counts on the job's
    :class:`~rsdiff.progress.ProgressCounter`, notes the reason and logs it with the shard named."""

    counter: Any
    shard: str

    def __call__(self, kind: str, why: str) -> None:
        self.counter.add(**{kind: 1})
        self.counter.note(kind, f"{storage.display(self.shard)}: {why}")
        log.warning(
            "extract: skipping %s of %s: %s", kind.replace("_", " ")[:-1], storage.display(self.shard), why
        )


def _read_tiles(
    item: dict[str, Any], counter: Any, bands: int, size: int, keep: dict[str, float], seed: int
) -> Iterator[dict[str, Any]]:
    """Ray Data's ``flat_map`` over ``{"shard", "split"}`` items: :func:`read_labeled_tiles`."""
    shard, split = item["shard"], item["split"]
    yield from read_labeled_tiles(shard, split, bands, size, keep[split], seed, _CountBad(counter, shard))


def actor_resources(cluster_cpus: float, concurrency: int) -> tuple[float, float]:
    """CPUs per feature actor and per shard-reading task.

    One CPU each when the cluster has room for every actor plus a reader; on a smaller cluster
    (a 1-vCPU machine) fractions, so the actors never hold every CPU while the reads that feed
    them wait forever. An empty cluster (autoscaling from zero) keeps whole CPUs so nodes launch.
    """
    if cluster_cpus <= 0 or cluster_cpus >= concurrency + 1:
        return 1.0, 1.0
    return cluster_cpus / (2 * concurrency), cluster_cpus / 2


def actor_plan(
    cfg: ExtractConfig, checkpoint: str, ddpm: Any, extractor: Any, num_classes: int, out: str
) -> ActorPlan:
    """What every feature actor of ``cfg`` is told: the ``checkpoint`` the driver loaded as ``ddpm``
    (its weights' digest), ``extractor``'s resolved timesteps and blocks, the table folder ``out``."""
    return ActorPlan(
        checkpoint=checkpoint, checkpoint_sha256=ddpm.weights_sha256, timesteps=extractor.timesteps,
        blocks=extractor.blocks, output=out, num_classes=num_classes,
        pixels_per_class=int(cfg.pixels_per_class), noise_seed=int(cfg.noise_seed),
        sample_seed=int(cfg.sample_seed), num_gpus=float(cfg.num_gpus), precision=str(cfg.precision),
    )  # fmt: skip


def run_extract(cfg: ExtractConfig) -> FeatureTable:
    """Extract the configured features into a table at ``cfg.output``; returns it opened.

    Raises:
        RsdiffError: missing/invalid checkpoint, unlabeled shards, band mismatch, unknown block,
            timestep out of range, no labeled pixel, existing output without ``overwrite``.
    """
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.progress import ProgressCounter
    from rsdiff.raytools import connect

    check_ranges(cfg)
    out = storage.absolute(str(cfg.output))
    exists = storage.exists(storage.join(out, TABLE_META))
    if exists and not cfg.overwrite:
        raise DataError(f"{storage.display(out)} already holds a feature table; pass overwrite=true")
    checkpoint = _checkpoint(cfg, out)
    ddpm = load_pretrained(checkpoint, device="meta")  # the structure: the actors load the weights
    extractor = FeatureExtractor(
        ddpm, list(cfg.timesteps), list(cfg.blocks) or _decoder_blocks(ddpm), cfg.noise_seed, cfg.precision,
        numbering=cfg.block_numbering,
    )  # fmt: skip
    shards, manifest, splits = _labeled_input(cfg, ddpm.meta)
    if exists:
        storage.delete(storage.join(out, TABLE_META))
        for old in storage.list_uris(storage.join(out, "parts")):
            storage.delete(old)
    storage.check_writable(out)

    connect(cfg.ray.address, cfg.ray.num_cpus)
    plan = actor_plan(cfg, checkpoint, ddpm, extractor, len(manifest.classes or []), out)
    counter = ProgressCounter.open()
    try:
        summaries = _collect(
            _feature_dataset(cfg, manifest, splits, plan, counter), _expected_images(cfg, manifest, splits)
        )
        counts, notes = counter.get(), counter.notes()
    except Exception as exc:
        if (err := user_error(exc)) is not None:
            raise err from None
        raise
    finally:
        counter.close()
    origin = {
        "checkpoint": storage.absolute(checkpoint),
        "checkpoint_sha256": ddpm.weights_sha256,  # heads fitted on the table check the model with it
        "source": ddpm.meta.get("init"),  # where the weights came from, when imported or initialised
        "shards": storage.absolute(shards),
    }
    meta = _table_meta(cfg, origin, summaries, counts, notes, extractor, manifest)
    if not meta["parts"]:
        raise DataError(f"no image in {storage.display(shards)} splits {splits} has a labeled pixel")
    storage.write_text(storage.join(out, TABLE_META), json.dumps(meta, indent=1))
    table = FeatureTable.open(out)
    log.info(
        "extract: %s rows of %d channels at %s (%s)",
        {s: table.rows(s) for s in splits},
        extractor.dim,
        storage.display(out),
        ", ".join(f"{s}: {sum(p['images'] for p in table.parts(s))} images" for s in splits),
    )
    return table


def _labeled_input(cfg: ExtractConfig, ddpm_meta: dict[str, Any]) -> tuple[str, Any, list[str]]:
    """``(shards, manifest, splits)``: the labeled shards to read (``cfg.shards``, else those the
    checkpoint was trained on) and their splits that ``cfg.splits`` names, checked against the
    model and the config's numbers.

    Raises:
        ConfigError: no shards given or recorded.
        DataError: unlabeled shards, a band mismatch, none of the splits, no labeled pixel.
    """
    shards = str(cfg.shards or ddpm_meta.get("shards") or "")
    if not shards:
        raise ConfigError("shards is not set and the checkpoint does not record its shards")
    manifest = read_manifest(shards)
    if not manifest.labeled:
        raise DataError(
            f"the shards at {storage.display(shards)} carry no labels; ingest labeled tiles "
            "(labels.mask_template) and pass them as shards=..."
        )
    if manifest.num_bands != int(ddpm_meta["in_channels"]):
        raise DataError(
            f"shards have {manifest.num_bands} band(s) {manifest.bands} but the checkpoint's model takes "
            f"{ddpm_meta['in_channels']} {ddpm_meta['bands']}"
        )
    splits = [s for s in cfg.splits if manifest.shard_uris(s)]
    if not splits:
        raise DataError(
            f"shards have no split among {list(cfg.splits)} (they have {sorted(manifest.shards)})"
        )
    if sum(manifest.class_pixels or []) == 0:
        raise DataError(f"the labels at {storage.display(shards)} have no labeled pixel (all ignore/unknown)")
    return shards, manifest, splits


def _feature_dataset(
    cfg: ExtractConfig, manifest: Any, splits: list[str], plan: ActorPlan, counter: Any
) -> Any:
    """The Ray Data pipeline: every split's shards read into tiles (at most ``max_images`` per
    split), then a pool of :class:`FeatureActor` writing table parts; one summary row per part."""
    import ray

    from rsdiff.console import quiet_ray_data

    quiet_ray_data()
    actor_cpus, read_cpus = actor_resources(ray.cluster_resources().get("CPU", 0), int(cfg.concurrency))
    keep = {split: keep_fraction(cfg.max_images, int(manifest.samples.get(split, 0))) for split in splits}
    read = functools.partial(
        _read_tiles, counter=counter, bands=manifest.num_bands, size=int(manifest.tile_size), keep=keep,
        seed=int(cfg.sample_seed),
    )  # fmt: skip
    datasets = []
    for split in splits:
        ds = ray.data.from_items([{"shard": u, "split": split} for u in manifest.shard_uris(split)]).flat_map(
            read, num_cpus=read_cpus
        )
        datasets.append(ds.limit(cfg.max_images) if cfg.max_images else ds)
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return bound_read_ahead(ds, int(cfg.read_ahead_mb)).map_batches(
        FeatureActor,
        fn_constructor_kwargs={"plan": plan},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=int(cfg.concurrency)),
        num_cpus=actor_cpus,
        num_gpus=cfg.num_gpus or None,
    )


def bound_read_ahead(ds: Any, read_ahead_mb: int) -> Any:
    """``ds`` with at most ``read_ahead_mb`` of object-store memory in flight: Ray Data's readers
    otherwise run ahead of slower actors up to a share of the whole object store (the whole
    dataset, when it fits), so memory grew with the number of tiles. Blocks are cut at an eighth
    of the budget (at most 16 MiB) so that several fit. Sets ``ds``'s own context, not the global one."""
    from ray.data import ExecutionResources

    budget = read_ahead_mb * 2**20
    ds.context.target_max_block_size = min(16 * 2**20, budget // 8)
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(object_store_memory=budget)
    return ds


def _expected_images(cfg: ExtractConfig, manifest: Any, splits: list[str]) -> int:
    """About how many images the actors will see: each split's tiles, capped at ``max_images``."""
    tiles = [int(manifest.samples.get(split, 0)) for split in splits]
    return sum(min(n, int(cfg.max_images)) if cfg.max_images else n for n in tiles)


def _collect(ds: Any, images: int) -> list[dict[str, Any]]:
    """The actors' part summaries, streamed, under an ``extract`` bar of images done out of about
    ``images`` (Ray Data's own progress log is off: :func:`rsdiff.console.quiet_ray_data`)."""
    summaries = []
    with tqdm(total=images, desc="extract", unit="images", mininterval=1.0) as bar:
        for row in ds.iter_rows():
            summaries.append(row)
            bar.update(int(row["images"]) + int(row["skipped"]))
            bar.set_postfix(parts=len(summaries), refresh=False)
        bar.total = bar.n  # the estimate was "about": the bar ends full at what was done
        bar.refresh()
    return summaries


def _table_meta(
    cfg: ExtractConfig,
    origin: dict,
    summaries: list[dict],
    counts: dict,
    notes: dict,
    extractor: Any,
    manifest: Any,
) -> dict[str, Any]:
    """The table's ``table.json``: where the weights and shards came from (``origin``), the actors'
    part ``summaries`` and the readers' damage ``counts``/``notes`` (logged when any sample or shard
    was skipped)."""
    parts = [
        {"name": s["part"], "split": s["split"], "rows": int(s["rows"]), "images": int(s["images"]),
         "class_rows": [int(v) for v in s["class_rows"]]}
        for s in summaries
        if s["part"]
    ]  # fmt: skip
    damaged = {k: int(counts.get(k, 0)) for k in ("bad_samples", "bad_shards")}
    if any(damaged.values()):
        log.warning(
            "extract: skipped %d malformed sample(s) and %d unreadable shard(s), e.g. %s",
            damaged["bad_samples"], damaged["bad_shards"],
            "; ".join(notes.get("bad_samples", [])[:2] + notes.get("bad_shards", [])[:2]),
        )  # fmt: skip
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        **origin,
        "dim": extractor.dim,
        "timesteps": extractor.timesteps,
        "blocks": extractor.blocks,
        "channel_index": extractor.index.to_json(),
        "noise_seed": int(cfg.noise_seed),
        "pixels_per_class": int(cfg.pixels_per_class),
        "classes": manifest.classes,
        "ignore_index": IGNORE_INDEX,
        "bands": manifest.bands,
        "tile_size": manifest.tile_size,
        "parts": sorted(parts, key=lambda p: (p["split"], p["name"])),
        "skipped_images_without_labels": int(sum(int(s["skipped"]) for s in summaries)),
        "skipped_bad_samples": damaged["bad_samples"],
        "skipped_bad_shards": damaged["bad_shards"],
        "damage_examples": notes.get("bad_samples", [])[:5] + notes.get("bad_shards", [])[:5],
        "config": redact(to_container(cfg)),
    }


def _checkpoint(cfg: ExtractConfig, out: str) -> str:
    """The rsdiff checkpoint to extract with: ``cfg.checkpoint`` itself, or, for an ADM ``.pt`` or a
    diffusers folder, that model imported (band-adapted, with the shards' normalisation) as an
    inference artifact at ``{output}/model``, which the table then names as its checkpoint."""
    from rsdiff.diffusion.sources import SourceKind, detect_kind, import_model, load_source

    uri = str(cfg.checkpoint)
    try:
        kind, _ = detect_kind(uri)
    except CheckpointError:  # nothing rsdiff recognises: loading it as a checkpoint names what is missing
        return uri
    if kind is SourceKind.rsdiff:
        return uri
    if not cfg.shards:
        raise ConfigError(
            f"checkpoint={storage.display(uri)} holds {kind.value} weights, which do not record the imagery "
            "they were trained on: set shards= to the labeled ingest output"
        )
    manifest = read_manifest(str(cfg.shards))
    dest = import_model(load_source(uri, cfg.source), cfg.source, manifest, storage.join(out, "model"))
    log.info("extract: imported %s (%s) as %s", storage.display(uri), kind.value, storage.display(dest))
    return dest


def _decoder_blocks(ddpm: Any) -> list[str]:
    from rsdiff.features.blocks import list_blocks

    return [b for b in list_blocks(ddpm.model) if b.startswith("up")]
