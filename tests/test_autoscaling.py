"""Pretraining on an autoscaling cluster made from ``cluster/aws.yaml``'s node types (Ray's fake
multi-node provider, :mod:`fake_cluster`): one spot run, sent with ``ray job submit`` (token auth
on), scales the cluster up from zero, loses a node, resumes from the S3 checkpoint on its
replacement and leaves the cluster to scale back down; a rank no node type can hold fails at once;
local checkpoint storage is refused.

One fake cluster serves the whole module. Checkpoints and shards live in the loopback S3 server.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import REPO, free_port, upload_tree, wait_for
from fake_cluster import FakeCluster, fake_provider_config, start_env

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.ingest import run_ingest

pytestmark = pytest.mark.e2e

AWS = REPO / "cluster" / "aws.yaml"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
IDLE_MINUTES = 0.25  # workers idle this long are removed (cluster/aws.yaml: 10)
TRAIN = [
    "--config", "configs/pretrain/tiny.yaml", "model.image_size=32", "data.batch_size=4",
    "data.num_workers=0", "data.shuffle_buffer=8", "optim.warmup_steps=2", "tracking.log_every=1",
    "tracking.sample_every=1000", "tracking.sample_count=2", "tracking.sample_steps=2",
    "scaling.num_workers=2", "scaling.cpus_per_worker=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """The fake autoscaling cluster, head only (``CPU: 0``), with token auth and the S3 env."""
    work = tmp_path_factory.mktemp("fake-cluster")
    gcs = free_port()
    config = fake_provider_config(AWS, gcs_port=gcs, idle_timeout_minutes=IDLE_MINUTES, max_workers=3)
    bindir = Path(sys.executable).parent
    token = work / "auth_token"  # what aws.yaml's file_mounts puts in ~/.ray/auth_token on each node
    token.write_text(secrets.token_hex(16))
    env = {
        **os.environ,
        **start_env(AWS),  # RAY_AUTH_MODE=token, as aws.yaml starts Ray on its nodes
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",  # a node gone silent this long is replaced (default 30)
        # The GCS declares a node dead after 3 missed 1 s health checks (default 5 of 3 s: 15 s).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_DEDUP_LOGS": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no 30 s drain when a node is stopped
        "RSDIFF_REPO": str(REPO),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # the session cluster's; nodes go away here
    fake = FakeCluster(config, gcs, free_port(), env, work / "head.log")
    try:
        fake.start(work)
    except (RuntimeError, TimeoutError, OSError) as exc:
        fake.stop()
        pytest.skip(f"Ray's fake autoscaling provider cannot run on this machine: {exc}")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def s3_shards(sample_scenes, tmp_path_factory, s3_endpoint, ray_cluster) -> str:
    """The generated sample ingested and uploaded to a bucket of its own; its ``s3://`` prefix."""
    local = tmp_path_factory.mktemp("autoscale-shards") / "sample"
    preset = REPO / "configs" / "ingest" / "sample.yaml"
    inputs = f"inputs=[{sample_scenes}/images/*.tif]"
    run_ingest(load_config(IngestConfig, preset, [inputs, f"output={local}"]))
    name = f"rsdiff-scale-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    upload_tree(local, f"s3://{name}/shards")
    return f"s3://{name}"


def _submit(cluster: FakeCluster, *overrides: str, wait: bool = True, timeout: float = 600):
    return cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
        *([] if wait else ["--no-wait"]), "--", "python", "jobs/pretrain.py", *TRAIN, *overrides,
        timeout=timeout,
    )  # fmt: skip


def _job_id(submit_output: str) -> str:
    return re.search(r"raysubmit_\w+", submit_output).group(0)


def _job_status(cluster: FakeCluster, job: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return cluster.job_status(job)


def _mlflow_run(mlflow_uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("rsdiff-pretrain").experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{name}'",
    )
    assert len(runs) == 1, runs
    return client, runs[0]


def _placements(run) -> dict[int, list[str]]:
    """Node id of each rank at each (re)start, keyed by the step it started at."""
    prefix = "rsdiff.placement.from_step_"
    return {int(k[len(prefix) :]): json.loads(v) for k, v in run.data.tags.items() if k.startswith(prefix)}


def _wait_idle(cluster: FakeCluster, what: str) -> None:
    wait_for(lambda: not cluster.workers(), what, timeout_s=IDLE_MINUTES * 60 + 120, poll_s=3)


def test_a_rank_no_node_type_offers_fails_at_once_naming_the_resource(cluster, s3_shards, tmp_path):
    """``accelerator_type=H100`` on a cluster of A10G and A100 node types: one clear error within a
    minute, no node launched, instead of a job pending forever; and no resource request left behind
    for the autoscaler to act on after the job (it once launched a third node for the next job)."""
    t0 = time.monotonic()
    proc = _submit(
        cluster, f"data.shards={s3_shards}/shards", f"run.storage={s3_shards}/runs", "run.name=h100",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "scaling.use_gpu=true",
        "scaling.accelerator_type=H100", "optim.max_steps=5", timeout=300,
    )  # fmt: skip
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "no node type of this cluster can hold one training rank" in out, out[-3000:]
    assert "accelerator_type:H100" in out and "scaling.accelerator_type" in out
    # rsdiff's error is its last word, with no traceback. Ray Train 2.60's placement-group cleaner,
    # whose controller rsdiff killed, calls ray.actor.exit_actor() from its monitor thread, whose
    # exception Python's thread hook prints as a traceback; Ray forwards it to the job when it comes
    # before the job ends. Ray's line prefix names it, and it is left out here (seen once, 2026-12-04).
    after = out.split("no node type of this cluster")[-1]
    assert not [
        line for line in after.splitlines() if "Traceback" in line and "PlacementGroupCleaner" not in line
    ]
    # Not a timing: a bound far below scaling.placement_timeout_s (1200 s), which a job pending on
    # an unplaceable request would wait out (128 s was measured once on a loaded machine).
    assert took < 300, took
    assert not cluster.workers()  # nothing was launched for it

    def withdrawn() -> bool:  # the refused run's autoscaling request does not outlive it
        status = cluster.ray("status", "--address", cluster.address, timeout=60).stdout
        return "accelerator_type:H100" not in status.split("From request_resources:")[-1]

    wait_for(withdrawn, "the refused run's resource request to be withdrawn", timeout_s=30, poll_s=3)


def test_local_checkpoint_storage_is_refused_on_a_multi_node_cluster(cluster, s3_shards, tmp_path):
    """The ranks would run on nodes the autoscaler adds; a folder on the head is not theirs."""
    proc = _submit(
        cluster, f"data.shards={s3_shards}/shards", f"run.storage={tmp_path / 'runs'}", "run.name=local",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.max_steps=5", timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"run.storage={tmp_path / 'runs'} is a folder on this node" in out, out[-3000:]
    assert "s3://" in out and "run.shared_storage=true" in out
    assert not (tmp_path / "runs").exists() and not cluster.workers()


def _token_auth_refuses_strangers(cluster: FakeCluster, home: Path) -> None:
    """Token authentication is on, as aws.yaml starts it: no token, or a wrong one, is refused."""
    home.mkdir()
    anonymous = {"RAY_AUTH_TOKEN_PATH": None, "HOME": str(home)}
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, env=anonymous, timeout=60)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    wrong = cluster.ray("job", "list", "--address", cluster.dashboard, env={"RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode != 0


def _launched_for_two_ranks(status: str) -> None:
    """``ray status`` while the job runs: only the cheap node type, not gpu_8x. Two nodes hold the
    ranks; Ray 2.60's autoscaler sometimes adds a third, idle one (it counts Ray Train's standing
    resource request for the ranks beside their pending placement group). That is a known cost the
    README states (one idle GPU node until idle_timeout_minutes, per job start); max_workers=3
    bounds it here, and it goes with the others once idle."""
    active = status.split("Active:")[1].split("Pending:")[0]
    launched = {name: int(n) for n, name in re.findall(r"(\d+) (\S+)", active)}
    assert set(launched) == {"ray.head.default", "gpu_1x"} and 2 <= launched["gpu_1x"] <= 3, status
    if launched["gpu_1x"] == 3:
        print("known cost seen: a third, idle gpu_1x node was launched for a two-rank job")


def test_a_spot_run_scales_up_from_zero_survives_a_lost_node_and_the_cluster_scales_back_down(
    cluster, s3_shards, tmp_path
):
    """One job, as a user's spot run goes: sent with ``ray job submit`` to a cluster with no worker
    node, the autoscaler launches two ``gpu_1x`` nodes and the ranks run one on each, never on the
    head. Then rank 1's node vanishes after the step-20 checkpoint (its raylet and workers
    SIGKILLed, as a spot reclaim does): Ray Train restarts the ranks from the S3 checkpoint on a
    node the autoscaler launches in its place, every step's loss is logged once, and at most one
    checkpoint interval is run twice. After the job the idle nodes are removed.

    The kill comes a few steps after checkpoint 20 (at step 25 on 2 CPUs, 2026-12-05): 70 steps
    leave the restart most of the run, and a machine several times faster still kills first."""
    assert not cluster.workers(), "the cluster should start with no worker node"
    _token_auth_refuses_strangers(cluster, tmp_path / "home")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps, every = 70, 10
    t0 = time.monotonic()
    proc = _submit(
        cluster, f"data.shards={s3_shards}/shards", f"run.storage={s3_shards}/runs", "run.name=spot",
        f"tracking.uri={mlflow_uri}", f"optim.max_steps={steps}", f"checkpoint.every_steps={every}",
        "checkpoint.keep=10", "run.max_failures=3", wait=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = _job_id(proc.stdout + proc.stderr)
    status: list[str] = []

    def two_workers_up() -> bool:  # what `ray status` shows while the job runs
        assert _job_status(cluster, job) not in ENDED, _job_status(cluster, job)
        if len(cluster.workers()) < 2:
            return False
        status[:] = [cluster.ray("status", "--address", cluster.address, timeout=60).stdout]
        return True

    wait_for(two_workers_up, "the autoscaler to launch two worker nodes", timeout_s=300, poll_s=2)
    launched_s = time.monotonic() - t0
    _launched_for_two_ranks(status[0])
    snapshot = f"{s3_shards}/runs/spot/checkpoint_manager_snapshot.json"

    def checkpointed() -> bool:  # Ray Train has registered the step-20 checkpoint
        assert _job_status(cluster, job) not in ENDED, _job_status(cluster, job)
        return storage.exists(snapshot) and "checkpoint_00000020" in storage.read_text(snapshot)

    wait_for(checkpointed, "the second checkpoint of the run", timeout_s=400, poll_s=0.5)
    client, run = _mlflow_run(mlflow_uri, "spot")
    before = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    ranks0 = _placements(run)[0]
    assert cluster.preempt(ranks0[1]) >= 1  # rank 1's node
    t_lost = time.monotonic()
    wait_for(lambda: _job_status(cluster, job) in ENDED, "the job to end", timeout_s=500, poll_s=2)
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, job, timeout=60).stdout
    assert _job_status(cluster, job) == "SUCCEEDED", logs[-5000:]
    recovered_s = time.monotonic() - t_lost
    _check_the_spot_run(mlflow_uri, cluster, logs, ranks0, lost_at=max(before), steps=steps, every=every)
    result = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert result["step"] == steps and result["checkpoint"].startswith(f"{s3_shards}/runs/spot/")
    t_done = time.monotonic()
    _wait_idle(cluster, "the idle worker nodes to be removed")
    removed_s = time.monotonic() - t_done
    print(f"spot run: two workers up after {launched_s:.0f} s; lost at step {max(before)}, recovered "
          f"in {recovered_s:.0f} s; removed {removed_s:.0f} s after the job\n{status[0]}")  # fmt: skip


def _check_the_spot_run(mlflow_uri, cluster, logs, ranks0, *, lost_at: int, steps: int, every: int):
    """What the finished spot run left in MLflow and its job log."""
    client, run = _mlflow_run(mlflow_uri, "spot")
    placements = _placements(run)
    assert len(placements) == 2, placements
    (first, first_ranks), (restart, ranks1) = sorted(placements.items())
    assert first == 0 and first_ranks == ranks0 and restart % every == 0 and restart >= 20, placements
    head = next(n for n in cluster.nodes() if n["is_head"])["node_id"]
    assert len(set(ranks0)) == 2 and head not in ranks0  # two nodes, neither the head (CPU: 0)
    assert f"rank 0 on {ranks0[0]}, rank 1 on {ranks0[1]}" in logs  # the job log says where they ran
    assert lost_at - restart <= every, (lost_at, restart)  # at most one interval run twice
    assert ranks0[1] not in ranks1 and set(ranks1) - set(ranks0), placements  # a new node took its place
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(loss_steps) == list(range(1, steps + 1)), loss_steps  # once per step, none missing
    started = [m.value for m in client.get_metric_history(run.info.run_id, "started_at_step")]
    assert started == [0, restart], started
    assert "resuming from checkpoint at step" in logs
