"""The Ray Tune sweep (``run_sweep`` / ``jobs/sweep.py``) over the labeled test table (dubai-aerial's
features where present, else the generated sample's), tracked in a real MLflow store and read back
through ``MlflowClient``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import REPO, PicklePayload, free_port, run_job, run_job_inline
from mlflow import MlflowClient
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage
from rsdiff.config import load_config, to_container
from rsdiff.errors import ConfigError
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.fit import StreamedRows, evaluate
from rsdiff.sweep.config import SweepConfig
from rsdiff.sweep.run import run_sweep
from rsdiff.sweep.space import block_set_id, deepest_level, draw_samples, grid_samples, trial_settings

SWEEP = REPO / "configs" / "sweep" / "tiny.yaml"
SEARCH = [  # choices that exist in the labeled test table (t in {10, 100})
    "search.timesteps=[[10],[100],[10,100]]",
    "search.blocks=[[up1.res0],[up2.res1],[up1.res1,up2.res1]]",
]


def _overrides(table, tmp_path, mlflow_uri, *extra):
    return [
        f"features={table.root}",
        f"output={tmp_path / 'out'}",
        f"storage={tmp_path / 'tune'}",
        f"tracking.uri={mlflow_uri}",
        *SEARCH,
        "search.width=[32,64]",
        "search.depth=[1]",
        "search.lr=[1e-3,3e-3]",
        "head.epochs=4",
        "head.patience=10",
        "head.batch_rows=256",
        "num_samples=4",
        "max_concurrent_trials=2",
        *extra,
    ]


def _cfg(table, tmp_path, mlflow_uri, *extra):
    return load_config(SweepConfig, SWEEP, _overrides(table, tmp_path, mlflow_uri, *extra))


@pytest.mark.integration
def test_asha_stops_weak_trials_early(labeled_table, tmp_path, mlflow_uri, ray_cluster):
    result = run_sweep(
        _cfg(labeled_table, tmp_path, mlflow_uri, "name=asha", "scheduler=asha", "num_samples=8",
             "head.epochs=8", "grace_period=1", "reduction_factor=2")
    )  # fmt: skip
    stopped = [t for t in result.trials if t["stopped_early"]]
    assert stopped, result.trials
    assert all(t["epochs"] < 8 for t in stopped)
    assert result.best["head"] is not None and result.best["epochs"] <= 8
    client = MlflowClient(mlflow_uri)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    # Stopped early is a result, not a failure: FINISHED, tagged, and ranked by its running best.
    assert {r.info.status for r in children} == {"FINISHED"}
    by_trial = {r.data.tags["rsdiff.trial"]: r for r in children}
    for t in result.trials:
        run = by_trial[t["trial_id"]]
        outcome = "stopped_early" if t["stopped_early"] else "completed"
        assert run.data.tags["rsdiff.outcome"] == outcome
        assert run.data.metrics["best_val_miou"] == pytest.approx(t["best_val_miou"])
        if t["stopped_early"]:
            assert run.data.tags["rsdiff.stopped_at_epoch"] == str(t["epochs"])
            assert run.data.metrics["stopped_early"] == 1.0


@pytest.mark.e2e
def test_a_sweep_job_reads_the_table_once_per_node_tracks_its_trials_and_saves_a_reproducible_best_head(
    labeled_table, s3_endpoint, tmp_path, mlflow_uri, ray_cluster
):
    """``jobs/sweep.py``: four trials of four epochs on an S3 table, through a counting proxy, on a
    fresh Ray of its own (one node). Every part is fetched exactly once, into the node's cache, and
    mapped from there by every trial (each trial, epoch and validation pass used to fetch every part
    again). Re-run with the same name, here in process on another Ray, the sweep is restored from
    its records: nothing trained again, the same parent run, whose children, notes and best head
    are checked on the restored result."""
    fifo = ["name=fifo", "scheduler=fifo"]
    args = [f"--config={SWEEP}", *_overrides(labeled_table, tmp_path, mlflow_uri, *fifo), "ray.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with FaultyS3Proxy(s3_endpoint, max_faults=0) as proxy:
        env.update(AWS_ENDPOINT_URL=proxy.url, RSDIFF_CACHE_DIR=str(tmp_path / "node-cache"))
        proc = run_job("sweep.py", *args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "tune").glob("*/trials/s*.json"))) == 4  # four trial records
    bucket, key = storage.split_s3(labeled_table.root)
    fetched = {p: n for (method, p), n in proxy.requests.items() if method == "GET" and "/parts/" in p}
    want = {f"/{bucket}/{key}/parts/{p['name']}" for p in labeled_table.meta["parts"]}
    assert set(fetched) == want and set(fetched.values()) == {1}, fetched
    assert len([d for d in (tmp_path / "node-cache").iterdir() if d.is_dir()]) == 1

    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    result = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *fifo))
    assert result.parent_run_id == printed["parent_run_id"] and result.best_head == printed["best_head"]
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["num_samples"] == "4" and "best.timesteps" in parent.data.params
    # The answer first: the run's description names the winner, its val mIoU and its worst class.
    best = result.trials[0]
    note = parent.data.tags["mlflow.note.content"]
    assert f"timesteps {json.dumps(best['timesteps'])}, blocks {json.dumps(best['blocks'])}" in note
    assert f"**Val mIoU {best['best_val_miou']:.3f}**" in note and "worst class on val: " in note
    assert parent.data.metrics["best.t_min"] == min(best["timesteps"])
    # The head settings the trials used, not head.width's unused default:
    assert parent.data.params["head.width"] == "searched: 32 | 64" and parent.data.params["head.depth"] == "1"
    assert parent.data.tags["rsdiff.data.features"] == labeled_table.root
    assert parent.data.tags["rsdiff.version"] and parent.data.tags["rsdiff.command"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"miou_by_choice.png", "best_confusion_matrix.png", "val_overlay.png", "summary.json"} <= arts
    assert "search_space.json" in arts
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and len(result.trials) == 4
    # A finished trial's process takes the next one (Tune's reuse_actors): fewer processes than trials.
    records = [json.loads(p.read_text()) for p in (tmp_path / "tune" / "fifo" / "trials").glob("s*.json")]
    assert len(records) == 4 and len({r["worker"] for r in records}) < 4, records
    for child in children:
        p = child.data.params
        assert {"timesteps", "blocks", "n_channels", "lr", "width", "kind"} <= set(p)
        assert child.info.status == "FINISHED" and child.data.tags["rsdiff.outcome"] == "completed"
        # Named by what it tried; lists read plainly; provenance passed on from the driver.
        head = f"w{p['width']} d{p['depth']}"
        assert (
            child.info.run_name.startswith(f"t{p['timesteps'].replace(',', '-')} · ")
            and head in child.info.run_name
        )
        assert "[" not in p["timesteps"] + p["blocks"] and '"' not in p["blocks"]
        steps = [int(t) for t in p["timesteps"].split(",")]
        assert (int(p["t_min"]), int(p["t_max"])) == (min(steps), max(steps))
        assert p["block_set"] == block_set_id(p["blocks"].split(","))
        assert int(p["deepest_level"]) == deepest_level(p["blocks"].split(","))
        command = child.data.tags["rsdiff.command"].split()  # the job's, whose trial made it
        assert command[0].endswith("jobs/sweep.py") and "ray.num_cpus=2" in command
        history = client.get_metric_history(child.info.run_id, "val_miou")
        assert [m.step for m in history] == [1, 2, 3, 4]
        running = client.get_metric_history(child.info.run_id, "best_val_miou")
        running = [m.value for m in sorted(running, key=lambda m: (m.step, m.timestamp))][: len(history)]
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert running == pytest.approx(list(np.maximum.accumulate(values)))
        assert any(k.startswith("iou_") for k in child.data.metrics)
    # Filterable: the MLflow UI's search box can pick trials by their choices.
    by_t = client.search_runs([parent.info.experiment_id], filter_string="params.timesteps = '10'")
    assert by_t and all(r.data.params["timesteps"] == "10" for r in by_t)

    ranked = [t["best_val_miou"] for t in result.trials]
    assert ranked == sorted(ranked, reverse=True)
    head = TrainedHead.load(result.best_head)
    assert head.timesteps == result.best["timesteps"] and head.checkpoint == labeled_table.meta["checkpoint"]
    channels = labeled_table.index.select(head.timesteps, head.blocks)
    mean, std = torch.from_numpy(head.mean), torch.from_numpy(head.std)
    val = StreamedRows(labeled_table, "val", channels, None)
    cm = evaluate(head.module, val, labeled_table.num_classes, mean, std)
    assert cm.miou() == pytest.approx(result.best["best_val_miou"], abs=1e-9)
    # Restored, not trained again: the same four children, no new one.
    children_again = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children_again) == 4


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["search.timesteps=[[10],[999]]"], "timesteps [999] blocks []; extracted timesteps [10, 100]"),
        (
            ["search.blocks=[[up9.res0]]"],
            "blocks ['up9.res0']; extracted timesteps [10, 100], blocks ['up0.res0'",
        ),
        (["search.lr=[]"], "search space ['lr'] is empty"),
        (["grace_period=9"], "grace_period=9 exceeds head.epochs=4"),
        (
            ["search_mode=grid"],
            "grid has 288 combinations (3 timesteps x 3 blocks x 2 width x 2 lr x 2 dropout x 2 input_noise"
            " x 2 class_weighting) but num_samples=4; raise num_samples to 288",
        ),
    ],
)
def test_bad_search_space(labeled_table, tmp_path, mlflow_uri, extra, needle):
    with pytest.raises(ConfigError) as err:
        run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *extra))
    assert needle in str(err.value)


@pytest.mark.integration
def test_a_grid_sweep_runs_every_combination_once(labeled_table, tmp_path, mlflow_uri, ray_cluster):
    grid = ["search.timesteps=[[10],[100]]", "search.blocks=[[up1.res0],[up2.res1]]", "search.width=[32]",
            "search.lr=[1e-3]", "search.dropout=[0.0]", "search.input_noise=[0.0]",
            "search.class_weighting=[none]", "search_mode=grid", "num_samples=10", "scheduler=fifo",
            "head.epochs=1", "grace_period=1", "name=grid"]  # fmt: skip
    result = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *grid))
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    tried = sorted((c.data.params["timesteps"], c.data.params["blocks"]) for c in children)
    assert tried == [("10", "up1.res0"), ("10", "up2.res1"), ("100", "up1.res0"), ("100", "up2.res1")]
    assert len(result.trials) == 4 and all(c.data.params["width"] == "32" for c in children)
    spec = json.loads((tmp_path / "tune" / "grid" / "rsdiff-sweep.json").read_text())
    assert spec["search_mode"] == "grid"
    with pytest.raises(ConfigError, match="changed: search_mode"):  # the same name, drawn at random
        run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *grid[:-6], "name=grid", "scheduler=fifo",
                       "head.epochs=1", "grace_period=1", "num_samples=10"))  # fmt: skip


@pytest.mark.integration
def test_unreachable_tracking_uri(labeled_table, tmp_path):
    uri = f"http://user:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError, match=r"MLflow tracking URI .* is unreachable") as err:
        run_sweep(_cfg(labeled_table, tmp_path, uri))
    assert "hunter2" not in str(err.value)
    args = ["--config", str(SWEEP), f"features={labeled_table.root}", f"tracking.uri={uri}", *SEARCH]
    proc = run_job_inline("sweep.py", *args)  # a few short probes, not MLflow's minutes of retries
    assert proc.returncode == 2 and "is unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stderr


@pytest.mark.integration
def test_a_rerun_restores_refuses_other_settings_and_never_unpickles_tune_state_from_the_storage(
    labeled_table, tmp_path, mlflow_uri, ray_cluster
):
    """A re-run with the same settings restores the sweep; other settings or another output are
    refused unless ``fresh=true``. Whoever can write the sweep storage (a shared S3 prefix) must
    not get to run code on the driver: Tune's pickles are never read, and a trial record rsdiff did
    not write is refused."""
    import pickle

    small = ["name=trust", "scheduler=fifo", "num_samples=2", "head.epochs=1", "grace_period=1"]
    first = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small))
    again = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small))  # same settings: restored
    assert again.parent_run_id == first.parent_run_id and again.best["trial_id"] == first.best["trial_id"]
    with pytest.raises(ConfigError, match=r"finished trial.* saved their heads under another output than"):
        run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small, f"output={tmp_path / 'elsewhere'}"))
    for extra, needle in [
        (["num_samples=3"], "changed: num_samples"),
        (["search.width=[16]"], "changed: search.width"),
        (["head.dropout=0.3", "seed=5"], "changed: head.dropout, seed"),
    ]:
        with pytest.raises(ConfigError, match="was started with other settings") as err:
            run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small, *extra))
        assert needle in str(err.value) and "fresh=true" in str(err.value)

    experiment = tmp_path / "tune" / "trust"
    tune_runs = len(list(experiment.glob("tune-*")))
    marker = tmp_path / "pwned"
    poison = pickle.dumps(PicklePayload(str(marker)))
    for folder in [experiment, *experiment.glob("tune-*")]:  # every file Tune would unpickle on restore
        for name in ("tuner.pkl", "trainable.pkl", "search_gen_state-x.pkl"):
            (folder / name).write_bytes(poison)
    # An interrupted sample: its record says running, so the re-run runs it again (from scratch).
    record = experiment / "trials" / "s0001.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
    again = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small))
    assert not marker.exists()
    assert again.parent_run_id == first.parent_run_id
    assert sorted(t["trial_id"] for t in again.trials) == ["s0000", "s0001"]
    assert json.loads(record.read_text())["status"] == "finished"
    # A new Tune experiment ran only the unfinished one.
    assert len(list(experiment.glob("tune-*"))) == tune_runs + 1
    # A record rsdiff did not write is refused with one line, not trusted.
    record.write_text(json.dumps({"sample": 7, "status": "finished", "history": []}))
    with pytest.raises(ConfigError, match=r"s0001\.json is not a trial record this sweep wrote"):
        run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small))

    fresh = run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small, "num_samples=1", "fresh=true"))
    assert fresh.parent_run_id != first.parent_run_id and len(fresh.trials) == 1
    (experiment / "rsdiff-sweep.json").unlink()  # state rsdiff did not describe
    with pytest.raises(ConfigError, match=r"trial records without a readable rsdiff-sweep\.json"):
        run_sweep(_cfg(labeled_table, tmp_path, mlflow_uri, *small, "num_samples=1"))


@pytest.mark.unit
def test_grid_samples_are_every_combination_in_a_fixed_order():
    space = {"timesteps": [[50], [150, 250]], "blocks": [["up0.res1"]], "width": [64, 128]}
    assert grid_samples(space) == [
        {"timesteps": [50], "blocks": ["up0.res1"], "width": 64},
        {"timesteps": [50], "blocks": ["up0.res1"], "width": 128},
        {"timesteps": [150, 250], "blocks": ["up0.res1"], "width": 64},
        {"timesteps": [150, 250], "blocks": ["up0.res1"], "width": 128},
    ]
    cfg = load_config(SweepConfig, SWEEP, ["features=x", "search_mode=grid", "num_samples=1"])
    assert trial_settings(cfg) == grid_samples(to_container(cfg.search))  # 5 x 4 x 1 x 2 x 3 x 2 x 2 x 2
    assert len(trial_settings(cfg)) == 5 * 4 * 2 * 2 * 3 * 2 * 2 * 2
    random = load_config(SweepConfig, SWEEP, ["features=x", "num_samples=3"])
    assert trial_settings(random) == draw_samples(to_container(random.search), 3, 0)


@pytest.mark.unit
def test_how_trials_ended_is_recorded_so_a_rerun_runs_only_the_unfinished(tmp_path):
    """Finished and stopped-early samples are done; failed ones, and ones the time budget never
    started (no record at all), run again."""
    from types import SimpleNamespace

    from rsdiff.sweep.records import mark_ended, read_records, write_record

    exp = str(tmp_path / "exp")
    for sample, status in [(0, "finished"), (1, "running"), (2, "running")]:
        write_record(exp, {"sample": sample, "trial_id": f"s{sample:04d}", "status": status,
                            "history": [{"epoch": 1, "val_miou": 0.5}]})  # fmt: skip
    grid = [
        SimpleNamespace(config={"sample": 0}, error=None),
        SimpleNamespace(config={"sample": 1}, error=None),  # stopped by the scheduler
        SimpleNamespace(config={"sample": 2}, error=RuntimeError("boom")),
        SimpleNamespace(config={"sample": 3}, error=None),  # never started
    ]
    mark_ended(grid, exp, 4)
    status = {k: v["status"] for k, v in read_records(exp, 4).items()}
    assert status == {0: "finished", 1: "stopped_early", 2: "error"}


@pytest.mark.unit
def test_a_sweep_without_a_head_names_its_cause_not_always_the_time_budget():
    from rsdiff.sweep.report import no_trial_finished

    def rec(status: str, **extra) -> dict:
        return {"status": status, "history": [], **extra}

    assert "another output than out" in no_trial_finished({0: rec("finished")}, "out", None)
    failed = no_trial_finished({0: rec("error", error="EOFError: truncated cache entry")}, "out", 60)
    assert failed == "all 1 trial(s) that ran failed; the first error: EOFError: truncated cache entry"
    assert "no trial started within time_budget_s=60" in no_trial_finished({}, "out", 60)
    assert "stopped before it saved a head" in no_trial_finished({0: rec("stopped_early")}, "out", 60)


@pytest.mark.unit
def test_block_sets_have_short_ids_and_a_deepest_level_for_the_compare_view():
    assert block_set_id(["up1.res0", "up1.res1", "up2.res0"]) == "u1:01+u2:0"
    assert block_set_id(["up2.res1", "mid", "up0.upsample"]) == "mid+u0:U+u2:1"
    assert deepest_level(["up1.res0", "up2.res0"]) == 1 and deepest_level(["mid", "up3.res0"]) == -1
