"""What a sweep reports: trials ranked from their records, the plain-text table, and the parent
MLflow run's summary, plots and validation overlay."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.features.table import FeatureTable
from rsdiff.heads.artifact import TrainedHead
from rsdiff.metrics import worst_class
from rsdiff.sweep.records import trial_id
from rsdiff.sweep.space import HEAD_KEYS, block_set_id, deepest_level


def collect(
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


def no_trial_finished(records: dict[int, dict[str, Any]], out: str, time_budget_s: float | None) -> str:
    """Why a sweep has no head to pick, in one line that names the cause (not always the budget)."""
    done = [r for r in records.values() if r.get("status") == "finished"]
    if done:
        return (
            f"the experiment's {len(done)} finished trial(s) saved their heads under another output than "
            f"{storage.display(out)} (a finished sweep run again with another `output`): give the output "
            "it ran with, or fresh=true to run the sweep again into this one"
        )
    failed = [r for r in records.values() if r.get("status") == "error"]
    if failed:
        return f"all {len(failed)} trial(s) that ran failed; the first error: {failed[0].get('error', '?')}"
    if not records:
        budget = f"time_budget_s={time_budget_s:g}" if time_budget_s else "the sweep"
        return f"no trial started within {budget}: raise time_budget_s, or check the cluster's free CPUs"
    return "every trial was stopped before it saved a head: raise grace_period or time_budget_s"


def close_children(uri: str, parent_id: str, trials: list[dict[str, Any]]) -> None:
    """Child runs of trials that did not finish themselves: one the scheduler stopped early is a
    complete result (FINISHED, tag ``rsdiff.outcome=stopped_early``, metric ``stopped_early=1``),
    one that crashed or was cut off is FAILED (``rsdiff.outcome=failed``)."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(parent_id)
    children = c.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    stopped = {t["trial_id"]: t for t in trials if t["stopped_early"]}
    for child in children:
        if child.info.status != "RUNNING":
            continue
        trial = stopped.get(child.data.tags.get("rsdiff.trial", ""))
        run_id = child.info.run_id
        if trial is not None:
            c.set_tag(run_id, "rsdiff.outcome", "stopped_early")
            c.set_tag(run_id, "rsdiff.stopped_at_epoch", str(trial["epochs"]))
            c.log_metric(run_id, "stopped_early", 1.0, step=trial["epochs"])
            c.set_terminated(run_id, status="FINISHED")
        else:
            c.set_tag(run_id, "rsdiff.outcome", "failed")
            c.set_terminated(run_id, status="FAILED")


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


def winner_line(best: dict[str, Any]) -> str:
    """A sweep's winning trial in one line: timesteps, blocks and head (its val mIoU is apart)."""
    head = f"{best['kind']} head (width {best['width']}, lr {best['lr']:.1e})"
    return f"timesteps {json.dumps(best['timesteps'])}, blocks {json.dumps(best['blocks'])}, {head}"


def describe_winner(best: dict[str, Any], trials: int, cm: Any, class_names: list[str]) -> str:
    """The sweep run's description (MLflow's ``mlflow.note.content``, shown above its params): the
    winner (:func:`winner_line`), its val mIoU and its worst class on val."""
    worst = worst_class(dict(zip(class_names, cm.iou().tolist(), strict=True)), " on val")
    return (
        f"**Winner** (trial {best['trial_id']} of {trials}): {winner_line(best)}. "
        f"**Val mIoU {best['best_val_miou']:.3f}**"
        + (f"; {worst}" if worst else "")
        + ". The head is in `best/`."
    )


def log_summary(parent: Any, trials: list[dict[str, Any]], best: dict[str, Any], head: TrainedHead) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsdiff.metrics import ConfusionMatrix

    cm = ConfusionMatrix(head.num_classes)
    cm.matrix = np.asarray(head.metrics["confusion_matrix"], np.int64)
    span = {
        "best.t_min": min(best["timesteps"]),
        "best.t_max": max(best["timesteps"]),
        "best.deepest_level": deepest_level(best["blocks"]),
    }  # for the compare view
    parent.log_metrics({"best_val_miou": best["best_val_miou"], "trials": len(trials), **span}, step=0)
    # Lists as the trials' params read (50,150); the val mIoU is a metric, not also a param.
    skip = {"head", "error", "stopped_early", "best_val_miou"}
    params = {f"best.{k}": ",".join(map(str, v)) if isinstance(v, list) else str(v)
              for k, v in best.items() if k not in skip}  # fmt: skip
    parent.log_params({**params, "best.block_set": block_set_id(best["blocks"])})
    note = describe_winner(best, len(trials), cm, head.class_names)
    parent.set_tags({"rsdiff.best_head": best["head"] or "", "mlflow.note.content": note})
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
    fig = cm.plot(head.class_names, title=f"best trial {best['trial_id']}: val mIoU {cm.miou():.3f}")
    parent.log_figure(fig, "best_confusion_matrix.png")
    plt.close(fig)


def log_overlay(parent: Any, head: TrainedHead, table: FeatureTable) -> None:
    """Image | ground truth | best head's prediction on the first validation tile, titled, in the
    classes' own colours, with a legend, as a PNG."""
    import torch

    from rsdiff.data.manifest import read_manifest
    from rsdiff.data.shards import iter_shard
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.viz import class_colours, enlarge, labelled, legend, model_rgb, side_by_side, stack

    manifest = read_manifest(str(table.meta["shards"]))
    shards = manifest.shard_uris("val") or manifest.shard_uris("train")
    tile = next(iter_shard(shards[0]))
    ddpm = load_pretrained(
        head.checkpoint, expect_sha256=head.checkpoint_sha256 or None, expected_by="the best head"
    )
    x = torch.from_numpy(ddpm.normalizer(tile.image))[None]
    feats = FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed).dense(x)[0]
    pred, _ = head.predict(feats.flatten(1).T)
    pred = pred.view(tile.image.shape[1:]).numpy().astype(np.uint8)
    rgb = model_rgb(x)[0]
    truth = tile.label if tile.label is not None else np.full(pred.shape, 255, np.uint8)
    panels = [
        enlarge(p, 256)
        for p in (rgb, class_colours(truth, head.classes, rgb), class_colours(pred, head.classes, rgb))
    ]
    chosen = f"t={','.join(map(str, head.timesteps))} · {'+'.join(head.blocks)}"
    picture = labelled(side_by_side(panels), f"first validation tile · best head ({chosen})",
                       ["image", "ground truth", "prediction"])  # fmt: skip
    parent.log_image(stack([picture, legend(head.classes, max_width=picture.shape[1])]), "val_overlay.png")
