"""DDPM pretraining on Ray Train: config, validation, and the ``TorchTrainer`` launch.

Everything that can be checked on the driver is checked before a worker starts: the shards URI
and its manifest, band count against the model config, sizes, the checkpoint store (and that every
node the ranks may run on can reach it) and the MLflow store. A rank no node type can hold, or ranks
the cluster does not place within ``scaling.placement_timeout_s``, end the run with one message
(:mod:`rsdiff.train.placement`).

Re-running with the same ``run.name`` and ``run.storage`` resumes from the latest checkpoint
(Ray Train restores its checkpoint manager from storage) and keeps logging into the same MLflow run.

``init.from=...`` starts a new run from existing weights (an ADM ``.pt``, a diffusers folder or an
rsdiff checkpoint, :mod:`rsdiff.diffusion.sources`): the model's architecture is then the source's,
the weights are band-adapted to the shards, and the optimizer starts fresh. Resuming a run always
continues from its own latest checkpoint; ``init`` applies only to a run's first start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from rsdiff import storage
from rsdiff.config import check_ranges, redact, require, to_container
from rsdiff.data.manifest import Manifest, read_manifest
from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.sources import SourceWeights, check_diffusion, load_source
from rsdiff.diffusion.unet import attention_levels, unet_kwargs
from rsdiff.errors import ConfigError, DataError
from rsdiff.lease import Lease, LeaseLost
from rsdiff.provenance import provenance_tags
from rsdiff.train.config import (
    SAMPLE_SHARDS,
    PretrainConfig,
    ScalingCfg,
    StepHook,
    TrainPlan,
)
from rsdiff.train.memory import estimate_training_memory
from rsdiff.train.names import SNAPSHOT
from rsdiff.train.shuffle import ShardIndex

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a finished pretraining run left behind."""

    checkpoint: str  # URI of the latest checkpoint folder
    step: int
    metrics: dict[str, Any]
    mlflow_run_id: str
    tracking_uri: str


def read_init(cfg: PretrainConfig) -> SourceWeights | None:
    """Read ``init.from`` on the driver (before any worker starts, so a bad file fails here) and
    make the run's model config the source's architecture (keeping ``model.image_size``)."""
    if not cfg.init.from_:
        return None
    source = load_source(str(cfg.init.from_), cfg.init)
    cfg.model = dataclasses.replace(source.model, in_channels=None, image_size=cfg.model.image_size)
    check_diffusion(source, cfg.diffusion, "this run")
    log.info(
        "init: %s weights from %s (sha256 %s…); the model's architecture is theirs (%d levels x %s channels, "
        "%d res blocks), model.* settings other than image_size are not used",
        source.kind.value, storage.display(source.uri), source.sha256[:12], len(source.model.channel_mult),
        source.model.base_channels, source.model.num_res_blocks,
    )  # fmt: skip
    return source


def validate(cfg: PretrainConfig, source: SourceWeights | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Check the data against the config before workers start (after :func:`check_numbers`, the
    run name and :func:`read_init`); return the manifest and data facts."""
    if not str(cfg.data.shards).strip():
        raise ConfigError("data.shards is empty: give the ingest output folder or s3:// prefix")
    made = storage.exists(storage.join(SAMPLE_SHARDS, "manifest.json"))
    if str(cfg.data.shards) == SAMPLE_SHARDS and not made:
        raise DataError(
            f"no shards at {SAMPLE_SHARDS} (the default data.shards): make the built-in sample first with "
            "`python jobs/make_sample.py`, or set data.shards to an ingest output folder or s3:// prefix"
        )
    manifest = read_manifest(str(cfg.data.shards))
    shards = [u for split in cfg.data.splits for u in manifest.shard_uris(split)]
    if not shards:
        raise DataError(
            f"{storage.display(cfg.data.shards)} has no shards for splits {list(cfg.data.splits)} "
            f"(manifest lists {sorted(manifest.shards)})"
        )
    if not storage.exists(shards[0]):
        raise DataError(f"shard {storage.display(shards[0])} listed in the manifest is missing")
    bands = manifest.num_bands
    rule = None
    if source is not None:  # resolved here, by name where both sides have names; workers apply it
        rule = source.band_rule(list(manifest.bands), cfg.init)
        cfg.init.band_map = [str(r) for r in rule]
    if cfg.model.in_channels is not None and cfg.model.in_channels != bands:
        raise ConfigError(
            f"model.in_channels={cfg.model.in_channels} but the shards at "
            f"{storage.display(cfg.data.shards)} have {bands} band(s) {manifest.bands}; "
            f"set model.in_channels={bands} or null"
        )
    size = cfg.model.image_size or manifest.tile_size
    if size > manifest.tile_size:
        raise ConfigError(f"model.image_size={size} exceeds the shards' tile size {manifest.tile_size}")
    try:
        unet_kwargs(cfg.model, bands, size)
    except ValueError as exc:
        raise ConfigError(f"model config: {exc}") from exc
    cfg.model.attention_levels = attention_levels(cfg.model, size)  # a fact the checkpoints carry
    if source is not None:
        source.check_fits(cfg.model, size)
    levels = list(cfg.perf.checkpoint_levels)
    if any(not 0 <= level < len(cfg.model.channel_mult) for level in levels):
        raise ConfigError(
            f"perf.checkpoint_levels={levels}: levels run from 0 (full resolution) to "
            f"{len(cfg.model.channel_mult) - 1} for model.channel_mult={list(cfg.model.channel_mult)}"
        )
    estimate = estimate_training_memory(cfg.model, bands, size, cfg.data.batch_size, levels)
    log.info(
        "model: %.1fM parameters; estimated %.1f GiB per %s rank at batch %d (weights, optimiser, EMA, "
        "activations of an eager bf16 step%s)", estimate.params / 1e6, estimate.total_gib,
        "GPU" if cfg.scaling.use_gpu else "training", cfg.data.batch_size,
        f", levels {levels} checkpointed" if levels else "",
    )  # fmt: skip
    facts = {
        "shards": shards,
        "in_channels": bands,
        "image_size": size,
        "normalization": Normalizer.from_stats(manifest.band_stats, cfg.data.norm_scale).to_json(),
        "num_params": estimate.params,
        "init": source.provenance(rule) if source is not None else None,
    }
    return manifest, facts


def check_numbers(cfg: PretrainConfig) -> None:
    """Every numeric setting within its valid range (declared with the config fields), on the driver
    before any work (a bad value otherwise fails inside the workers after all restarts, or silently
    ruins the weights)."""
    check_ranges(cfg)
    o = cfg.optim
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={list(o.betas)} must hold two numbers (e.g. [0.9, 0.999])")
    require("optim.warmup_steps", o.warmup_steps, ge=0, le=o.max_steps)


def scaling_config(scaling: ScalingCfg) -> Any:
    """Ray Train's ``ScalingConfig``: one rank per worker with ``cpus_per_worker`` CPUs and, on GPU
    clusters, one GPU of ``accelerator_type`` (any GPU when null)."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        accelerator_type=scaling.accelerator_type if scaling.use_gpu else None,
    )


def run_pretrain(cfg: PretrainConfig, *, after_step: StepHook | None = None) -> PretrainResult:
    """Train (or resume) the DDPM described by ``cfg`` on Ray Train; returns the final checkpoint.

    The run folder ``{run.storage}/{run.name}`` is leased for the whole run (:mod:`rsdiff.lease`):
    a second live job with the same name is refused instead of mixing checkpoints and MLflow logs.

    ``after_step(step, rank, plan)`` runs on every rank after each optimiser step (see
    :class:`~rsdiff.train.config.TrainPlan`); it must pickle. The fault tests use it.
    """
    storage.check_name(cfg.run.name, "run.name")
    check_numbers(cfg)
    source = read_init(cfg)
    manifest, facts = validate(cfg, source)
    del source  # workers read it again; the driver need not hold the weights during training
    folder = storage.join(storage.absolute(str(cfg.run.storage)), str(cfg.run.name))
    reach_checked_storage(cfg)
    storage.check_writable(folder)  # the very folder Ray Train writes checkpoints into
    with Lease(folder, f"run.name={cfg.run.name} in {storage.display(str(cfg.run.storage))}") as lease:
        return _fit(cfg, manifest, facts, after_step, lease)


def reach_checked_storage(cfg: PretrainConfig) -> None:
    """Join the cluster and check that every node the ranks may run on can reach ``run.storage``
    (:func:`~rsdiff.train.placement.check_storage_reach`), before anything is written there."""
    from rsdiff.raytools import connect
    from rsdiff.train.placement import check_storage_reach

    connect(cfg.ray.address, cfg.ray.num_cpus)
    request = dict(scaling_config(cfg.scaling)._resources_per_worker_not_none)
    check_storage_reach(str(cfg.run.storage), cfg.run.shared_storage, request, cfg.scaling.num_workers)


def perf_params(cfg: PretrainConfig) -> dict[str, str]:
    """The speed paths as they apply: on CPU workers bf16 autocast and channels_last are off
    whatever the config says (they act on CUDA only), so the run says so rather than ``True``."""
    out = {"device": "cuda" if cfg.scaling.use_gpu else "cpu"}
    if not cfg.scaling.use_gpu:
        for key in ("bf16", "channels_last"):
            out[f"perf.{key}"] = "off (CPU run; CUDA only)" if getattr(cfg.perf, key) else "False"
    return out


def _fit(
    cfg: PretrainConfig, manifest: Manifest, facts: dict[str, Any], after_step: StepHook | None, lease: Lease
) -> PretrainResult:
    """Open (or rejoin) the run's MLflow run, train with Ray Train under the placement watch, the
    Ctrl-C switch and the lease (losing it stops the run: :class:`~rsdiff.lease.LeaseLost`), and tag
    the run with the last checkpoint."""
    from rsdiff import tracking
    from rsdiff.diffusion.checkpoint import read_meta
    from rsdiff.raytools import rank_error
    from rsdiff.train.placement import PlacementWatch, keeping_sigint_handler, kill_switch

    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_dir = storage.join(storage.absolute(str(cfg.run.storage)), str(cfg.run.name))
    handle = _open_run(cfg, manifest, facts, uri, run_dir)
    plan = TrainPlan(
        model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim, data=cfg.data, perf=cfg.perf,
        tracking=cfg.tracking, checkpoint=cfg.checkpoint, seed=cfg.seed,
        run_dir=run_dir,  # absolute: workers run in other folders
        shards=facts["shards"], in_channels=facts["in_channels"], image_size=facts["image_size"],
        normalizer=Normalizer.from_json(facts["normalization"]), meta=_checkpoint_meta(cfg, manifest, facts),
        run_id=handle.run_id, tracking_uri=uri, after_step=after_step,
        init=cfg.init if cfg.init.from_ else None, lease_uri=lease.uri, lease_owner=lease.owner,
        shard_index=ShardIndex.of(manifest),
    )  # fmt: skip
    trainer, request = _trainer(cfg, plan)
    starts = len(handle.client.get_metric_history(handle.run_id, "started_at_step"))
    watch = PlacementWatch(
        request,
        cfg.scaling.num_workers,
        cfg.scaling.placement_timeout_s,
        started=lambda: len(handle.client.get_metric_history(handle.run_id, "started_at_step")) > starts,
        stop=kill_switch(trainer),
    )
    lease.on_lost = watch.stop
    with tracking.ends_run(handle), keeping_sigint_handler():  # Ray Train installs its own for fit()
        try:
            with watch:
                result = trainer.fit()
            lease.check()
        except BaseException as exc:
            if watch.failure is not None:
                raise watch.failure from None
            with contextlib.suppress(Exception):
                lease.check()  # a rank refused to write because another job took the lease
            if lease.lost:
                raise LeaseLost(lease.lost_message()) from None
            if (err := rank_error(exc)) is not None:  # e.g. too many damaged shards: one line
                raise err from None
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: say where a re-run resumes
                exc.kept = resume_point(run_dir)
            raise
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        ckpt_uri = (
            f"s3://{result.checkpoint.path}"
            if storage.is_s3(str(cfg.run.storage))
            else str(result.checkpoint.path)
        )
        step = int(read_meta(ckpt_uri)["step"])
        handle.set_tags({"rsdiff.checkpoint": ckpt_uri})
    handle.finish("FINISHED")
    return PretrainResult(ckpt_uri, step, dict(result.metrics or {}), handle.run_id, uri)


def _open_run(cfg: PretrainConfig, manifest: Manifest, facts: dict[str, Any], uri: str, run_dir: str) -> Any:
    """The MLflow run of ``run.storage/run.name``: found again when resuming (it joins its new
    parent and command), else created with the config, model size, bands and init provenance."""
    from rsdiff import tracking

    run_key = f"{storage.display(storage.join(str(cfg.run.storage), str(cfg.run.name)))}"
    data = {"shards": storage.absolute(str(cfg.data.shards)), "init": cfg.init.from_, "run": run_dir}
    data_tags = {**provenance_tags(data), **tracking.parent_tags(cfg.tracking.parent_run_id)}
    handle, resumed = tracking.RunHandle.find_or_create(
        uri,
        cfg.tracking.experiment,
        str(cfg.run.name),
        tags={**data_tags, "rsdiff.stage": "pretrain", "rsdiff.run": run_key},
        match_tag="rsdiff.run",
    )
    if resumed:
        handle.set_tags(data_tags)  # a resumed run joins its new parent (a re-run demo) and command
        return handle
    params = tracking.config_params(cfg)
    if not cfg.init.from_:  # nothing imported: no init.* settings that played no part
        params = {k: v for k, v in params.items() if not k.startswith("init.")}
    handle.log_params({**params, **perf_params(cfg)})
    tracking.log_input(handle, storage.absolute(str(cfg.data.shards)), "manifest.json", "shards", "training")
    handle.log_params(
        {"model.num_params": str(facts["num_params"]), "data.bands": json.dumps(manifest.bands)}
    )
    if facts["init"]:
        handle.set_tags({f"rsdiff.init.{k}": json.dumps(v) if isinstance(v, list) else str(v)
                         for k, v in facts["init"].items()})  # fmt: skip
    return handle


def _checkpoint_meta(cfg: PretrainConfig, manifest: Manifest, facts: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint's ``meta.json`` records besides its step: the (redacted) config, the
    model's input, the bands' normalisation, the shards and where the initial weights came from."""
    plain = to_container(cfg)
    return {
        "config": redact(plain),
        "model": plain["model"],
        "diffusion": plain["diffusion"],
        "in_channels": facts["in_channels"],
        "image_size": facts["image_size"],
        "normalization": facts["normalization"],
        "bands": manifest.bands,
        "dtype": manifest.dtype,
        "tile_size": manifest.tile_size,
        "classes": manifest.classes,
        "shards": storage.absolute(str(cfg.data.shards)),
        "init": facts["init"],
    }


def _trainer(cfg: PretrainConfig, plan: TrainPlan) -> tuple[Any, dict[str, float]]:
    """``(trainer, request)``: the TorchTrainer (:func:`~rsdiff.train.trainer.stream_trainer`)
    running :func:`_train_loop` with ``plan``, and the resources one rank asks for (what the
    placement watch looks for)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from rsdiff.console import train_logging_config
    from rsdiff.raytools import storage_for_ray
    from rsdiff.train.trainer import stream_trainer

    scaling = scaling_config(cfg.scaling)
    storage_path, filesystem = storage_for_ray(str(cfg.run.storage))
    trainer = stream_trainer(
        train_loop_per_worker=_train_loop,
        train_loop_config={"plan": plan},
        scaling_config=scaling,
        run_config=RunConfig(
            name=str(cfg.run.name),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            logging_config=train_logging_config(),
        ),
    )
    return trainer, dict(scaling._resources_per_worker_not_none)  # per rank, as Ray Train asks for it


def resume_point(folder: str) -> str:
    """Where a re-run of the run in ``folder`` resumes, in words: the last checkpoint Ray Train
    registered (a folder it never registered, cut off by a stop, is not resumed from)."""
    latest = None
    with contextlib.suppress(Exception):  # no snapshot yet, or one this reader does not know
        latest = json.loads(storage.read_text(storage.join(folder, SNAPSHOT)))["latest_checkpoint_result"]
    if not latest:
        return f"no checkpoint was complete yet in {storage.display(folder)}; a re-run starts from step 0"
    step = (latest.get("metrics") or {}).get("step", "?")
    name = latest["checkpoint_dir_name"]
    return (
        f"the last complete checkpoint is {storage.display(storage.join(folder, name))} (step {step}); "
        "re-run the command to resume from it"
    )


def _train_loop(config: dict[str, Any]) -> None:
    from rsdiff.console import quiet_train_rank
    from rsdiff.train.loop import train_loop_per_worker

    quiet_train_rank()
    train_loop_per_worker(config["plan"])
