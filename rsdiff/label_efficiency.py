"""``jobs/label_efficiency.py``: test-scene mIoU vs number of labeled scenes, rsdiff vs scratch.

For each ``k`` in ``ks`` and each of ``draws`` seeded draws of ``k`` labeled training scenes (or,
with ``unit=tiles``, ``k`` training tiles) from the feature table's ``train`` split, the same draw
for every method (draws are nested: a draw's k=1 scene is inside its k=5 set, see
:mod:`rsdiff.draws`):

- ``residual``: rsdiff's residual MLP head on the frozen DDPM features (the selected timesteps,
  blocks and head settings, by default those of the sweep's best head: chosen on val);
- ``ensemble``: DDPM-Seg's 10-member MLP ensemble on the same features;
- ``finetune``: the pretrained denoiser fine-tuned as a segmenter on the dense masks
  (:mod:`rsdiff.heads.segmenter`), ``finetune_random``: the identical network from random
  initialisation trained the same way, ``dense_decoder``: a conv decoder over the frozen
  denoiser's decoder-block maps;
- ``scratch_unet``: a UNet trained from scratch on the **dense** masks of the same tiles.

Every dense method shares one training loop (:mod:`rsdiff.heads.dense_fit`: flips/rotations,
input noise, class weighting, learning-rate schedule, best weights by val mIoU). What stops
training is counted: ``val_budget=all`` uses every val scene of the table, ``val_budget=k`` draws
``k`` val scenes per draw (nested too), and each row records its labeled scenes for training, for
selection (early stopping) and for the recipe (a sweep's ``selection`` was fit on the table's train
and val scenes). Nothing looks at the test scenes until every model is trained. Then each model
predicts the **whole test scenes** (the ingest's ``test`` split) through ``jobs/predict.py``'s
sliding-window path and is scored by ``jobs/evaluate.py`` against their masks. Output under
``output``: ``results.json`` (every run: what was drawn, its scenes, labels used, test mIoU,
per-class IoU, per-scene scores, val mIoU, parameters, seconds; the paired differences per k with
90% bootstrap intervals, :mod:`rsdiff.paired`), ``table.md`` (mean ± std test mIoU per method and
k, the labels used, the paired differences, per-class IoU), ``label_efficiency.png``, the heads
under ``heads/`` and the maps under ``predictions/``; all logged to one MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from omegaconf import MISSING

from rsdiff import storage
from rsdiff.config import bounded, build, check_ranges, redact, to_container
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.draws import draw_units
from rsdiff.errors import ConfigError, DataError
from rsdiff.features.cache import TableCacheConfig
from rsdiff.heads.config import (
    ClassWeighting,
    HeadConfig,
    HeadKind,
    Readout,
    ScratchUNetConfig,
    SegmenterConfig,
)
from rsdiff.method_names import METHOD_NAMES
from rsdiff.paired import format_paired, paired_differences
from rsdiff.ray_config import RayConfig
from rsdiff.tracking import StageTracking

log = logging.getLogger(__name__)
FEATURE_METHODS = ("residual", "ensemble")  # heads on the feature table's sampled pixels
SEGMENTER_METHODS = ("finetune", "finetune_random", "dense_decoder")  # the denoiser on dense masks
METHODS = (*FEATURE_METHODS, *SEGMENTER_METHODS, "scratch_unet")
DEFAULT_INPUT_NOISE = 0.1  # std of the training input noise, unless input_noise or a selection says
BASELINE = "scratch_unet"


class ValBudget(Enum):
    all = "all"  # every val scene of the table stops training (labels for selection: the whole val split)
    k = "k"  # k val scenes, drawn nested like the training scenes: a draw uses 2k labeled scenes


@dataclass
class DenseGrid:
    """The settings every dense method tries per draw, the same trials for each: the product of
    ``lr_scale`` (multipliers of the method's own ``lr``) and ``class_weighting`` (empty: the
    method's own). The trial with the best val mIoU on the draw's val scenes is the method's model,
    so the tuning uses only the labels the draw counts for selection."""

    lr_scale: list[float] = bounded(factory=lambda: [1.0], gt=0)
    class_weighting: list[ClassWeighting] = field(default_factory=list)

    def trials(self) -> list[dict[str, Any]]:
        """One dict per trial: ``lr_scale`` and, where the grid sets it, ``class_weighting``."""
        weightings = [ClassWeighting(w).value for w in self.class_weighting] or [None]
        return [
            {"lr_scale": float(s), **({"class_weighting": w} if w else {})}
            for s in self.lr_scale
            for w in weightings
        ]


class CountUnit(Enum):
    scenes = "scenes"  # k labeled scenes (images with a mask), all their tiles
    tiles = "tiles"  # k training tiles (tile_size px each), drawn from any scene


@dataclass
class LabelEfficiencyConfig:
    """Config of ``jobs/label_efficiency.py``."""

    features: str = MISSING  # a feature table (jobs/extract.py output) with train and val rows
    selection: str | None = None  # a head artifact (e.g. the sweep's best) whose timesteps/blocks/head to use
    timesteps: list[int] = field(default_factory=list)  # without `selection`: empty = all in the table
    blocks: list[str] = field(default_factory=list)
    unit: CountUnit = CountUnit.scenes  # what k counts
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])
    draws: int = bounded(5, ge=1)
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    val_budget: ValBudget = ValBudget.all  # which val scenes early-stop each run (counted in its labels)
    test_split: str = "test"  # the ingest split whose whole scenes are predicted and scored
    # Gaussian input noise (std) in training. null: 0.1 for every method, except a head from
    # `selection`, which keeps its own (swept) value; a number: that for every method.
    input_noise: float | None = bounded(None, ge=0)
    head: HeadConfig = field(default_factory=HeadConfig)  # residual head (overridden by `selection`'s)
    ensemble: HeadConfig = field(default_factory=lambda: HeadConfig(kind=HeadKind.ensemble))
    unet: ScratchUNetConfig = field(default_factory=lambda: ScratchUNetConfig(patience=4))
    # finetune: the pretrained denoiser fine-tuned whole; finetune_random: the identical network
    # from random initialisation, every layer at finetune.lr (nothing pretrained to preserve)
    finetune: SegmenterConfig = field(default_factory=lambda: SegmenterConfig(patience=4))
    dense_decoder: SegmenterConfig = field(
        default_factory=lambda: SegmenterConfig(readout=Readout.decoder, patience=4)
    )
    grid: DenseGrid = field(default_factory=DenseGrid)  # per-draw trials of every dense method
    # [row, col, height, width] px of every test scene to predict and score (a CPU budget); null: all
    test_region: list[int] | None = None
    window: int | None = None  # prediction windows (see jobs/predict.py); default: the tile size
    overlap: int | None = None  # default: jobs/predict.py's
    table: TableCacheConfig = field(default_factory=TableCacheConfig)  # how the draws read the table
    # 1: every method trains on this process's GPU (run the job on a GPU node) and each test scene's
    # prediction task asks Ray for a GPU; 0: the CPU
    num_gpus: int = bounded(0, ge=0, le=1)
    output: str = "runs/label_efficiency"
    tracking: StageTracking = field(
        default_factory=lambda: StageTracking(experiment="rsdiff-label-efficiency")
    )
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class LabelEfficiencyResult:
    rows: list[dict[str, Any]]  # one per (method, k, draw)
    table: str
    output: str
    mlflow_run_id: str | None


def scene_of(tile_key: str) -> str:
    """The scene id of a shard sample key ``<scene>/<row>_<col>``."""
    return tile_key.split("/", 1)[0]


def _table_images(table: Any, split: str) -> list[str]:
    """Image (tile) keys with sampled rows in ``split`` of the table."""
    keys: set[str] = set()
    for part in table.parts(split):
        keys.update(str(i) for i in np.unique(table.part(part["name"])["image"]))
    return sorted(keys)


class DenseTiles:
    """The labeled tiles of the table's train and val samples, decoded only when asked for.

    Made with one pass over the shards that records where each sample lies (its byte span; nothing
    is decoded); each :meth:`get` then reads only the asked samples' bytes (ranged reads) and
    decodes those alone, so memory and bytes read follow the drawn and val tiles of one draw, not
    the pool or the shards' size.

    Raises:
        DataError: a key of the table is in none of the shards.
    """

    def __init__(self, shards: str, keys: set[str], normalizer: Any) -> None:
        from rsdiff.data.manifest import read_manifest
        from rsdiff.data.shard_spans import shard_spans

        self.normalizer = normalizer
        self.where: dict[str, tuple[str, tuple[int, int]]] = {}
        for uri in read_manifest(shards).shard_uris():
            self.where.update((k, (uri, span)) for k, span in shard_spans(uri).items() if k in keys)
        missing = keys - self.where.keys()
        if missing:
            raise DataError(
                f"{len(missing)} labeled tile(s) of the feature table are not in its shards "
                f"{storage.display(shards)}: {sorted(missing)[:3]}"
            )

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C, H, W)`` normalised float32 tiles and ``(N, H, W)`` uint8 labels of ``keys``."""
        from rsdiff.data.shard_spans import read_spans

        by_shard: dict[str, dict[str, tuple[int, int]]] = {}
        for k in set(keys):
            uri, span = self.where[k]
            by_shard.setdefault(uri, {})[k] = span
        got: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for uri, spans in sorted(by_shard.items()):
            for s in read_spans(uri, spans):
                if s.label is None:
                    raise DataError(f"sample {s.key} of {storage.display(uri)} has no label")
                got[s.key] = (self.normalizer(s.image), np.asarray(s.label, np.uint8))
        return np.stack([got[k][0] for k in keys]), np.stack([got[k][1] for k in keys])


@dataclass
class _TestScenes:
    """The whole scenes every model is scored on, and how their masks read."""

    ids: list[str]
    images: list[str]
    labels: Any  # LabelConfig


def _test_scenes(shards: str, split: str) -> _TestScenes:
    """The ingest's ``split`` scenes with their image/mask files and label config.

    Raises:
        DataError: no such split, or a manifest from before scene files were recorded.
    """
    from rsdiff.data.labels import LabelConfig
    from rsdiff.data.manifest import read_manifest

    manifest = read_manifest(shards)
    ids = manifest.scenes.get(split, [])
    if not ids:
        raise DataError(
            f"the shards {storage.display(shards)} have no {split!r} split (they have "
            f"{sorted(manifest.scenes)}): re-ingest with test_fraction=... or test_scenes=[...] so "
            "some scenes are held out for the final score"
        )
    if not manifest.labels or any(i not in manifest.scene_files for i in ids):
        raise DataError(
            f"the manifest of {storage.display(shards)} does not record its scenes' files and label config "
            "(an older ingest); re-run jobs/ingest.py"
        )
    return _TestScenes(
        ids, [manifest.scene_files[i]["image"] for i in ids], build(LabelConfig, manifest.labels)
    )


def _check(cfg: LabelEfficiencyConfig) -> None:
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown or not cfg.methods:
        raise ConfigError(f"methods={list(cfg.methods)}: choose among {list(METHODS)}")
    check_ranges(cfg)
    if not cfg.grid.lr_scale:
        raise ConfigError("grid.lr_scale is empty: give at least one multiplier, e.g. [1.0]")
    if Readout(cfg.dense_decoder.readout) is not Readout.decoder:
        raise ConfigError("dense_decoder.readout must be decoder (finetune reads the UNet's output)")
    if ValBudget(cfg.val_budget) is ValBudget.k and CountUnit(cfg.unit) is not CountUnit.scenes:
        raise ConfigError("val_budget=k draws k val scenes: it needs unit=scenes")
    from rsdiff.devices import pick_device

    pick_device(cfg.num_gpus)  # num_gpus=1 without CUDA here: one clear error before any work


def run_label_efficiency(cfg: LabelEfficiencyConfig) -> LabelEfficiencyResult:
    """Train every (k, draw, method), predict and score the test scenes, write the report.

    Raises:
        RsdiffError: missing table/val rows/test split, k larger than the pool, bad selection.
    """
    from tqdm import tqdm

    from rsdiff.journal import Journal

    _check(cfg)
    ctx = _prepare(cfg)
    unit = CountUnit(cfg.unit)
    rows: list[dict[str, Any]] = []
    journal = Journal(ctx.out, _settings(cfg))
    if journal.entries:
        log.info("resuming: %d finished run(s) in %s", len(journal.entries), storage.display(journal.uri))
    # draw-major, so every finished draw has all its ks: paired results accumulate evenly
    jobs = [(k, d) for d in range(cfg.draws) for k in ctx.ks]
    for k, d in tqdm(jobs, desc="label-efficiency", unit="draw"):
        units = draw_units(ctx.pool, k, d, cfg.seed)
        chosen = [t for t in ctx.train_tiles if (scene_of(t) if unit is CountUnit.scenes else t) in units]
        scenes = sorted({scene_of(t) for t in chosen})
        val_scenes = ctx.val_scenes(k, d)
        for method in cfg.methods:
            name = f"{method}-k{k}-d{d}"
            row = journal.get(name, f"heads/{name}/head.json")
            if row is None:
                row = {"method": method, "k": k, "draw": d, "drawn": units, "scenes": scenes,
                       "val_scenes": val_scenes, **_labels_used(ctx, method, scenes, val_scenes),
                       **_one_run(ctx, method, k, d, chosen, val_scenes)}  # fmt: skip
                journal.add(name, row)
            rows.append(row)
        log.info(
            "k=%d draw=%d (scenes %s, val %s): test mIoU %s",
            k,
            d,
            scenes,
            val_scenes,
            {r["method"]: round(r["test_miou"], 3) for r in rows[-len(cfg.methods) :]},
        )
    return _report(cfg, ctx, rows, ctx.ks, ctx.ddpm.meta)


def _settings(cfg: LabelEfficiencyConfig) -> dict[str, Any]:
    """What decides a run's result: the config less where results go, how they are tracked, and
    which runs there are (more draws, ks or methods add runs; a run's draw does not depend on them)."""
    settings = to_container(cfg)
    for key in ("output", "tracking", "ray", "table", "draws", "ks", "methods"):
        settings.pop(key, None)
    return settings


def _labels_used(ctx: _Context, method: str, scenes: list[str], val_scenes: list[str]) -> dict[str, Any]:
    """How many labeled scenes a run of ``method`` rests on: those trained on, those that stopped
    training (selection), and those that chose its recipe (a sweep's selection head, fit on the
    table's train scenes and picked on its val scenes, sets the feature heads' timesteps, blocks and
    settings; the dense methods do not use it); ``labeled_scenes_used`` counts them once."""
    recipe = ctx.recipe_scenes if method in FEATURE_METHODS else []
    return {
        "train_scenes": len(scenes),
        "selection_scenes": len(val_scenes),
        "recipe_scenes": len(recipe),
        "labeled_scenes_used": len(set(scenes) | set(val_scenes) | set(recipe)),
    }


def _prepare(cfg: LabelEfficiencyConfig) -> _Context:
    """Open the table and the test split, resolve the selection, check k, decode the dense tiles."""
    from rsdiff import tracking
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.table import FeatureTable
    from rsdiff.heads.artifact import TrainedHead

    table = FeatureTable.open(str(cfg.features)).cached(cfg.table)
    if not table.parts("val"):
        raise DataError(f"feature table {storage.display(table.root)} has no val rows to select on")
    shards = str(table.meta["shards"])
    test = _test_scenes(shards, cfg.test_split)
    head_cfg = cfg.head
    train_tiles = _table_images(table, "train")
    val_tiles = _table_images(table, "val")
    recipe: list[str] = []
    if cfg.selection:
        sel = TrainedHead.load(str(cfg.selection))
        timesteps, blocks = sel.timesteps, sel.blocks
        head_cfg = build(HeadConfig, sel.config, {"kind": "residual"})
        recipe = sorted({scene_of(t) for t in train_tiles + val_tiles})
    else:
        timesteps = list(cfg.timesteps) or table.index.timesteps
        blocks = list(cfg.blocks) or table.index.blocks
    table.index.select(list(timesteps), list(blocks))  # validates the selection
    if cfg.tracking.enabled:
        tracking.client(tracking.resolve_uri(cfg.tracking.uri))  # a bad store fails before the work
    unit = CountUnit(cfg.unit)
    pool = sorted({scene_of(t) for t in train_tiles}) if unit is CountUnit.scenes else train_tiles
    ks = sorted({int(k) for k in cfg.ks})
    if not ks or ks[0] < 1 or ks[-1] > len(pool):
        raise ConfigError(f"ks={ks} must be in [1, {len(pool)}] (the table's labeled train {unit.value})")
    val_pool = sorted({scene_of(t) for t in val_tiles})
    if ValBudget(cfg.val_budget) is ValBudget.k and ks[-1] > len(val_pool):
        raise ConfigError(f"val_budget=k needs k <= {len(val_pool)} val scenes; ks={ks}")
    leaked = sorted({scene_of(t) for t in train_tiles + val_tiles} & set(test.ids))
    if leaked:
        raise DataError(
            f"test scenes {leaked[:5]} also have rows in the feature table; re-extract without them"
        )
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    ddpm = load_pretrained(str(table.meta["checkpoint"]), expect_sha256=table.meta.get("checkpoint_sha256"),
                           expected_by=f"feature table {storage.display(table.root)}")  # fmt: skip
    tiles = DenseTiles(shards, set(train_tiles) | set(val_tiles), ddpm.normalizer)
    return _Context(
        cfg, table, list(timesteps), list(blocks), head_cfg, test, out, tiles, ddpm,
        train_tiles, val_tiles, pool, val_pool, ks, recipe,
    )  # fmt: skip


@dataclass
class _Context:
    """What every run of a report shares."""

    cfg: LabelEfficiencyConfig
    table: Any
    timesteps: list[int]
    blocks: list[str]
    head_cfg: HeadConfig
    test: _TestScenes
    out: str
    tiles: DenseTiles  # the labeled train/val tiles, decoded per draw
    ddpm: Any  # the frozen PretrainedDDPM the table was extracted with
    train_tiles: list[str]
    val_tiles: list[str]
    pool: list[str]  # what k counts (train scenes or tiles)
    val_pool: list[str]  # val scenes
    ks: list[int]
    recipe_scenes: list[str]  # scenes whose labels chose the timesteps/blocks/head (a sweep's)
    _dense_cache: dict[tuple[str, ...], Any] = field(default_factory=dict)

    @property
    def device(self) -> Any:
        """Where every method trains (``num_gpus``)."""
        from rsdiff.devices import pick_device

        return pick_device(self.cfg.num_gpus)

    def val_scenes(self, k: int, draw: int) -> list[str]:
        """The val scenes that stop training in draw ``draw`` at ``k`` (see :class:`ValBudget`)."""
        if ValBudget(self.cfg.val_budget) is ValBudget.all:
            return list(self.val_pool)
        return draw_units(self.val_pool, k, draw, self.cfg.seed + 1)

    def dense(self, keys: list[str]) -> tuple[Any, Any]:
        """``(N, C, H, W)`` normalised tiles and ``(N, H, W)`` labels of ``keys`` as tensors (the two
        latest sets are kept: every method of a draw trains and validates on the same tiles)."""
        import torch

        key = tuple(keys)
        if key in self._dense_cache:
            return self._dense_cache[key]
        x, y = self.tiles.get(list(keys))
        pair = (torch.from_numpy(x), torch.from_numpy(y))
        self._dense_cache = {**dict(list(self._dense_cache.items())[-1:]), key: pair}
        return pair


def _one_run(
    ctx: _Context, method: str, k: int, draw: int, chosen: list[str], val_scenes: list[str]
) -> dict[str, Any]:
    """Train ``method`` on the ``chosen`` tiles (early-stopped on ``val_scenes``), predict and score
    the test scenes."""
    t0 = time.perf_counter()
    val_keys = [t for t in ctx.val_tiles if scene_of(t) in set(val_scenes)]
    if method in FEATURE_METHODS:
        head, extra = _fit_feature_head(ctx, method, draw, chosen, val_keys)
    else:
        head, extra = _fit_dense_method(ctx, method, draw, chosen, val_keys)
    train_seconds = time.perf_counter() - t0
    name = f"{method}-k{k}-d{draw}"
    head_uri = head.save(storage.join(ctx.out, "heads", name))
    scores, predict_seconds = _score_on_test(ctx, head_uri, name)
    return {
        "tiles": len(chosen),
        "test_miou": scores["miou"],
        "test_overall_accuracy": scores["overall_accuracy"],
        "test_iou": scores["iou"],
        "test_scenes": scores["scenes"],
        "params": sum(p.numel() for p in head.module.parameters()),
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "head": head_uri,
        **extra,
    }


def _fit_feature_head(
    ctx: _Context, method: str, draw: int, chosen: list[str], val_keys: list[str]
) -> tuple[Any, dict[str, Any]]:
    """A residual head or DDPM-Seg ensemble on the table's sampled pixels of ``chosen``."""
    from rsdiff.heads.fit import fit_head

    cfg = ctx.cfg
    base = ctx.head_cfg if method == "residual" else cfg.ensemble
    noise = cfg.input_noise
    if noise is None:
        noise = base.input_noise if (method == "residual" and cfg.selection) else DEFAULT_INPUT_NOISE
    hc = build(HeadConfig, base, {"input_noise": noise, "seed": cfg.seed + draw})
    head = fit_head(
        ctx.table, ctx.timesteps, ctx.blocks, hc, train_images=set(chosen), val_split="val",
        val_images=set(val_keys), memory_mb=cfg.table.memory_mb, device=ctx.device,
    )  # fmt: skip
    return head, {
        "val_miou": head.metrics.get("miou"),
        "best_epoch": head.metrics.get("best_epoch"),
        "labeled_pixels": ctx.table.count_rows("train", set(chosen)),
        "input_noise": noise,
    }


def _dense_noise(cfg: LabelEfficiencyConfig) -> float:
    """The input noise of the dense methods (the scratch UNet, the segmenters)."""
    return DEFAULT_INPUT_NOISE if cfg.input_noise is None else float(cfg.input_noise)


def _fit_dense_method(
    ctx: _Context, method: str, draw: int, chosen: list[str], val_keys: list[str]
) -> tuple[Any, dict[str, Any]]:
    """The scratch UNet or the denoiser as a segmenter, on the dense masks of ``chosen``: every
    trial of ``grid``, the best by val mIoU on ``val_keys`` kept (the first on a tie)."""
    x, y = ctx.dense(chosen)
    data = (x, y, *ctx.dense(val_keys))
    trials = [(over, *_fit_dense_trial(ctx, method, draw, over, data)) for over in ctx.cfg.grid.trials()]
    over, head, facts = max(trials, key=lambda t: t[2]["val_miou"])
    head.metrics.update({"val_miou": facts["val_miou"], "best_step": facts["best_step"]})
    return head, {
        "val_miou": facts["val_miou"],
        "best_step": facts["best_step"],
        "steps": facts["steps"],
        "trainable_params": facts["params"],
        "labeled_pixels": int((y != IGNORE_INDEX).sum()),
        "input_noise": _dense_noise(ctx.cfg),
        "grid": [{**o, "val_miou": f["val_miou"], "steps": f["steps"]} for o, _, f in trials],
        "chosen": over,
    }


def _fit_dense_trial(
    ctx: _Context, method: str, draw: int, over: dict[str, Any], data: tuple[Any, Any, Any, Any]
) -> tuple[Any, dict[str, Any]]:
    """One grid trial of a dense method: ``(head, facts)``."""
    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.heads.dense_fit import fit_dense
    from rsdiff.heads.scratch_unet import fit_scratch_unet
    from rsdiff.heads.segmenter import build_segmenter

    cfg = ctx.cfg
    classes = list(ctx.table.meta["classes"])
    checkpoint = str(ctx.table.meta["checkpoint"])
    n = ctx.table.num_classes
    base = cfg.unet if method == BASELINE else segmenter_config(cfg, method, draw)
    trial = {k: v for k, v in over.items() if k != "lr_scale"} | {"lr": base.lr * over["lr_scale"]}
    if method == BASELINE:
        ucfg = build(ScratchUNetConfig, base, {"seed": cfg.seed + draw}, trial)
        model, facts = fit_scratch_unet(*data, n, ucfg, _dense_noise(cfg), device=ctx.device)
        head = TrainedHead.from_pixel_unet(model.cpu(), ucfg, int(data[0].shape[1]), classes, checkpoint)
        return head, facts
    scfg = build(SegmenterConfig, base, trial)
    net = build_segmenter(ctx.ddpm.model, n, scfg).to(ctx.device)
    groups = net.param_groups(scfg.lr, scfg.backbone_lr_scale)
    facts = fit_dense(net, groups, data, n, scfg, _dense_noise(cfg))
    return TrainedHead.from_segmenter(net.cpu(), scfg, classes, checkpoint), facts


def segmenter_config(cfg: LabelEfficiencyConfig, method: str, draw: int) -> SegmenterConfig:
    """The segmenter settings of ``method``: ``finetune`` and ``dense_decoder`` as configured;
    ``finetune_random`` is ``finetune`` from random initialisation with every layer at its ``lr``."""
    seed = {"seed": cfg.seed + draw}
    if method == "finetune":
        return build(SegmenterConfig, cfg.finetune, {"readout": "output", "pretrained": True}, seed)
    if method == "finetune_random":
        over = {"readout": "output", "pretrained": False, "backbone_lr_scale": 1.0}
        return build(SegmenterConfig, cfg.finetune, over, seed)
    if method == "dense_decoder":
        return build(SegmenterConfig, cfg.dense_decoder, {"pretrained": True}, seed)
    raise ValueError(f"not a segmenter method: {method}")


def _score_on_test(ctx: _Context, head_uri: str, name: str) -> tuple[dict[str, Any], float]:
    """Predict the test scenes with the head at ``head_uri`` and evaluate them: ``(metrics, seconds)``."""
    from rsdiff.evaluate import EvaluateConfig, run_evaluate
    from rsdiff.prediction.config import PredictConfig
    from rsdiff.prediction.run import run_predict

    cfg = ctx.cfg
    t0 = time.perf_counter()
    pred = run_predict(
        build(
            PredictConfig,
            {
                "head": head_uri,
                "inputs": ctx.test.images,
                "output": storage.join(ctx.out, "predictions", name),
                "overwrite": True,
                "quicklook": False,
                "window": cfg.window,
                "overlap": cfg.overlap,
                "region": cfg.test_region,
                "num_gpus": cfg.num_gpus,
                "tracking": {"enabled": False},
                "ray": cfg.ray,
            },
        )
    )
    ev = run_evaluate(
        build(
            EvaluateConfig,
            {
                "predictions": pred.output,
                "labels": ctx.test.labels,
                "tracking": {"enabled": False},
                "error_figures": 0,
            },
        )
    )
    metrics = {**ev.metrics, "scenes": manifest_scene_ids(ev.metrics["scenes"], pred.scenes, ctx.test)}
    return metrics, time.perf_counter() - t0


def manifest_scene_ids(
    per_scene: dict[str, Any], records: list[dict[str, Any]], test: _TestScenes
) -> dict[str, Any]:
    """``per_scene`` (keyed by prediction's scene ids, made from file names) keyed by the manifest's
    ids instead (made from paths under the ingest root, e.g. ``tile_1-images-a`` for nested
    folders), matched through each record's image URI."""
    by_image = {storage.absolute(image): i for image, i in zip(test.images, test.ids, strict=True)}
    ids = {r["scene"]: by_image.get(storage.absolute(r["image"]), r["scene"]) for r in records}
    return {ids.get(scene, scene): value for scene, value in per_scene.items()}


def format_table(rows: list[dict[str, Any]], ks: list[int], methods: list[str], unit: str) -> str:
    """Markdown: mean ± std test mIoU (one row per method, one column per k), the labeled scenes
    each used (training / selection / recipe), the paired differences, then per-class IoU."""
    lines = ["| test mIoU | " + " | ".join(f"k={k} {unit}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in methods:
        cells = []
        for k in ks:
            v = [r["test_miou"] for r in rows if r["method"] == m and r["k"] == k]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| labeled scenes used: training / selection / recipe (in all) | "
              + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]  # fmt: skip
    for m in methods:
        cells = []
        for k in ks:
            r = next((r for r in rows if r["method"] == m and r["k"] == k and "train_scenes" in r), None)
            cells.append("-" if r is None else f"{r['train_scenes']} / {r['selection_scenes']} / "
                         f"{r['recipe_scenes']} ({r['labeled_scenes_used']})")  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    entries = paired_entries(rows, methods)
    if entries:
        lines += ["", format_paired(entries, unit)]
    classes = list(rows[0]["test_iou"]) if rows else []
    lines += [
        "",
        "| test IoU per class (mean over draws) | k | " + " | ".join(classes) + " |",
        "|---|---|" + "---|" * len(classes),
    ]
    for m in methods:
        for k in ks:
            sel = [r for r in rows if r["method"] == m and r["k"] == k]
            if sel:
                cells = [_fmt(np.nanmean([_num(r["test_iou"][c]) for r in sel])) for c in classes]
                lines.append(f"| {m} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_entries(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """The comparisons a report makes, per k over the same draws: every method against the scratch
    UNet, and the fine-tuned denoiser against the same network from random initialisation."""
    pairs = [(m, BASELINE) for m in methods if m != BASELINE and BASELINE in methods]
    if "finetune" in methods and "finetune_random" in methods:
        pairs.append(("finetune", "finetune_random"))
    return [e for m, b in pairs for e in paired_differences(rows, m, b)]


def describe_paired(entries: list[dict[str, Any]], unit: str, timesteps: list[int], blocks: list[str],
                    test_scenes: int) -> str:  # fmt: skip
    """The run's description (MLflow's ``mlflow.note.content``): each comparison per k as the mean
    paired difference in test mIoU points with its interval and wins, and the features used."""
    lines = [f"Features: timesteps {json.dumps(timesteps)}, blocks {json.dumps(blocks)} (chosen on val); "
             f"scored on {test_scenes} held-out test scene(s)."]  # fmt: skip
    for e in entries:
        level = round(100 * e["level"])
        lines.append(
            f"- **{e['method']} minus {e['baseline']}**, k={e['k']} {unit}: "
            f"{100 * e['mean']:+.1f} mIoU points "
            f"({level}% interval [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]; ahead on {e['wins']} of "
            f"{len(e['draws'])} draws)"
        )
    return "\n".join(lines)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.3f}"


def _plot(rows: list[dict[str, Any]], ks: list[int], methods: list[str], unit: str) -> Any:
    """Two panels: test mIoU against k per method (mean ± std over draws), and each method's paired
    difference from the scratch UNet with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = len({r["draw"] for r in rows})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        v = [[r["test_miou"] for r in rows if r["method"] == m and r["k"] == k] for k in ks]
        mean, std = np.array([np.mean(x) for x in v]), np.array([np.std(x) for x in v])
        ax.plot(ks, mean, marker="o", label=METHOD_NAMES.get(m, m))
        ax.fill_between(ks, mean - std, mean + std, alpha=0.15)
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xticks(ks, [str(k) for k in ks])
        a.minorticks_off()
        a.set_xlabel(f"labeled training {unit} (k)")
        a.grid(alpha=0.3)
    n = f"{draws} draw" + ("s" if draws != 1 else "")
    ax.set_ylabel(f"test mIoU (mean ± std over {n})")
    ax.set_title("Test mIoU by label budget")
    ax.legend(fontsize=7)
    for i, m in enumerate(m for m in methods if m != BASELINE):
        es = paired_differences(rows, m, BASELINE) if BASELINE in methods else []
        if not es:
            continue
        x = np.array([e["k"] for e in es]) * (1 + 0.04 * (i - 1))
        mean = np.array([100 * e["mean"] for e in es])
        err = np.array(
            [[100 * (e["mean"] - e["low"]) for e in es], [100 * (e["high"] - e["mean"]) for e in es]]
        )
        bx.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=METHOD_NAMES.get(m, m))
    bx.axhline(0, color="k", lw=0.8)
    bx.set_ylabel("paired difference from scratch UNet (mIoU points)")
    bx.set_title(f"Paired by draw ({n}), 90% bootstrap interval")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _report(
    cfg: LabelEfficiencyConfig,
    ctx: _Context,
    rows: list[dict[str, Any]],
    ks: list[int],
    ddpm_meta: dict[str, Any],
) -> LabelEfficiencyResult:
    """Write table.md and the plot, log everything to MLflow, then results.json (last: complete)."""
    from rsdiff import tracking

    unit = CountUnit(cfg.unit).value
    methods = list(cfg.methods)
    table_md = format_table(rows, ks, methods, unit)
    pre = ddpm_meta.get("config", {}) or {}
    per_step = int(pre.get("data", {}).get("batch_size", 0)) * int(
        pre.get("scaling", {}).get("num_workers", 1)
    )
    results = {
        "features": ctx.table.root,
        "checkpoint": ctx.table.meta["checkpoint"],
        "pretraining": {
            "step": ddpm_meta.get("step"),
            "images_seen": (ddpm_meta.get("step") or 0) * per_step,
        },
        "timesteps": list(ctx.timesteps),
        "blocks": list(ctx.blocks),
        "unit": unit,
        "test_scenes": ctx.test.ids,
        "test_region": None if cfg.test_region is None else list(cfg.test_region),
        "validation_tiles": len(ctx.val_tiles),
        "val_budget": ValBudget(cfg.val_budget).value,
        "runs": rows,
        "paired": paired_entries(rows, methods),
        "table": table_md,
        "config": redact(to_container(cfg)),
    }
    out = ctx.out
    storage.write_text(storage.join(out, "table.md"), table_md + "\n")
    fig = _plot(rows, ks, methods, unit)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(storage.join(out, "label_efficiency.png"), buf.getvalue())
    run = tracking.start_stage_run(
        cfg.tracking,
        f"label-efficiency-{unit}-k{'-'.join(map(str, ks))}",
        {"rsdiff.stage": "label-efficiency"},
        cfg,
        {"features": storage.absolute(str(cfg.features)), "selection": cfg.selection, "output": out},
    )
    with tracking.ends_run(run):
        if run is not None:
            tracking.log_input(run, ctx.table.root, "table.json", "features", "training")
            run.log_params(
                {
                    "selection.timesteps": json.dumps(list(ctx.timesteps)),
                    "selection.blocks": json.dumps(list(ctx.blocks)),
                    "test_scenes": json.dumps(ctx.test.ids),
                }
            )
            note = describe_paired(
                results["paired"], unit, results["timesteps"], results["blocks"], len(ctx.test.ids)
            )
            run.set_tags({"mlflow.note.content": note})
            for m in methods:
                for k in ks:
                    v = [r["test_miou"] for r in rows if r["method"] == m and r["k"] == k]
                    run.log_metrics(
                        {f"test_miou_{m}_mean": float(np.mean(v)), f"test_miou_{m}_std": float(np.std(v))},
                        step=k,
                    )
            run.log_figure(fig, "label_efficiency.png")
            run.log_dict(results, "results.json")
            run.client.log_text(run.run_id, table_md + "\n", "table.md")
        # results.json marks a complete report: written last, after MLflow has everything
        storage.write_text(storage.join(out, "results.json"), json.dumps(results, indent=1))
    import matplotlib.pyplot as plt

    plt.close(fig)
    if run is not None:
        run.finish()
    return LabelEfficiencyResult(rows, table_md, out, run.run_id if run else None)
