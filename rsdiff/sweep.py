"""Ray Tune sweep over timestep subsets, decoder-block subsets and head hyperparameters.

Each trial selects its channels from the extracted superset through the channel index (nothing
is recomputed), fits a head on the table's train rows and reports validation mIoU per epoch; an
ASHA scheduler stops weak trials early. MLflow gets one parent run per sweep (config, search
space, ranked summary, a plot of mIoU per timestep/block choice, the best trial's confusion
matrix) and one child run per trial (its choices as filterable params, metric curves, per-class
IoU). The best head is saved with its channel selection and checkpoint URI as one artifact.
Re-running the same ``name`` with the same ``storage`` restores an interrupted sweep, but only
when everything that decides its results (features, search space, head settings, sample count,
scheduler, seed) is unchanged: each experiment folder holds ``rsdiff-sweep.json`` with those
settings and their digest, and a mismatch is one error naming what changed (``fresh=true``
deletes the old experiment and starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from rsdiff import storage
from rsdiff.config import to_container
from rsdiff.errors import ConfigError
from rsdiff.features.table import FeatureTable
from rsdiff.heads.fit import HeadConfig, TrainedHead, fit_head
from rsdiff.ingest import RayConfig

log = logging.getLogger(__name__)

HEAD_KEYS = ("kind", "width", "depth", "lr", "dropout", "input_noise", "class_weighting")
SWEEP_SPEC = "rsdiff-sweep.json"  # in the experiment folder: the settings that decide its results
RESULT_KEYS = ("search", "head", "num_samples", "scheduler", "grace_period", "reduction_factor", "seed",
               "time_budget_s")  # fmt: skip


@dataclass
class SearchSpace:
    """Choices per dimension; a trial draws one of each. Every list must be non-empty."""

    timesteps: list[list[int]] = field(default_factory=lambda: [[50], [150], [50, 150], [50, 150, 250]])
    blocks: list[list[str]] = field(
        default_factory=lambda: [["up1.res0", "up1.res1"], ["up2.res0", "up2.res1"], ["up1.res1", "up2.res1"]]
    )
    kind: list[str] = field(default_factory=lambda: ["residual"])
    width: list[int] = field(default_factory=lambda: [64, 128])
    depth: list[int] = field(default_factory=lambda: [1, 2])
    lr: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1])
    input_noise: list[float] = field(default_factory=lambda: [0.0, 0.1])
    class_weighting: list[str] = field(default_factory=lambda: ["none", "balanced"])


class Scheduler(Enum):
    asha = "asha"  # asynchronous successive halving on val_miou
    fifo = "fifo"  # run every trial to the end


@dataclass
class SweepTracking:
    uri: str | None = None  # null = MLFLOW_TRACKING_URI or runs/mlflow.db
    experiment: str = "rsdiff-sweep"


@dataclass
class SweepConfig:
    """Config of ``jobs/sweep.py``."""

    features: str = MISSING  # feature table from jobs/extract.py
    output: str = "runs/sweeps/sweep-tiny"  # best head + summary
    name: str = "sweep-tiny"  # Tune experiment name; the same name resumes
    storage: str = "runs/tune"
    search: SearchSpace = field(default_factory=SearchSpace)
    head: HeadConfig = field(default_factory=HeadConfig)  # fixed settings; epochs = max per trial
    num_samples: int = 8
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    time_budget_s: float | None = None
    fresh: bool = False  # delete an existing experiment of this name and start over
    scheduler: Scheduler = Scheduler.asha
    grace_period: int = 2  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    seed: int = 0
    tracking: SweepTracking = field(default_factory=SweepTracking)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SweepResult:
    """The outcome of a sweep."""

    best_head: str  # URI of the best head artifact
    best: dict[str, Any]
    trials: list[dict[str, Any]]  # ranked, best first
    parent_run_id: str
    tracking_uri: str


def validate(cfg: Any, table: FeatureTable) -> None:
    """Every choice must exist in the extracted superset; nothing may be empty."""
    space = to_container(cfg.search)
    empty = [k for k, v in space.items() if not v]
    if empty:
        raise ConfigError(f"search space {empty} is empty; give at least one choice for each dimension")
    for ts in space["timesteps"]:
        for bs in space["blocks"]:
            if not ts or not bs:
                raise ConfigError("search.timesteps / search.blocks choices must be non-empty lists")
            table.index.select(ts, bs)  # raises ConfigError listing what exists
    if cfg.num_samples < 1 or cfg.max_concurrent_trials < 1 or cfg.head.epochs < 1:
        raise ConfigError("num_samples, max_concurrent_trials and head.epochs must be >= 1")
    if cfg.grace_period > cfg.head.epochs:
        raise ConfigError(f"grace_period={cfg.grace_period} exceeds head.epochs={cfg.head.epochs}")


def sweep_spec(cfg: Any, table: FeatureTable) -> dict[str, Any]:
    """The settings that decide a sweep's results, with their SHA-256 digest under ``digest``."""
    plain = to_container(cfg)
    spec: dict[str, Any] = {"features": table.root, **{k: plain[k] for k in RESULT_KEYS}}
    spec["digest"] = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return spec


def check_same_spec(experiment: str, spec: dict[str, Any]) -> None:
    """Refuse to resume the experiment at ``experiment`` with other settings than it started with.

    Raises:
        ConfigError: no spec recorded there, or a different one; the message names the changed
            settings and says to pick a new ``name`` or pass ``fresh=true``.
    """
    where = storage.display(experiment)
    fix = "pick a new name=... or pass fresh=true to delete it and start over"
    try:
        old = json.loads(storage.read_text(storage.join(experiment, SWEEP_SPEC)))
    except (storage.NotFoundError, ValueError):
        raise ConfigError(
            f"{where} holds a Ray Tune experiment without a readable {SWEEP_SPEC} (not started by this "
            f"rsdiff version); {fix}"
        ) from None
    if old.get("digest") == spec["digest"]:
        return
    changed = sorted(k for k in spec if k != "digest" and old.get(k) != spec[k])
    detail = []
    for k in changed:
        if isinstance(spec[k], dict) and isinstance(old.get(k), dict):
            keys = sorted(j for j in {*spec[k], *old[k]} if spec[k].get(j) != old[k].get(j))
            detail += [f"{k}.{j}" for j in keys]
        else:
            detail.append(k)
    raise ConfigError(f"sweep {where} was started with other settings (changed: {', '.join(detail)}); {fix}")


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: fit a head on the chosen channels, report val mIoU per epoch, log to MLflow."""
    from ray import tune

    from rsdiff.devices import pick_device
    from rsdiff.tracking import RunHandle

    table = FeatureTable.open(config["_features"])
    head_cfg = OmegaConf.merge(
        OmegaConf.structured(HeadConfig), config["_head"], {k: config[k] for k in HEAD_KEYS}
    )
    trial_id = tune.get_context().get_trial_id()
    tags = {"mlflow.parentRunId": config["_parent"], "rsdiff.stage": "sweep-trial", "rsdiff.trial": trial_id}
    run = RunHandle.create(config["_uri"], config["_experiment"], run_name=f"trial-{trial_id}", tags=tags)
    channels = table.index.select(config["timesteps"], config["blocks"])
    run.log_params(
        {
            "timesteps": json.dumps(sorted(config["timesteps"])),
            "blocks": json.dumps(config["blocks"]),
            "n_channels": str(len(channels)),
            "trial_id": trial_id,
            **{k: str(config[k]) for k in HEAD_KEYS},
        }
    )

    def on_epoch(epoch: int, m: dict[str, Any]) -> None:
        run.log_metrics({"val_miou": m["val_miou"], "train_loss": m["train_loss"],
                         "val_overall_accuracy": m["val_overall_accuracy"]}, step=epoch)  # fmt: skip
        tune.report({"val_miou": m["val_miou"], "train_loss": m["train_loss"], "epoch": epoch})

    device = pick_device(config["_gpus"])  # the GPU Tune reserved for this trial, if any
    head = fit_head(table, config["timesteps"], config["blocks"], head_cfg, on_epoch=on_epoch, device=device)
    head.save(storage.join(config["_out"], "trials", trial_id))
    run.log_metrics(
        {
            "best_val_miou": head.metrics["miou"],
            **{f"iou_{k}": v for k, v in head.metrics["iou"].items() if v is not None},
        },
        step=head.metrics["epochs_run"],
    )
    run.finish("FINISHED")


def run_sweep(cfg: Any) -> SweepResult:
    """Run (or resume) the sweep; save the best head under ``cfg.output/best``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from rsdiff import tracking
    from rsdiff.raytools import connect, storage_for_ray

    table = FeatureTable.open(str(cfg.features))
    validate(cfg, table)
    spec = sweep_spec(cfg, table)
    storage_path, filesystem = storage_for_ray(str(cfg.storage))
    experiment_path = storage.join(storage_path, str(cfg.name))
    experiment_uri = storage.join(storage.absolute(str(cfg.storage)), str(cfg.name))
    if cfg.fresh:
        storage.delete_tree(experiment_uri)
    restore = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if restore:
        check_same_spec(experiment_uri, spec)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    sweep_key = storage.display(storage.join(str(cfg.storage), str(cfg.name)))
    tags = {"rsdiff.stage": "sweep", "rsdiff.sweep": sweep_key}
    if restore:
        parent, resumed = tracking.RunHandle.find_or_create(
            uri, cfg.tracking.experiment, str(cfg.name), tags=tags, match_tag="rsdiff.sweep"
        )
    else:  # a new experiment gets a new parent run
        parent, resumed = tracking.RunHandle.create(uri, cfg.tracking.experiment, str(cfg.name), tags), False
    if not resumed:
        parent.log_params(tracking.config_params(cfg))
        parent.log_dict(to_container(cfg.search), "search_space.json")
    space = to_container(cfg.search)
    param_space: dict[str, Any] = {k: tune.choice(v) for k, v in space.items()}
    param_space.update(
        _features=table.root,
        _head=to_container(cfg.head),
        _parent=parent.run_id,
        _uri=uri,
        _experiment=cfg.tracking.experiment,
        _out=out,
        _gpus=float(cfg.gpus_per_trial),
    )
    connect(cfg.ray.address, cfg.ray.num_cpus)
    trainable = tune.with_resources(_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    # max_t one past the last epoch: ASHA stops a trial that reaches max_t at that very report,
    # before the trial could save its head; trials that run every epoch must end on their own.
    scheduler = (
        ASHAScheduler(
            max_t=cfg.head.epochs + 1, grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor
        )
        if Scheduler(cfg.scheduler) is Scheduler.asha
        else FIFOScheduler()
    )
    if restore:
        log.info("resuming sweep %s", experiment_path)
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        storage.write_text(storage.join(experiment_uri, SWEEP_SPEC), json.dumps(spec, indent=1, default=str))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_miou",
                mode="max",
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(
                    random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials
                ),
                num_samples=cfg.num_samples,
                time_budget_s=cfg.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=str(cfg.name), storage_path=storage_path, storage_filesystem=filesystem
            ),
        )
    try:
        grid = tuner.fit()
        trials = _collect(grid, out, int(cfg.head.epochs))
    except BaseException:
        parent.finish("FAILED")
        raise
    _close_children(uri, parent.run_id, trials)
    finished = [t for t in trials if t["head"]]
    if not finished:
        parent.finish("FAILED")
        raise ConfigError("no trial finished; raise time_budget_s or check the trial errors above")
    best = finished[0]
    head = TrainedHead.load(best["head"])
    best_uri = head.save(storage.join(out, "best"))
    _log_summary(parent, trials, best, head)
    _log_overlay(parent, head, table)
    storage.write_text(
        storage.join(out, "summary.json"), json.dumps({"best": best, "trials": trials}, indent=1)
    )
    parent.finish("FINISHED")
    print(format_table(trials))
    return SweepResult(best_uri, best, trials, parent.run_id, uri)


def _collect(grid: Any, out: str, max_epochs: int) -> list[dict[str, Any]]:
    """Trials ranked by their best val mIoU, best first."""
    trials = []
    for r in grid:
        if r.config is None:
            continue
        hist = r.metrics_dataframe
        best = float(hist["val_miou"].max()) if hist is not None and "val_miou" in hist else float("nan")
        epochs = int(r.metrics.get("epoch", 0)) if r.metrics else 0
        trial_id = r.metrics.get("trial_id") if r.metrics else None
        head_uri = storage.join(out, "trials", str(trial_id))
        has_head = storage.exists(storage.join(head_uri, "head.json"))
        trials.append(
            {
                "trial_id": trial_id,
                "timesteps": sorted(r.config["timesteps"]),
                "blocks": list(r.config["blocks"]),
                **{k: r.config[k] for k in HEAD_KEYS},
                "best_val_miou": best,
                "epochs": epochs,
                "stopped_early": not has_head and r.error is None and epochs < max_epochs,
                "error": str(r.error)[:200] if r.error else None,
                "head": head_uri if has_head else None,
            }
        )
    return sorted(trials, key=lambda t: -(t["best_val_miou"] if np.isfinite(t["best_val_miou"]) else -1))


def _close_children(uri: str, parent_id: str, trials: list[dict[str, Any]]) -> None:
    """Child runs of trials the scheduler stopped never finish themselves: mark them KILLED."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(parent_id)
    children = c.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    stopped = {t["trial_id"] for t in trials if t["stopped_early"]}
    for child in children:
        if child.info.status == "RUNNING":
            status = "KILLED" if child.data.tags.get("rsdiff.trial") in stopped else "FAILED"
            c.set_terminated(child.info.run_id, status=status)


def format_table(trials: list[dict[str, Any]]) -> str:
    """A ranked plain-text table of trials."""
    head = (
        f"{'rank':>4}  {'val mIoU':>8}  {'epochs':>6}  {'timesteps':<16} {'blocks':<34} "
        f"{'kind':<8} {'width':>5} {'lr':>8}"
    )
    lines = [head, "-" * len(head)]
    for i, t in enumerate(trials, 1):
        lines.append(
            f"{i:>4}  {t['best_val_miou']:>8.4f}  {t['epochs']:>6}  {json.dumps(t['timesteps']):<16} "
            f"{json.dumps(t['blocks']):<34} {t['kind']:<8} {t['width']:>5} {t['lr']:>8.1e}"
            + ("  (stopped early)" if t["stopped_early"] else "")
        )
    return "\n".join(lines)


def _log_summary(parent: Any, trials: list[dict[str, Any]], best: dict[str, Any], head: TrainedHead) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsdiff.metrics import ConfusionMatrix

    parent.log_metrics({"best_val_miou": best["best_val_miou"], "trials": len(trials)}, step=0)
    parent.log_params({f"best.{k}": json.dumps(v) if isinstance(v, list) else str(v)
                       for k, v in best.items() if k not in {"head", "error", "stopped_early"}})  # fmt: skip
    parent.set_tags({"rsdiff.best_head": best["head"] or ""})
    parent.log_dict({"trials": trials}, "summary.json")
    parent.client.log_text(parent.run_id, format_table(trials), "summary.txt")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("timesteps", "blocks")):
        groups: dict[str, float] = {}
        for t in trials:
            if np.isfinite(t["best_val_miou"]):
                label = json.dumps(t[key]).replace('"', "")
                groups[label] = max(groups.get(label, 0.0), t["best_val_miou"])
        names = sorted(groups, key=groups.get)
        ax.barh(names, [groups[n] for n in names], color="#4C72B0")
        ax.set_xlabel("best val mIoU")
        ax.set_title(f"by {key}")
    fig.tight_layout()
    parent.log_figure(fig, "miou_by_choice.png")
    plt.close(fig)
    cm = ConfusionMatrix(head.num_classes)
    cm.matrix = np.asarray(head.metrics["confusion_matrix"], np.int64)
    fig = cm.plot(head.class_names, title=f"best trial {best['trial_id']}: val mIoU {cm.miou():.3f}")
    parent.log_figure(fig, "best_confusion_matrix.png")
    plt.close(fig)


def _log_overlay(parent: Any, head: TrainedHead, table: FeatureTable) -> None:
    """Image | ground truth | best head's prediction on the first validation tile, as a PNG."""
    import torch

    from rsdiff.data.manifest import read_manifest
    from rsdiff.data.shards import iter_shard
    from rsdiff.diffusion.sampling import to_rgb
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.train.checkpoint import load_pretrained
    from rsdiff.viz import overlay, side_by_side

    manifest = read_manifest(str(table.meta["shards"]))
    shards = manifest.shard_uris("val") or manifest.shard_uris("train")
    tile = next(iter_shard(shards[0]))
    ddpm = load_pretrained(head.checkpoint)
    x = torch.from_numpy(ddpm.normalizer(tile.image))[None]
    feats = FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed).dense(x)[0]
    pred, _ = head.predict(feats.flatten(1).T)
    pred = pred.view(tile.image.shape[1:]).numpy().astype(np.uint8)
    rgb = to_rgb(x)[0]
    truth = tile.label if tile.label is not None else np.full(pred.shape, 255, np.uint8)
    picture = side_by_side([rgb, overlay(rgb, truth, head.classes), overlay(rgb, pred, head.classes)])
    scale = max(1, 256 // picture.shape[0])
    parent.log_image(np.kron(picture, np.ones((scale, scale, 1), np.uint8)), "val_overlay.png")
