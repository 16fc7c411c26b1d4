"""Hostile stores and unlucky stops: what a signal, a second writer, a moved or mixed prediction
folder, a corrupt checkpoint, damaged shards and a password in a URI do to each job.

Signals are sent the way a terminal sends Ctrl-C: to the job's whole process group, with SIGINT
not ignored.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_job_inline, wait_for
from mlflow import MlflowClient
from s3_fault_proxy import FaultyS3Proxy
from test_faults import TINY_FAST

from rsdiff import storage
from rsdiff.config import load_config, redact, redact_uri, to_yaml
from rsdiff.errors import CheckpointError, ConfigError, DataError, describe_os_error
from rsdiff.lease import LEASE, Lease, LeaseHeld, LeaseLost, holder, record_lock

SAMPLE = REPO / "configs" / "ingest" / "sample.yaml"


def _start(script: str, *args: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    """``python jobs/<script>`` in its own process group (as a shell runs a foreground job)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _started(proc: subprocess.Popen, log: Path, marker: str) -> None:
    """Wait until ``marker`` (the job's progress bar) shows in its stderr."""

    def shown() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return marker in log.read_text()

    wait_for(shown, f"{marker!r} in the job's log", timeout_s=300)


def _ctrl_c_when(proc: subprocess.Popen, log: Path, marker: str) -> None:
    """Wait until ``marker`` shows in the job's stderr, then SIGINT its process group and wait for
    the job to exit (``proc.wait`` raises if it hangs instead of stopping)."""
    _started(proc, log, marker)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)


@pytest.fixture(scope="module")
def big_scenes(tmp_path_factory) -> Path:
    """Scenes large enough that ingest and predict are still working when Ctrl-C arrives."""
    from rsdiff.data.synthetic import write_sample_dataset

    folder = tmp_path_factory.mktemp("big")
    write_sample_dataset(folder, scenes=6, height=768, width=768)
    return folder


def _one_error_line(err: str, job: str, text: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"rsdiff {job}: ")]
    assert len(lines) == 1 and text in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def _temp_left(kind: str, since: float) -> list[Path]:
    """``rsdiff-{kind}-*`` temp folders made since ``since`` that are still there."""
    import tempfile

    return [d for d in Path(tempfile.gettempdir()).glob(f"rsdiff-{kind}-*") if d.stat().st_mtime >= since - 1]


@pytest.mark.unit
def test_temp_folders_of_killed_tasks_are_removed_and_live_ones_kept():
    from rsdiff.tempfiles import remove_orphans, task_tempdir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    import tempfile

    orphan = Path(tempfile.mkdtemp(prefix=f"rsdiff-predict-{int(dead.stdout)}-"))
    (orphan / "scene.tif").write_bytes(b"")
    live = task_tempdir("shard")
    assert remove_orphans() >= 1
    assert not orphan.exists() and Path(live.name).exists()
    live.cleanup()


@pytest.mark.unit
def test_a_shard_writer_interrupted_as_an_upload_returns_deletes_that_shard_too(tmp_path, monkeypatch):
    """Ctrl-C reaches an ingest task as a KeyboardInterrupt (the job interrupts its tasks first),
    which can land just after a shard's upload returned: the writer's abort deletes that shard
    with the others, so nothing it published is left."""
    from rsdiff.data.shards import Sample, ShardWriter

    upload = storage.upload

    def upload_then_interrupt(path, uri):
        upload(path, uri)
        if uri.endswith("-00001.tar"):
            raise KeyboardInterrupt

    monkeypatch.setattr(storage, "upload", upload_then_interrupt)
    tile = np.zeros((4, 16, 16), np.uint16)
    with pytest.raises(KeyboardInterrupt), ShardWriter(str(tmp_path), "train-0000", max_bytes=1) as writer:
        for i in range(4):  # a shard per sample
            writer.write(Sample(f"s/{i}", tile, None, {}))
    assert not list(tmp_path.glob("*.tar")) and not Path(writer._tmpdir.name).exists()


@pytest.mark.e2e
def test_ctrl_c_stops_ingest_at_once_and_leaves_no_shard_manifest_or_temp_folder(big_scenes, tmp_path):
    """A fresh local Ray, as a user's terminal session has; the whole group gets SIGINT once the
    first shards are published (small shards, so some are)."""
    log = tmp_path / "stderr.txt"
    out = tmp_path / "shards"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", str(SAMPLE),
         f"inputs=[{big_scenes}/images/*.tif]", f"output={out}", "ray.num_cpus=2", "parallelism=6",
         "shard_max_mb=0.1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    started = time.time()

    def published() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return any(out.glob("*.tar"))

    wait_for(published, "a published shard", timeout_s=300)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    _one_error_line(err, "ingest", "stopped by SIGINT; no manifest.json was written and the shards written")
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tar")), err[-3000:]  # the interrupted tasks deleted what they published
    assert not _temp_left("shard", started)  # and their half-filled shards


@pytest.mark.integration
def test_a_task_that_ignores_the_interrupt_is_killed_and_its_temp_folder_removed(ray_cluster, tmp_path):
    """``stop_tasks`` interrupts first; a task that swallows the KeyboardInterrupt is killed after
    the grace period, and its temporary folder goes once its process is gone."""
    import ray

    from rsdiff.raytools import stop_tasks

    @ray.remote(num_cpus=0)
    def stubborn(flag: str) -> None:
        import contextlib

        from rsdiff.tempfiles import task_tempdir

        folder = task_tempdir("shard")
        Path(flag).write_text(folder.name)
        while True:
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.05)

    flag = tmp_path / "folder.txt"
    ref = stubborn.remote(str(flag))
    wait_for(flag.exists, "the task's temp folder", timeout_s=120)
    folder = Path(flag.read_text())
    assert folder.is_dir()
    stop_tasks([ref], grace_s=1.0)
    assert not folder.exists()
    with pytest.raises(ray.exceptions.RayError):
        ray.get(ref, timeout=30)


@pytest.mark.e2e
def test_sigterm_stops_predict_like_ctrl_c_marks_the_run_killed_and_drops_the_old_marker(
    sample_demo, big_scenes, tmp_path, mlflow_uri, ray_address
):
    """SIGTERM, what `kill` and most schedulers send, to the job alone (Ctrl-C's SIGINT to the whole
    group is the ingest and pretraining tests'). An interrupted ``overwrite=true`` leaves no
    predictions.json beside a mix of old and new maps, and no half-written map."""
    out = tmp_path / "maps"
    shutil.copytree(sample_demo / "predictions", out)  # a complete earlier prediction run
    assert (out / "predictions.json").exists()
    log = tmp_path / "stderr.txt"
    proc = _start(
        "predict.py", f"head={sample_demo / 'sweep' / 'best'}", f"inputs=[{big_scenes}/images/*.tif]",
        f"output={out}", "overwrite=true", f"tracking.uri={mlflow_uri}", env=ray_address, log=log,
    )  # fmt: skip
    started = time.time()
    _started(proc, log, "predict:")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    _one_error_line(err, "predict", "stopped by SIGTERM")
    assert not (out / "predictions.json").exists()
    assert not _temp_left("predict", started)  # the killed scene tasks' half-written maps are gone
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("rsdiff-predict").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    proc = run_job_inline("evaluate.py", f"predictions={out}", f"tracking.uri={mlflow_uri}")
    assert proc.returncode == 2 and "no predictions.json" in proc.stderr


@pytest.mark.e2e
def test_ctrl_c_stops_pretraining_at_once_and_names_the_checkpoint_a_rerun_resumes_from(
    sample_demo, tmp_path, mlflow_uri, ray_address
):
    """Ray Train's own Ctrl-C asked its controller to abort: training went on, wrote checkpoints it
    never registered, and the job exited 1 without a word of rsdiff's, its run FAILED."""
    log, run = tmp_path / "stderr.txt", tmp_path / "runs" / "ctrl-c"
    proc = _start(
        "pretrain.py", *TINY_FAST, f"data.shards={sample_demo / 'shards'}", "optim.max_steps=100000",
        "checkpoint.every_steps=2", "checkpoint.keep=1000", f"run.storage={run.parent}", "run.name=ctrl-c",
        f"tracking.uri={mlflow_uri}", env=ray_address, log=log,
    )  # fmt: skip
    snapshot = run / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return snapshot.exists() and "checkpoint_0000" in snapshot.read_text()

    wait_for(registered, "a registered checkpoint", timeout_s=300)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    at_exit = sorted(p.name for p in run.glob("checkpoint_0*"))
    time.sleep(5)  # ranks that outlived the job would go on writing checkpoints
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == at_exit
    # Ray Train's PlacementGroupCleaner prints a traceback at start-up when a second Ray instance
    # runs on the machine (it connects with address="auto"); that is not the stop's doing.
    err = "\n".join(ln for ln in log.read_text().splitlines() if "(PlacementGroupCleaner pid=" not in ln)
    assert proc.returncode == 130, err[-3000:]
    last = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    _one_error_line(err, "pretrain", f"stopped by SIGINT; the last complete checkpoint is {run / last} (step")
    # Ray Train registers a checkpoint after the ranks have written it, so folders beyond ``last``
    # may exist at exit (how many depends on the controller's lag); a re-run resumes from the
    # snapshot's ``last``, never from them.
    assert last in at_exit, (at_exit, last)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("rsdiff-pretrain").experiment_id],
                              "tags.mlflow.runName = 'ctrl-c'")  # fmt: skip
    assert [r.info.status for r in runs] == ["KILLED"]


# ----------------------------------------------------------------------------------------------
# Prediction folders: relative, moved, mixed.


def _predict(head, scenes, out, *extra):
    from rsdiff.prediction.config import PredictConfig
    from rsdiff.prediction.run import run_predict

    return run_predict(
        load_config(
            PredictConfig,
            None,
            [f"head={head}", f"inputs=['{scenes}']", f"output={out}", "tracking.enabled=false", *extra],
        )
    )


def _evaluate(folder, **kw):
    from rsdiff.evaluate import EvaluateConfig, run_evaluate

    args = [f"predictions={folder}", "labels.mask_template={dir}/../labels/{stem}.tif", "labels.kind=index",
            "tracking.enabled=false", *[f"{k}={v}" for k, v in kw.items()]]  # fmt: skip
    return run_evaluate(load_config(EvaluateConfig, None, args))


@pytest.mark.integration
def test_prediction_folders_move_whole_and_refuse_a_mix_of_runs(
    sample_demo, sample_scenes, tmp_path, ray_cluster
):
    head = sample_demo / "sweep" / "best"
    scenes = f"{sample_scenes}/images/scene_0[01].tif"
    first = _predict(head, scenes, tmp_path / "a", "tracking.uri=http://user:hunter2@127.0.0.1:9")
    _predict(head, scenes, tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert summary["run_id"] and all(s["class_map"] == f"{s['scene']}.tif" for s in summary["scenes"])
    assert "hunter2" not in (tmp_path / "a" / "predictions.json").read_text()  # the password never lands
    reference = _evaluate(tmp_path / "a").metrics

    # Moved: the folder scores its own maps (the original is gone).
    (tmp_path / "a").rename(tmp_path / "moved")
    moved = _evaluate(tmp_path / "moved", output=tmp_path / "m.json").metrics
    assert moved["miou"] == reference["miou"] and moved["predictions"] == str(tmp_path / "moved")

    # Mixed: one map from another run beside this run's predictions.json is refused.
    shutil.copy(tmp_path / "b" / "scene_01.tif", tmp_path / "moved" / "scene_01.tif")
    with pytest.raises(DataError, match="not written by the prediction run"):
        _evaluate(tmp_path / "moved", output=tmp_path / "mix.json")
    assert not (tmp_path / "mix.json").exists()

    # A predictions.json naming maps outside its folder (older rsdiff, moved; or edited) is refused.
    summary["scenes"][0]["class_map"] = str(Path(first.output) / "scene_00.tif")
    (tmp_path / "b" / "predictions.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="outside that folder"):
        _evaluate(tmp_path / "b", output=tmp_path / "out.json")


# ----------------------------------------------------------------------------------------------
# Artifacts that do not belong together.


@pytest.mark.integration
def test_a_head_refuses_another_model_behind_its_checkpoint_uri_and_metadata_larger_than_its_weights(
    sample_demo, tmp_path
):
    """The head records the sha256 of the EMA weights its features came from: a checkpoint
    re-written at the same URI (here: an earlier checkpoint of the same run copied over it) is
    refused by predict with one line. A head.json describing a far larger head than head.pt holds
    is refused before anything is allocated."""
    from rsdiff.heads.artifact import TrainedHead

    ckpts = sorted((sample_demo / "ray" / "demo-pretrain").glob("checkpoint_0*"))
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpts[-1], moved)
    head = tmp_path / "head"
    shutil.copytree(sample_demo / "sweep" / "best", head)
    meta = json.loads((head / "head.json").read_text())
    assert len(meta["checkpoint_sha256"]) == 64
    (head / "head.json").write_text(json.dumps({**meta, "checkpoint": str(moved)}))
    scene = sorted((sample_demo / "scenes" / "images").glob("*.tif"))[0]
    argv = [f"head={head}", f"inputs=[{scene}]", "ray.num_cpus=1"]
    assert run_job_inline("predict.py", *argv, f"output={tmp_path / 'ok'}").returncode == 0  # same model
    shutil.rmtree(moved / "ema")
    shutil.copytree(ckpts[0] / "ema", moved / "ema")  # another model behind the same URI
    done = run_job_inline("predict.py", *argv, f"output={tmp_path / 'p'}")
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert f"the checkpoint at {moved} is not the model head {head} was made from" in line, line
    meta["config"]["width"] = 10**7  # ~10^14 parameters if it were built
    (head / "head.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"describes a model \([\d,]+ parameters\) that its weights do not fit"
    ):
        TrainedHead.load(str(head))


# ----------------------------------------------------------------------------------------------
# fresh=true deletes only what the job itself wrote.


@pytest.mark.integration
def test_demo_fresh_deletes_only_its_own_outputs_and_only_once_its_checks_passed(sample_demo, tmp_path):
    # The session's demo ran with fresh=true over a user's file and a stale output of its own.
    assert (sample_demo / "notes-of-the-user.txt").read_text() == "keep me"
    assert not (sample_demo / "sweep" / "from-an-earlier-demo.json").exists()
    assert (sample_demo / "sweep" / "summary.json").exists()
    # A config that fails its checks deletes nothing.
    work = tmp_path / "work"
    (work / "features").mkdir(parents=True)
    (work / "features" / "table.json").write_text("{}")
    (tmp_path / "a-folder").mkdir()
    done = run_job_inline(
        "demo.py", f"workdir={work}", "fresh=true", f"tracking_uri=sqlite:///{tmp_path / 'a-folder'}"
    )
    assert done.returncode == 2 and "is a folder, not a database file" in done.stderr
    assert (work / "features" / "table.json").exists()


@pytest.mark.integration
def test_a_sweep_pointed_at_a_folder_it_does_not_own_refuses_to_write_or_delete_there(sample_demo, tmp_path):
    shards = tmp_path / "data" / "shards"
    shutil.copytree(sample_demo / "shards", shards)
    before = sorted(p.name for p in shards.iterdir())
    for fresh in ("fresh=false", "fresh=true"):
        done = run_job_inline("sweep.py", f"features={sample_demo / 'features'}",
                              f"storage={tmp_path / 'data'}", "name=shards", f"output={tmp_path / 'out'}",
                              fresh)  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        line = done.stderr.strip().splitlines()[-1]
        assert (
            "which holds an ingest output (a shard manifest and its shards) (manifest.json), not a sweep's"
            in line
        )
        assert "pick another storage= or name=" in line and "Ray Tune" not in line
        assert sorted(p.name for p in shards.iterdir()) == before  # no lease written, nothing deleted


# ----------------------------------------------------------------------------------------------
# One writer per run: leases.


@pytest.mark.unit
def test_a_live_lease_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path, bucket):
    for folder in (str(tmp_path / "run"), f"{bucket}/runs/run"):
        first = Lease(folder, "run.name=run", ttl_s=60)
        first.acquire()
        with pytest.raises(LeaseHeld, match=r"run\.name=run is in use by another live job"):
            Lease(folder, "run.name=run").acquire()
        first.release()
        with Lease(folder, "run.name=run"):  # free again
            pass
        assert not storage.exists(storage.join(folder, LEASE))
        # Stale: the holder's heartbeat is older than the TTL (another host that went away).
        old = {"owner": "x", "host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time() - 600}
        storage.write_text(storage.join(folder, LEASE), json.dumps(old))
        with Lease(folder, "run.name=run", ttl_s=60) as taken:
            assert json.loads(storage.read_text(storage.join(folder, LEASE)))["owner"] == taken.owner
        # Dead: a process of this host that no longer exists (a killed driver resubmitted at once).
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        gone = {"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout), "started": 0,
                "heartbeat": time.time()}  # fmt: skip
        storage.write_text(storage.join(folder, LEASE), json.dumps(gone))
        with Lease(folder, "run.name=run"):
            pass


@pytest.mark.unit
def test_heartbeat_keeps_the_lease_live_and_notices_a_takeover(tmp_path):
    folder = str(tmp_path / "run")
    path = Path(folder) / LEASE
    stopped = []
    with Lease(folder, "x", ttl_s=0.8) as lease:
        lease.on_lost = lambda: stopped.append(time.time())
        first = json.loads(path.read_text())["heartbeat"]
        # Refreshed past the TTL after which an unrefreshed lease would count as dead.
        wait_for(lambda: json.loads(path.read_text())["heartbeat"] > first + 0.8, "two heartbeats", 30)
        with pytest.raises(LeaseHeld):
            Lease(folder, "x", ttl_s=0.8).acquire()
        lease.check()  # still ours: no error
        with record_lock(str(path)):  # as a claimant writes it
            path.write_text(
                json.dumps({"owner": "thief", "host": "h2", "pid": 7, "heartbeat": time.time() + 60})
            )
        wait_for(lambda: lease.lost, "the holder to notice the takeover", 30)
        assert len(stopped) == 1  # the job's stop switch was pulled once
        assert holder(str(path)) == "thief"
        with pytest.raises(LeaseLost, match=r"x: this job lost its lease .*: another job took it over \(now "
                           r"held by host h2, pid 7\); it stopped without writing more"):  # fmt: skip
            lease.check()
    assert json.loads(path.read_text())["owner"] == "thief"  # leaving does not delete another's lease


@pytest.mark.unit
def test_a_holder_whose_heartbeats_cannot_reach_the_store_past_the_ttl_stops(
    s3_endpoint, bucket, monkeypatch
):
    """Heartbeats failing for longer than the TTL (the store out of reach from this job only) mean
    another job may already have taken the lease over: the holder stops rather than write on."""
    monkeypatch.setenv("RSDIFF_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # each failing heartbeat fails at once, not after backoff
    stopped = []
    with FaultyS3Proxy(s3_endpoint, max_faults=0) as proxy, monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._client_for_pid.cache_clear()
        try:
            lease = Lease(f"{bucket}/runs/cut-off", "run.name=cut-off", ttl_s=1.0)
            lease.acquire()
            lease.on_lost = lambda: stopped.append(time.time())
            time.sleep(0.6)
            assert not lease.lost
            proxy.down = True
            wait_for(lambda: lease.lost, "the holder to give up", 60)
            assert len(stopped) == 1 and "no heartbeat reached the store for" in lease.lost_reason
            proxy.down = False
            with pytest.raises(LeaseLost, match="the lease's TTL is 1 s"):
                lease.check()
            lease.release()
        finally:
            storage._client_for_pid.cache_clear()


@pytest.mark.unit
def test_leases_are_refused_on_an_s3_store_that_ignores_conditional_writes(s3_endpoint, bucket, monkeypatch):
    with (
        FaultyS3Proxy(s3_endpoint, max_faults=0, strip_conditions=True) as proxy,
        monkeypatch.context() as env,
    ):
        env.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._client_for_pid.cache_clear()
        try:
            with pytest.raises(ConfigError, match=r"ignores conditional writes \(If-None-Match, If-Match was "
                               r"accepted where it must be refused\)"):  # fmt: skip
                Lease(f"{bucket}/runs/lax", "run.name=lax").acquire()
        finally:
            storage._client_for_pid.cache_clear()
    assert not storage.list_uris(f"{bucket}/runs/lax")  # neither a lease nor the probe left behind
    with Lease(f"{bucket}/runs/lax", "run.name=lax"):  # the same bucket straight on the server: fine
        pass


@pytest.mark.integration
def test_pretraining_refuses_a_run_name_another_live_job_holds(sample_demo, tmp_path):
    folder = tmp_path / "runs" / "busy"
    folder.mkdir(parents=True)
    live = {"owner": "z", "host": "other-host", "pid": 4242, "started": time.time(), "heartbeat": time.time()}
    (folder / LEASE).write_text(json.dumps(live))
    argv = [f"data.shards={sample_demo / 'shards'}", f"run.storage={tmp_path / 'runs'}", "run.name=busy"]
    done = run_job_inline("pretrain.py", *argv)
    code, err = done.returncode, done.stderr
    assert code == 2
    _one_error_line(err, "pretrain", "run.name=busy in ")
    assert "host other-host, pid 4242" in err and not list(folder.glob("checkpoint_*"))


@pytest.mark.integration
def test_pretraining_that_loses_its_lease_stops_writing_at_once_and_fails_its_run(
    sample_demo, tmp_path, mlflow_uri, monkeypatch
):
    """Another job takes the run folder's lease at step 4: the checkpoint of step 4 is never
    written (rank 0 checks the lease first), the job stops with one line, its MLflow run is FAILED,
    and every checkpoint left in the folder was written by this job before the takeover."""
    from step_faults import TakeLease

    from rsdiff.diffusion.checkpoint import read_meta
    from rsdiff.pretrain import run_pretrain
    from rsdiff.train.config import PretrainConfig

    monkeypatch.setattr("rsdiff.lease.TTL_S", 4.0)  # the driver's heartbeat every second
    argv = [*TINY_FAST[2:], f"data.shards={sample_demo / 'shards'}", f"run.storage={tmp_path / 'runs'}",
            "run.name=taken", "optim.max_steps=40", "checkpoint.every_steps=2", "checkpoint.keep=50",
            f"tracking.uri={mlflow_uri}", "run.max_failures=3"]  # fmt: skip
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", argv)
    with pytest.raises(LeaseLost, match=r"run\.name=taken in .*: this job lost its lease .*another job"):
        run_pretrain(cfg, after_step=TakeLease(4, tmp_path / "taken.marker"))
    run_dir = tmp_path / "runs" / "taken"
    assert (tmp_path / "taken.marker").exists()
    written = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert written == ["checkpoint_00000002"], written
    assert read_meta(str(run_dir / written[0]))["writer"] not in (None, "the-other-job")
    assert holder(str(run_dir / LEASE)) == "the-other-job"  # the new owner's lease is left alone
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("rsdiff-pretrain").experiment_id]
    )
    mine = [r for r in runs if r.data.tags.get("rsdiff.run", "").endswith("taken")]
    assert [r.info.status for r in mine] == ["FAILED"]


# ----------------------------------------------------------------------------------------------
# Checkpoints and shards that went bad.


@pytest.mark.e2e
def test_extract_on_one_cpu_skips_damaged_samples_and_names_their_shard(sample_demo, tmp_path):
    """One CPU in Ray (a 1-vCPU machine): the feature actor must not starve the shard reads."""
    import webdataset as wds

    from rsdiff.data.shards import encode_sample, iter_shard

    shards = tmp_path / "shards"
    shutil.copytree(sample_demo / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    good = next(iter_shard(str(shards / manifest["shards"]["train"][0])))
    flat = io.BytesIO()
    np.save(flat, good.image[0], allow_pickle=False)  # a 2-D tile: malformed
    with wds.TarWriter(str(shards / "train-bad-00000.tar"), encoder=False) as tar:
        tar.write({**encode_sample(good), "__key__": "flat", "tile.npy": flat.getvalue()})
        tar.write({**encode_sample(good), "__key__": "fine"})
    manifest["shards"]["train"].append("train-bad-00000.tar")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "extract.py"), "--config", "configs/extract/tiny.yaml",
         f"checkpoint={sorted((sample_demo / 'ray' / 'demo-pretrain').glob('checkpoint_0*'))[-1]}",
         f"shards={shards}", f"output={tmp_path / 'features'}", "pixels_per_class=8", "ray.num_cpus=1",
         "timesteps=[50]", "blocks=[mid]"],  # one small feature map: the reads are what this is about
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "features" / "table.json").read_text())
    assert meta["skipped_bad_samples"] == 1 and meta["skipped_bad_shards"] == 0
    assert "train-bad-00000.tar: sample flat" in meta["damage_examples"][0]
    assert "train-bad-00000.tar" in proc.stderr  # the warning names the shard


# ----------------------------------------------------------------------------------------------
# Small pieces, at the unit level.


@pytest.mark.unit
def test_the_whole_userinfo_of_a_uri_is_masked_by_one_rule_wherever_it_is_shown():
    """A token given as the user name and a password with an unencoded ``@`` leaked before."""
    from rsdiff.provenance import command_line

    for uri, shown in [
        ("https://ghp_T0KEN@mlflow.example/x", "https://***@mlflow.example/x"),
        ("http://me:p@ss:w0rd@mlflow:5000", "http://***@mlflow:5000"),
        ("http://me:hunter2@mlflow:5000/api?x=1", "http://***@mlflow:5000/api?x=1"),
        ("s3://bucket/key@v2", "s3://bucket/key@v2"),
        ("sqlite:///runs/a@b.db", "sqlite:///runs/a@b.db"),
    ]:
        assert storage.display(uri) == shown and redact_uri(uri) == shown
        assert redact({"tracking": {"uri": uri}}) == {"tracking": {"uri": shown}}
    line = command_line(["jobs/sweep.py", "tracking.uri=https://ghp_T0KEN@h/x", "head=http://u:p@ss@h/y"])
    assert "T0KEN" not in line and "ss@" not in line and line.count("***@h/") == 2


@pytest.mark.unit
def test_a_sqlite_tracking_uri_that_is_a_folder_is_one_line_at_once(tmp_path):
    """It took 104 s of sqlite retries before."""
    from rsdiff.errors import ConfigError
    from rsdiff.tracking import client, resolve_uri

    t0 = time.monotonic()
    with pytest.raises(
        ConfigError, match=f"is a folder, not a database file: .*sqlite:///{tmp_path}/mlflow.db"
    ):
        client(resolve_uri(f"sqlite:///{tmp_path}"))
    assert time.monotonic() - t0 < 5


@pytest.mark.unit
def test_passwords_in_uris_are_masked_everywhere_a_config_goes():
    from rsdiff.prediction.config import PredictConfig

    cfg = load_config(
        PredictConfig, None, ["head=h", "inputs=[x]", "tracking.uri=https://me:hunter2@mlflow:5000"]
    )
    assert "hunter2" not in to_yaml(cfg) and "https://***@mlflow:5000" in to_yaml(cfg)
    assert redact({"a": ["s3://b/k", "http://u:p@h/x"]}) == {"a": ["s3://b/k", "http://***@h/x"]}
    from rsdiff.tracking import config_params

    assert "hunter2" not in json.dumps(config_params(cfg))


@pytest.mark.unit
def test_os_errors_a_user_can_fix_become_one_line(tmp_path):
    with pytest.raises(OSError) as full, open("/dev/full", "wb") as f:  # a real ENOSPC
        f.write(b"x" * 10)
        f.flush()
    assert describe_os_error(full.value).startswith("no space left on the device")
    # The device is named, not only the (often temporary) file being written; an error without a
    # path names the file system holding the job's output.
    staged = OSError(28, "No space left on device", str(tmp_path / ".tmp-x" / "part.npz"))
    assert f"writing {tmp_path}/.tmp-x/part.npz (the file system mounted at /" in describe_os_error(staged)
    assert f"writing under {tmp_path} (the file system mounted at /" in describe_os_error(
        full.value, str(tmp_path)
    )
    assert "GB free)" in describe_os_error(full.value, str(tmp_path))
    assert describe_os_error(PermissionError(13, "Permission denied", "/x/y")).startswith(
        "permission denied on /x/y"
    )
    assert describe_os_error(OSError(5, "EIO")) is None  # not the user's to fix: a traceback, as a bug


@pytest.mark.unit
def test_names_that_would_leave_their_root_are_refused():
    from rsdiff.errors import ConfigError

    for bad in ("../x", "/abs", "a/b", "..", "", ".hidden", "a..b", "x" * 129, "a b"):
        with pytest.raises(ConfigError, match="not a plain name"):
            storage.check_name(bad, "run.name")
    assert storage.check_name("pretrain-tiny_2.v1", "run.name") == "pretrain-tiny_2.v1"
