"""Ray Tune sweep over timestep subsets, decoder-block subsets and head hyperparameters.

Each trial selects its channels from the extracted superset through the channel index (nothing
is recomputed), fits a head on the table's train rows and reports validation mIoU per epoch; an
ASHA scheduler stops weak trials early. MLflow gets one parent run per sweep (config, search
space, ranked summary, a plot of mIoU per timestep/block choice, the best trial's confusion
matrix) and one child run per trial (its choices as filterable params, metric curves, per-class
IoU). The best head is saved with its channel selection and checkpoint URI as one artifact.

The trials' settings are drawn by rsdiff from ``seed`` (``draw_samples``), and every trial keeps
a JSON record of its epochs in ``{storage}/{name}/trials/``. Re-running the same ``name`` with the
same ``storage`` continues an interrupted sweep from those records: samples that finished or were
stopped early are not run again, the rest run in a new Ray Tune experiment. Ray Tune's own state
(``tuner.pkl``, pickled experiment state) is never restored, because unpickling a file from shared
storage would run whatever code it holds. A re-run only continues when everything that decides
the results (features, search space, head settings, sample count, scheduler, seed) is unchanged:
``rsdiff-sweep.json`` holds those settings and their digest, and a mismatch is one error naming
what changed (``fresh=true`` deletes the old experiment and starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from rsdiff import storage
from rsdiff.config import require, to_container
from rsdiff.errors import ConfigError
from rsdiff.features.table import FeatureTable
from rsdiff.heads.fit import HeadConfig, TrainedHead, fit_head
from rsdiff.raytools import RayConfig

log = logging.getLogger(__name__)

HEAD_KEYS = ("kind", "width", "depth", "lr", "dropout", "input_noise", "class_weighting")
SWEEP_SPEC = "rsdiff-sweep.json"  # in the experiment folder: the settings that decide its results
TRIALS = "trials"  # in the experiment folder: rsdiff's JSON record of each sample
STATUSES = ("running", "finished", "stopped_early", "error")
DONE = ("finished", "stopped_early")  # samples a re-run does not run again
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


def draw_samples(space: dict[str, list[Any]], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's ``num_samples`` trial settings, one choice per dimension each, drawn from
    ``seed`` (the same list on every run, so a re-run knows which samples are already done)."""
    rng = np.random.default_rng(seed)
    return [{k: v[int(rng.integers(len(v)))] for k, v in space.items()} for _ in range(num_samples)]


def trial_id(sample: int) -> str:
    """The stable id of sample ``sample`` (its head folder and MLflow run name use it)."""
    return f"s{sample:04d}"


def _record_uri(experiment: str, sample: int) -> str:
    return storage.join(experiment, TRIALS, f"{trial_id(sample)}.json")


def _write_record(experiment: str, record: dict[str, Any]) -> None:
    storage.write_text(
        _record_uri(experiment, record["sample"]), json.dumps(record, indent=1, allow_nan=False)
    )


def read_records(experiment: str, num_samples: int) -> dict[int, dict[str, Any]]:
    """rsdiff's own trial records of an experiment (plain JSON), by sample index.

    Raises:
        ConfigError: a record that is not one rsdiff wrote (unparsable, wrong fields or index).
    """
    records: dict[int, dict[str, Any]] = {}
    for uri in storage.list_uris(storage.join(experiment, TRIALS), ".json"):
        try:
            rec = json.loads(storage.read_text(uri))
            sample = rec["sample"]
            ok = (
                isinstance(sample, int)
                and 0 <= sample < num_samples
                and storage.name(uri) == f"{trial_id(sample)}.json"
                and rec["status"] in STATUSES
                and all(isinstance(h.get("val_miou"), int | float) for h in rec["history"])
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{storage.display(uri)} is not a trial record this sweep wrote; delete it (that trial runs "
                "again) or pass fresh=true"
            )
        records[sample] = rec
    return records


def _trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: fit a head on the sample's channels, report val mIoU per epoch, log to MLflow,
    and keep rsdiff's own record of it (JSON) in the experiment folder after every epoch."""
    from ray import tune

    from rsdiff.devices import pick_device
    from rsdiff.tracking import RunHandle

    sample = int(config["sample"])
    choice = shared["samples"][sample]
    tid = trial_id(sample)
    table = FeatureTable.open(shared["features"])
    head_cfg = OmegaConf.merge(
        OmegaConf.structured(HeadConfig), shared["head"], {k: choice[k] for k in HEAD_KEYS}
    )
    tags = {"mlflow.parentRunId": shared["parent"], "rsdiff.stage": "sweep-trial", "rsdiff.trial": tid}
    run = RunHandle.create(shared["uri"], shared["experiment"], run_name=f"trial-{tid}", tags=tags)
    channels = table.index.select(choice["timesteps"], choice["blocks"])
    run.log_params(
        {
            "timesteps": json.dumps(sorted(choice["timesteps"])),
            "blocks": json.dumps(choice["blocks"]),
            "n_channels": str(len(channels)),
            "trial_id": tid,
            **{k: str(choice[k]) for k in HEAD_KEYS},
        }
    )
    record: dict[str, Any] = {"sample": sample, "trial_id": tid, "status": "running", "history": [],
                              "mlflow_run_id": run.run_id}  # fmt: skip

    def on_epoch(epoch: int, m: dict[str, Any]) -> None:
        run.log_metrics({"val_miou": m["val_miou"], "train_loss": m["train_loss"],
                         "val_overall_accuracy": m["val_overall_accuracy"]}, step=epoch)  # fmt: skip
        record["history"].append({"epoch": epoch, "val_miou": float(m["val_miou"])})
        _write_record(shared["experiment_uri"], record)
        if epoch < head_cfg.epochs:  # the last epoch is reported after the head is saved (below)
            tune.report({"val_miou": m["val_miou"], "train_loss": m["train_loss"], "epoch": epoch})

    device = pick_device(shared["gpus"])  # the GPU Tune reserved for this trial, if any
    head = fit_head(table, choice["timesteps"], choice["blocks"], head_cfg, on_epoch=on_epoch, device=device)
    head.save(storage.join(shared["out"], "trials", tid))
    run.log_metrics(
        {
            "best_val_miou": head.metrics["miou"],
            **{f"iou_{k}": v for k, v in head.metrics["iou"].items() if v is not None},
        },
        step=head.metrics["epochs_run"],
    )
    _write_record(shared["experiment_uri"], {**record, "status": "finished"})
    run.finish("FINISHED")
    # ASHA may stop a trial at any report, the last epoch's too (a rung can fall on it): report
    # that one only now, when the head, its record and its MLflow run are complete.
    if record["history"] and record["history"][-1]["epoch"] == head_cfg.epochs:
        last = record["history"][-1]
        tune.report({"val_miou": last["val_miou"], "epoch": last["epoch"]})


def _search_numbers(cfg: Any) -> None:
    """Every numeric setting of the sweep in range, before any trial starts."""
    for value in cfg.search.lr:
        require("search.lr[...]", value, gt=0, le=1)
    for value in cfg.search.dropout:
        require("search.dropout[...]", value, ge=0, lt=1)
    for value in cfg.search.input_noise:
        require("search.input_noise[...]", value, ge=0)
    for key in ("width", "depth"):
        for value in getattr(cfg.search, key):
            require(f"search.{key}[...]", value, ge=1)
    require("head.lr", cfg.head.lr, gt=0, le=1)
    require("head.dropout", cfg.head.dropout, ge=0, lt=1)
    require("head.weight_decay", cfg.head.weight_decay, ge=0)
    for key in ("batch_rows", "patience", "members"):
        require(f"head.{key}", getattr(cfg.head, key), ge=1)
    require("cpus_per_trial", cfg.cpus_per_trial, gt=0)
    require("gpus_per_trial", cfg.gpus_per_trial, ge=0)
    require("reduction_factor", cfg.reduction_factor, ge=2)
    if cfg.time_budget_s is not None:
        require("time_budget_s", cfg.time_budget_s, gt=0)


def run_sweep(cfg: Any) -> SweepResult:
    """Run (or continue) the sweep; save the best head under ``cfg.output/best``.

    Nothing Ray Tune pickled is ever read back: a re-run continues from rsdiff's own JSON trial
    records (``{storage}/{name}/trials/``), running only the samples not yet finished or stopped
    early, in a new Tune experiment (``{storage}/{name}/tune-<time>``, kept for its logs only).
    """
    from rsdiff import tracking
    from rsdiff.lease import Lease

    storage.check_name(cfg.name, "name")
    table = FeatureTable.open(str(cfg.features))
    validate(cfg, table)
    _search_numbers(cfg)
    spec = sweep_spec(cfg, table)
    experiment_uri = storage.join(storage.absolute(str(cfg.storage)), str(cfg.name))
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.client(uri)  # an unusable tracking store fails before anything is written
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    storage.check_writable(experiment_uri)
    with Lease(experiment_uri, f"sweep name={cfg.name} in {storage.display(str(cfg.storage))}"):
        if cfg.fresh:
            _clear(experiment_uri)
        return _run_sweep(cfg, table, spec, experiment_uri, out, uri)


def _run_sweep(
    cfg: Any, table: FeatureTable, spec: dict[str, Any], experiment_uri: str, out: str, uri: str
) -> SweepResult:
    import time

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from rsdiff import tracking
    from rsdiff.raytools import connect, storage_for_ray

    spec_uri = storage.join(experiment_uri, SWEEP_SPEC)
    restore = bool(_contents(experiment_uri))
    if restore:
        check_same_spec(experiment_uri, spec)
    samples = draw_samples(to_container(cfg.search), int(cfg.num_samples), int(cfg.seed))
    records = read_records(experiment_uri, len(samples)) if restore else {}
    remaining = [i for i in range(len(samples)) if records.get(i, {}).get("status") not in DONE]
    sweep_key = storage.display(storage.join(str(cfg.storage), str(cfg.name)))
    tags = {"rsdiff.stage": "sweep", "rsdiff.sweep": sweep_key}
    if restore:
        parent, resumed = tracking.RunHandle.find_or_create(
            uri, cfg.tracking.experiment, str(cfg.name), tags=tags, match_tag="rsdiff.sweep"
        )
    else:  # a new experiment gets a new parent run
        parent, resumed = tracking.RunHandle.create(uri, cfg.tracking.experiment, str(cfg.name), tags), False
        storage.write_text(spec_uri, json.dumps(spec, indent=1, default=str))
    if not resumed:
        parent.log_params(tracking.config_params(cfg))
        parent.log_dict(to_container(cfg.search), "search_space.json")
    with tracking.ends_run(parent):
        if remaining:
            log.info("sweep %s: %d of %d samples to run", sweep_key, len(remaining), len(samples))
            shared = {
                "samples": samples,
                "features": table.root,
                "head": to_container(cfg.head),
                "parent": parent.run_id,
                "uri": uri,  # may hold a password: passed through the object store, never persisted
                "experiment": cfg.tracking.experiment,
                "experiment_uri": experiment_uri,
                "out": out,
                "gpus": float(cfg.gpus_per_trial),
            }
            connect(cfg.ray.address, cfg.ray.num_cpus)
            trainable = tune.with_resources(
                tune.with_parameters(_trial, shared=shared),
                {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
            )
            # max_t one past the last epoch: ASHA stops a trial that reaches max_t at that very report,
            # before the trial could save its head; trials that run every epoch must end on their own.
            scheduler = (
                ASHAScheduler(
                    max_t=cfg.head.epochs + 1,
                    grace_period=cfg.grace_period,
                    reduction_factor=cfg.reduction_factor,
                )
                if Scheduler(cfg.scheduler) is Scheduler.asha
                else FIFOScheduler()
            )
            storage_path, filesystem = storage_for_ray(experiment_uri)
            tuner = tune.Tuner(
                trainable,
                param_space={"sample": tune.grid_search(remaining)},
                tune_config=tune.TuneConfig(
                    metric="val_miou",
                    mode="max",
                    scheduler=scheduler,
                    search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials),
                    time_budget_s=cfg.time_budget_s,
                ),
                run_config=tune.RunConfig(
                    name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=storage_path,
                    storage_filesystem=filesystem,
                ),
            )  # fmt: skip
            grid = tuner.fit()
            _mark_ended(grid, experiment_uri, len(samples))
        trials = _collect(samples, read_records(experiment_uri, len(samples)), out)
        _close_children(uri, parent.run_id, trials)
        finished = [t for t in trials if t["head"]]
        if not finished:
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


def _contents(experiment: str) -> list[str]:
    """Everything in the experiment folder but the lease (and write probes)."""
    from rsdiff.lease import LEASE

    return [
        u for u in storage.list_uris(experiment)
        if storage.name(u) != LEASE and not storage.name(u).startswith(".rsdiff-write-probe")
    ]  # fmt: skip


def _clear(experiment: str) -> None:
    """``fresh=true``: delete the old experiment, keeping this job's lease."""
    if storage.is_s3(experiment):
        for uri in _contents(experiment):
            storage.delete(uri)
        return
    from rsdiff.lease import LEASE

    folder = Path(experiment)
    for child in folder.iterdir() if folder.is_dir() else []:
        if child.name == LEASE:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _mark_ended(grid: Any, experiment: str, num_samples: int) -> None:
    """Record how this attempt's unfinished trials ended: stopped early by the scheduler (done, not
    run again) or failed (run again by the next invocation)."""
    records = read_records(experiment, num_samples)
    for r in grid:
        if r.config is None or "sample" not in r.config:
            continue
        sample = int(r.config["sample"])
        if sample not in records and r.error is None:
            continue  # never started (e.g. time_budget_s ran out): the next run runs it
        rec = records.get(sample, {"sample": sample, "trial_id": trial_id(sample), "history": []})
        if rec.get("status") == "finished":
            continue
        if r.error is None:
            rec["status"] = "stopped_early"
        else:
            rec.update(status="error", error=str(r.error)[:200])
        _write_record(experiment, rec)


def _collect(
    samples: list[dict[str, Any]], records: dict[int, dict[str, Any]], out: str
) -> list[dict[str, Any]]:
    """Trials ranked by their best val mIoU, best first (samples never run are left out)."""
    trials = []
    for sample, rec in records.items():
        history = [h["val_miou"] for h in rec["history"]]
        best = float(max(history)) if history else float("nan")
        head_uri = storage.join(out, "trials", trial_id(sample))
        has_head = rec["status"] == "finished" and storage.exists(storage.join(head_uri, "head.json"))
        choice = samples[sample]
        trials.append(
            {
                "trial_id": trial_id(sample),
                "timesteps": sorted(choice["timesteps"]),
                "blocks": list(choice["blocks"]),
                **{k: choice[k] for k in HEAD_KEYS},
                "best_val_miou": best,
                "epochs": len(history),
                "stopped_early": rec["status"] == "stopped_early",
                "error": rec.get("error"),
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
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.train.checkpoint import load_pretrained
    from rsdiff.viz import model_rgb, overlay, side_by_side

    manifest = read_manifest(str(table.meta["shards"]))
    shards = manifest.shard_uris("val") or manifest.shard_uris("train")
    tile = next(iter_shard(shards[0]))
    ddpm = load_pretrained(head.checkpoint)
    x = torch.from_numpy(ddpm.normalizer(tile.image))[None]
    feats = FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed).dense(x)[0]
    pred, _ = head.predict(feats.flatten(1).T)
    pred = pred.view(tile.image.shape[1:]).numpy().astype(np.uint8)
    rgb = model_rgb(x)[0]
    truth = tile.label if tile.label is not None else np.full(pred.shape, 255, np.uint8)
    picture = side_by_side([rgb, overlay(rgb, truth, head.classes), overlay(rgb, pred, head.classes)])
    scale = max(1, 256 // picture.shape[0])
    parent.log_image(np.kron(picture, np.ones((scale, scale, 1), np.uint8)), "val_overlay.png")
