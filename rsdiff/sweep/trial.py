"""One sweep trial, as Ray Tune runs it: fit a head on the sample's channels, report val mIoU per
epoch, log to MLflow, keep rsdiff's record of it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from rsdiff import storage
from rsdiff.config import build
from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.table import FeatureTable
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import fit_head
from rsdiff.sweep.records import trial_id, write_record
from rsdiff.sweep.space import HEAD_KEYS, choice_params, trial_name


@dataclass
class TrialContext:
    """What every trial of one sweep shares (through Ray's object store, never written to disk)."""

    samples: list[dict[str, Any]]  # the drawn trial settings, by sample index
    features: str  # feature table URI
    head: HeadConfig  # fixed head settings; a sample's choices override them
    table: TableCacheConfig  # node-local copy and in-memory budget
    parent_run_id: str
    tracking_uri: str
    experiment: str  # MLflow experiment name
    experiment_uri: str  # {storage}/{name}: trial records live here
    out: str  # output folder: trial heads under trials/
    gpus: float  # per trial
    tags: dict[str, str]  # the driver's provenance tags (version, commit, command line, data URIs)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: fit a head on the sample's channels, report val mIoU per epoch, log to MLflow,
    and keep rsdiff's own record of it (JSON) in the experiment folder after every epoch."""
    from ray import tune

    from rsdiff.devices import pick_device
    from rsdiff.tracking import RunHandle

    sample = int(config["sample"])
    choice = context.samples[sample]
    tid = trial_id(sample)
    table = FeatureTable.open(context.features).cached(context.table)  # once per node, then mapped
    head_cfg = build(HeadConfig, context.head, {k: choice[k] for k in HEAD_KEYS})
    tags = {**context.tags, "mlflow.parentRunId": context.parent_run_id, "rsdiff.stage": "sweep-trial",
            "rsdiff.trial": tid, "rsdiff.outcome": "running"}  # fmt: skip
    run = RunHandle.create(context.tracking_uri, context.experiment, run_name=trial_name(choice), tags=tags)
    channels = table.index.select(choice["timesteps"], choice["blocks"])
    run.log_params(
        {
            **choice_params(choice),
            "n_timesteps": str(len(choice["timesteps"])),
            "n_blocks": str(len(choice["blocks"])),
            "n_channels": str(len(channels)),
            "trial_id": tid,
        }
    )
    record: dict[str, Any] = {"sample": sample, "trial_id": tid, "status": "running", "history": [],
                              "mlflow_run_id": run.run_id,
                              "worker": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip

    def on_epoch(epoch: int, m: dict[str, Any]) -> None:
        # best_val_miou so far, every epoch: a trial the scheduler stops still ranks by its best
        best = max([float(m["val_miou"])] + [h["val_miou"] for h in record["history"]])
        run.log_metrics({"val_miou": m["val_miou"], "best_val_miou": best, "train_loss": m["train_loss"],
                         "val_overall_accuracy": m["val_overall_accuracy"]}, step=epoch)  # fmt: skip
        record["history"].append({"epoch": epoch, "val_miou": float(m["val_miou"])})
        write_record(context.experiment_uri, record)
        if epoch < head_cfg.epochs:  # the last epoch is reported after the head is saved (below)
            tune.report({"val_miou": m["val_miou"], "train_loss": m["train_loss"], "epoch": epoch})

    device = pick_device(context.gpus)  # the GPU Tune reserved for this trial, if any
    head = fit_head(table, choice["timesteps"], choice["blocks"], head_cfg, on_epoch=on_epoch, device=device,
                    memory_mb=context.table.memory_mb)  # fmt: skip
    head.save(storage.join(context.out, "trials", tid))
    run.log_metrics(
        {
            "best_val_miou": head.metrics["miou"],
            **{f"iou_{k}": v for k, v in head.metrics["iou"].items() if v is not None},
        },
        step=head.metrics["epochs_run"],
    )
    write_record(context.experiment_uri, {**record, "status": "finished"})
    run.set_tags({"rsdiff.outcome": "completed"})
    run.finish("FINISHED")
    # ASHA may stop a trial at any report, the last epoch's too (a rung can fall on it): report
    # that one only now, when the head, its record and its MLflow run are complete.
    if record["history"] and record["history"][-1]["epoch"] == head_cfg.epochs:
        last = record["history"][-1]
        tune.report({"val_miou": last["val_miou"], "epoch": last["epoch"]})
