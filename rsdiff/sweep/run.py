"""Running (or continuing) a sweep: the lease, the Tune experiment of the samples still to run,
and the best head."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.config import to_container
from rsdiff.console import silent_tune
from rsdiff.errors import ConfigError
from rsdiff.features.config import BlockNumbering
from rsdiff.features.table import FeatureTable
from rsdiff.heads.artifact import TrainedHead
from rsdiff.lease import Lease, LeaseLost
from rsdiff.provenance import provenance_tags
from rsdiff.sweep.config import Scheduler, SweepConfig
from rsdiff.sweep.records import DONE, TRIALS, mark_ended, read_records
from rsdiff.sweep.report import (
    close_children,
    collect,
    format_table,
    log_overlay,
    log_summary,
    no_trial_finished,
)
from rsdiff.sweep.space import (
    SWEEP_SPEC,
    check_numbers,
    check_same_spec,
    head_params,
    sweep_spec,
    trial_settings,
    validate,
)
from rsdiff.sweep.trial import TrialContext, run_trial

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """The outcome of a sweep."""

    best_head: str  # URI of the best head artifact
    best: dict[str, Any]
    trials: list[dict[str, Any]]  # ranked, best first
    parent_run_id: str
    tracking_uri: str


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or continue) the sweep; save the best head under ``cfg.output/best``.

    Nothing Ray Tune pickled is ever read back: a re-run continues from rsdiff's own JSON trial
    records (``{storage}/{name}/trials/``), running only the samples not yet finished or stopped
    early, in a new Tune experiment (``{storage}/{name}/tune-<time>``, kept for its logs only).
    """
    from rsdiff import tracking

    storage.check_name(cfg.name, "name")
    table = FeatureTable.open(str(cfg.features))
    numbering = BlockNumbering(cfg.block_numbering).value
    cfg.search.blocks = [table.index.block_names(choice, numbering) for choice in cfg.search.blocks]
    check_numbers(cfg)  # the declared ranges first: validate counts combinations against num_samples
    validate(cfg, table)
    spec = sweep_spec(cfg, table)
    experiment_uri = storage.join(storage.absolute(str(cfg.storage)), str(cfg.name))
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.client(uri)  # an unusable tracking store fails before anything is written
    out = storage.absolute(str(cfg.output))
    storage.check_writable(out)
    storage.check_writable(experiment_uri)
    _check_owned(experiment_uri)  # before the lease is written into someone else's folder
    with Lease(experiment_uri, f"sweep name={cfg.name} in {storage.display(str(cfg.storage))}") as lease:
        if cfg.fresh:
            _clear(experiment_uri)
        try:
            return _run_sweep(_Sweep(cfg, table, spec, experiment_uri, out, uri), lease)
        except KeyboardInterrupt:  # losing the lease interrupts the sweep like Ctrl-C
            if lease.lost:
                raise LeaseLost(lease.lost_message()) from None
            raise


@dataclass(frozen=True)
class _Sweep:
    """What one run of the sweep works with, resolved and checked by :func:`run_sweep`."""

    cfg: SweepConfig
    table: FeatureTable
    spec: dict[str, Any]  # the settings that decide its results (recorded as SWEEP_SPEC)
    experiment: str  # {storage}/{name}: trial records, the spec, Tune's folders
    out: str  # output folder: trial heads, best/, summary.json
    uri: str  # MLflow tracking URI (may hold a password: never persisted)


def _run_sweep(sweep: _Sweep, lease: Lease) -> SweepResult:
    """Run the samples not yet done (all of them in a new experiment) under the sweep's parent run,
    then publish the best head, the summary and the parent run's comparison (only while ``lease``
    is still this job's)."""
    from rsdiff import tracking

    cfg, table, experiment_uri, out, uri = sweep.cfg, sweep.table, sweep.experiment, sweep.out, sweep.uri
    restore = bool(_contents(experiment_uri))
    if restore:
        check_same_spec(experiment_uri, sweep.spec)
    samples = trial_settings(cfg)
    records = read_records(experiment_uri, len(samples)) if restore else {}
    remaining = [i for i in range(len(samples)) if records.get(i, {}).get("status") not in DONE]
    parent = _parent_run(sweep, restore)
    with tracking.ends_run(parent):
        if remaining:
            log.info("sweep %s: %d of %d samples to run", _sweep_key(cfg), len(remaining), len(samples))
            context = TrialContext(
                samples=samples,
                features=table.root,
                head=cfg.head,
                table=cfg.table,
                parent_run_id=parent.run_id,
                tracking_uri=uri,  # may hold a password: passed through the object store, never persisted
                experiment=cfg.tracking.experiment,
                experiment_uri=experiment_uri,
                out=out,
                gpus=float(cfg.gpus_per_trial),
                tags=_provenance(table, out),
            )
            with silent_tune():
                grid = _tuner(cfg, context, remaining, experiment_uri).fit()
            mark_ended(grid, experiment_uri, len(samples))
        lease.check()
        records = read_records(experiment_uri, len(samples))
        trials = collect(samples, records, out)
        close_children(uri, parent.run_id, trials)
        finished = [t for t in trials if t["head"]]
        if not finished:
            raise ConfigError(f"no trial gave a head: {no_trial_finished(records, out, cfg.time_budget_s)}")
        best = finished[0]
        head = TrainedHead.load(best["head"])
        best_uri = head.save(storage.join(out, "best"))
        log_summary(parent, trials, best, head)
        log_overlay(parent, head, table)
        storage.write_text(
            storage.join(out, "summary.json"), json.dumps({"best": best, "trials": trials}, indent=1)
        )
    parent.finish("FINISHED")
    print(format_table(trials))
    return SweepResult(best_uri, best, trials, parent.run_id, uri)


def _sweep_key(cfg: SweepConfig) -> str:
    """The sweep's storage/name as shown and as its parent run is found again by."""
    return storage.display(storage.join(str(cfg.storage), str(cfg.name)))


def _provenance(table: FeatureTable, out: str) -> dict[str, str]:
    return provenance_tags({"features": table.root, "output": out})


def _parent_run(sweep: _Sweep, restore: bool) -> Any:
    """The sweep's parent MLflow run: found again when continuing (it joins its new parent and
    command), else created with the config and search space (and the sweep's spec written)."""
    from rsdiff import tracking

    cfg, table, out, uri = sweep.cfg, sweep.table, sweep.out, sweep.uri

    tags = {**_provenance(table, out), **tracking.parent_tags(cfg.tracking.parent_run_id),
            "rsdiff.stage": "sweep", "rsdiff.sweep": _sweep_key(cfg)}  # fmt: skip
    if restore:
        parent, resumed = tracking.RunHandle.find_or_create(
            uri, cfg.tracking.experiment, str(cfg.name), tags=tags, match_tag="rsdiff.sweep"
        )
    else:  # a new experiment gets a new parent run
        parent, resumed = tracking.RunHandle.create(uri, cfg.tracking.experiment, str(cfg.name), tags), False
        spec_uri = storage.join(sweep.experiment, SWEEP_SPEC)
        storage.write_text(spec_uri, json.dumps(sweep.spec, indent=1, default=str))
    if resumed:
        parent.set_tags({k: v for k, v in tags.items() if k != "rsdiff.sweep"})  # new parent, command
    else:
        parent.log_params({**tracking.config_params(cfg), **head_params(cfg)})
        parent.log_dict(to_container(cfg.search), "search_space.json")
        tracking.log_input(parent, table.root, "table.json", "features", "training")
    return parent


def _tuner(cfg: SweepConfig, context: TrialContext, remaining: list[int], experiment_uri: str) -> Any:
    """A Ray Tune tuner over the ``remaining`` sample indices, each trial :func:`run_trial` with
    ``context``, scheduled by ASHA or FIFO on val mIoU, stored in ``experiment_uri``."""
    import time

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from rsdiff.console import TUNE_VERBOSITY
    from rsdiff.raytools import connect, storage_for_ray

    connect(cfg.ray.address, cfg.ray.num_cpus)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
    )
    # max_t one past the last epoch: ASHA stops a trial that reaches max_t at that very report,
    # before the trial could save its head; trials that run every epoch must end on their own.
    scheduler = (
        ASHAScheduler(max_t=cfg.head.epochs + 1, grace_period=cfg.grace_period,
                      reduction_factor=cfg.reduction_factor)
        if Scheduler(cfg.scheduler) is Scheduler.asha
        else FIFOScheduler()
    )  # fmt: skip
    storage_path, filesystem = storage_for_ray(experiment_uri)
    return tune.Tuner(
        trainable,
        param_space={"sample": tune.grid_search(remaining)},
        tune_config=tune.TuneConfig(
            metric="val_miou",
            mode="max",
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials),
            time_budget_s=cfg.time_budget_s,
            # A finished trial's process takes the next trial: no fresh Python, torch import and
            # table mapping per trial (trials share resources; each builds its own head and run).
            reuse_actors=cfg.reuse_trial_processes,
        ),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=storage_path,
            storage_filesystem=filesystem, verbose=TUNE_VERBOSITY,
        ),
    )  # fmt: skip


def _contents(experiment: str) -> list[str]:
    """Everything in the experiment folder but the lease (and write probes)."""
    from rsdiff.lease import LEASE

    return [
        u for u in storage.list_uris(experiment)
        if not storage.name(u).startswith((LEASE, ".rsdiff-write-probe"))  # the lease and its lock
    ]  # fmt: skip


def _check_owned(experiment: str) -> list[str]:
    """The experiment folder's contents, when it is empty or a sweep's own (it holds the sweep's
    spec, :data:`~rsdiff.sweep.space.SWEEP_SPEC`, or its trial records).

    Raises:
        ConfigError: the folder holds files no sweep wrote (an ingest output, a feature table, ...).
    """
    from rsdiff.artifacts import describe_folder

    contents = _contents(experiment)
    records = storage.join(experiment, TRIALS) + "/"
    own = storage.join(experiment, SWEEP_SPEC) in contents or any(u.startswith(records) for u in contents)
    if contents and not own:
        raise ConfigError(
            f"storage/name point at {storage.display(experiment)}, which holds "
            f"{describe_folder(contents, experiment)}, not a sweep's experiment; a sweep neither "
            "writes into nor (fresh=true) deletes a folder it does not own: pick another storage= or name="
        )
    return contents


def _clear(experiment: str) -> None:
    """``fresh=true``: delete the old experiment, keeping this job's lease; only a sweep's own
    folder (it holds the sweep's spec, :data:`~rsdiff.sweep.space.SWEEP_SPEC`) is ever deleted.

    Raises:
        ConfigError: the folder holds files no sweep wrote (an ingest output, a feature table, ...).
    """
    contents = _check_owned(experiment)
    for uri in contents:
        if storage.is_s3(uri):
            storage.delete(uri)
    if storage.is_s3(experiment):
        return
    from rsdiff.lease import LEASE

    folder = Path(experiment)
    for child in folder.iterdir() if folder.is_dir() else []:
        if child.name.startswith(LEASE):  # the lease and its lock stay
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
