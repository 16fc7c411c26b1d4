"""DDPM pretraining through ``run_pretrain`` / ``jobs/pretrain.py`` on a real local Ray, the
loopback S3 server and a real MLflow store."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import boto3
import pytest
import torch
from conftest import REPO, run_job_inline, upload_tree, wait_for
from step_faults import FailOnce, RecordRayProcesses

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.diffusion.checkpoint import load_pretrained, load_state, read_meta
from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.unet import build_unet
from rsdiff.errors import ClusterError, ConfigError, DataError
from rsdiff.ingest import run_ingest
from rsdiff.pretrain import run_pretrain
from rsdiff.train.config import PretrainConfig
from rsdiff.weights import load_weights

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
SAMPLE_PRESET = REPO / "configs" / "ingest" / "sample.yaml"
FAST = [
    "model.image_size=32",
    "data.batch_size=4",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
    "optim.lr=2e-3",
    "optim.warmup_steps=5",
    "tracking.log_every=5",
    "tracking.sample_count=4",
    "tracking.sample_steps=4",
]


def _ingest(scenes, out) -> str:
    run_ingest(load_config(IngestConfig, SAMPLE_PRESET, [f"inputs=[{scenes}/images/*.tif]", f"output={out}"]))
    return str(out)


@pytest.fixture(scope="session")
def local_shards(sample_scenes, tmp_path_factory, ray_cluster) -> str:
    return _ingest(sample_scenes, tmp_path_factory.mktemp("shards") / "sample")


def _cfg(*overrides):
    return load_config(PretrainConfig, TINY, [*FAST, *overrides])


def _controllers() -> set[int]:
    """PIDs of the Ray Train controller actors of the Ray this process started (its raylet's
    workers are this process's descendants); the other xdist worker's Ray and the fake clusters
    run their own controllers, and a run of theirs must not hold up a wait on this one's."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    return {p.pid for p in procs if _first_word(p).startswith("ray::TrainController")}


def _first_word(proc) -> str:
    import psutil

    try:
        return (proc.cmdline() or [""])[0]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _history(mlflow_uri, run_id, key):
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(mlflow_uri).get_metric_history(run_id, key)]


@pytest.mark.integration
def test_two_ranks_on_s3_continue_exactly_after_a_killed_rank(
    local_shards, bucket, ray_cluster, mlflow_uri, tmp_path
):
    """Two ranks, two loader workers each, streaming shuffled and augmented tiles from S3 and
    checkpointing to S3. The uninterrupted run: Ray Train's own parts run, not Ray Data's dataset
    actor; the two newest checkpoints kept with their metadata; the run's metrics, settings and
    pictures in MLflow; the EMA inference artifact, a diffusers folder in S3 beside the training
    state, loads without it. The run whose rank 1 is SIGKILLed at step 5 (its worker process, not
    an exception) restarts from checkpoint 3 (mid-way through its loaders' round-robin) and logs
    exactly the losses of the uninterrupted run, each step once: each rank's data position, noise
    and CPU generator states come back from the checkpoint."""
    shards = upload_tree(local_shards, f"{bucket}/shards")
    common = [
        f"data.shards={shards}", f"run.storage={bucket}/runs", "scaling.num_workers=2",
        "data.num_workers=2", "optim.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep=2",
        "tracking.log_every=1", "tracking.sample_every=1000", f"tracking.uri={mlflow_uri}",
    ]  # fmt: skip
    census = RecordRayProcesses(4, tmp_path / "processes.txt")
    straight = run_pretrain(_cfg(*common, "run.name=straight"), after_step=census)
    _check_the_uninterrupted_run(straight, bucket, mlflow_uri, tmp_path)

    resumed = run_pretrain(
        _cfg(*common, "run.name=interrupted"),
        after_step=FailOnce(5, 1, tmp_path / "fault.marker", kind="kill"),
    )
    assert (tmp_path / "fault.marker").exists()
    assert [v for _, v in _history(mlflow_uri, resumed.mlflow_run_id, "started_at_step")] == [0, 3]
    expect = dict(_history(mlflow_uri, straight.mlflow_run_id, "loss"))
    logged = _history(mlflow_uri, resumed.mlflow_run_id, "loss")
    # Each step once: step 4, logged before the fault and run again after the restart, is not
    # logged twice.
    assert sorted(s for s, _ in logged) == sorted(expect) == list(range(1, 9)), logged
    got = dict(logged)
    for step in range(4, 9):  # step 4 from the first attempt; 5-8 computed only after the restart
        assert got[step] == pytest.approx(expect[step], rel=1e-6), (step, got, expect)
    # The shards' counts are in the manifest, so the checkpoints' positions are replayable: a restart
    # replays each slot's draws to its position instead of re-reading the epoch.
    state = f"{bucket}/runs/interrupted/checkpoint_00000006/model.pt"
    saved = load_weights(storage.read_bytes(state), "model.pt")["stream"]
    assert all(p[2] for rank in saved for p in rank["positions"].values()), saved


def _check_the_uninterrupted_run(result, bucket, mlflow_uri, tmp_path) -> None:
    """What the 8-step two-rank run left in S3 and MLflow."""
    from diffusers import UNet2DModel
    from mlflow import MlflowClient

    assert result.step == 8
    processes = set((tmp_path / "processes.txt").read_text().split())
    assert {"ray::TrainController", "ray::RayTrainWorker", "ray::PlacementGroupCleaner"} <= processes
    assert "ray::DatasetManager" not in processes, processes  # the ranks stream their shards
    assert result.checkpoint.startswith(f"{bucket}/runs/straight/checkpoint_00000008")
    meta = read_meta(result.checkpoint)
    assert meta["bands"] == ["red", "green", "blue", "nir"] and meta["in_channels"] == 4
    assert meta["normalization"]["mean"] and meta["model"]["base_channels"] == 32
    ckpts = {u.split("/")[-2] for u in storage.list_uris(f"{bucket}/runs/straight", "rsdiff.json")}
    assert ckpts == {"checkpoint_00000006", "checkpoint_00000008"}  # keep=2

    losses = _history(mlflow_uri, result.mlflow_run_id, "loss")
    assert [s for s, _ in losses] == list(range(1, 9))
    assert min(v for _, v in losses[-3:]) < 0.7 * losses[0][1], losses
    for key in ("lr", "images_per_s", "data_wait_fraction", "grad_norm"):
        assert _history(mlflow_uri, result.mlflow_run_id, key), key
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.max_steps"] == "8" and run.data.params["scaling.num_workers"] == "2"
    assert int(run.data.params["model.num_params"]) > 500_000
    arts = {a.path for d in ("samples", "denoising") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"samples/step_00000008.png", "denoising/step_00000008.png"} <= arts

    ema = f"{result.checkpoint}/ema"
    names = {storage.name(u) for u in storage.list_uris(ema)} - {"ema"}  # pyarrow's folder marker
    assert names == {"config.json", "diffusion_pytorch_model.safetensors", "rsdiff-ema.json"}, names
    for name in names:
        storage.download(f"{ema}/{name}", tmp_path / "ema" / name)
    state = load_weights(storage.read_bytes(f"{result.checkpoint}/model.pt"), "model.pt")
    standalone = UNet2DModel.from_pretrained(tmp_path / "ema").state_dict()
    assert standalone.keys() == state["ema"].keys()
    assert all(torch.equal(standalone[k], state["ema"][k]) for k in standalone)
    # Inference never reads the training state: it loads with model.pt gone.
    bucket_name, key = storage.split_s3(f"{result.checkpoint}/model.pt")
    boto3.client("s3").delete_object(Bucket=bucket_name, Key=key)
    ddpm = load_pretrained(result.checkpoint)
    assert all(torch.equal(v, state["ema"][k]) for k, v in ddpm.model.state_dict().items())
    x = torch.zeros(2, 4, 32, 32)
    eps = ddpm.model(x, torch.tensor([10, 500])).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()


@pytest.mark.integration
def test_compiled_training_matches_eager_and_a_rerun_resumes_from_its_newest_complete_checkpoint(
    local_shards, tmp_path, ray_cluster, mlflow_uri
):
    """``perf.compile=true`` (inductor, on the CPU here; the default ``blocks`` scope), with the
    full-resolution level's activations checkpointed: the same losses as eager training within
    float tolerance, across an epoch boundary of the stream (36 tiles, 4 per batch: step 9); no
    graph compiled after the first step and no graph break, in the first run and in its re-run (a
    new process compiles once, then nothing more); checkpoints with plain keys that extraction
    loads.

    The re-run of the finished run's name, with more steps, goes on as the same MLflow run, keeping
    its first settings. In between, its newest checkpoints went bad: step 10's ``model.pt`` rotted
    after it was written (truncated), and a write after step 10 was interrupted (a folder with a
    truncated ``model.pt`` and no ``rsdiff.json``). The re-run falls back to step 5, not to
    scratch, and keeps the two newest complete checkpoints (step 10 saved again under a fresh
    name), which Ray Train's list of checkpoints names and nothing else. The finished run's
    controller exits with the run, in a driver that goes on (a notebook).

    The learning rate is tiny: AdamW's first steps are nearly sign(gradient), so float-level
    differences in near-zero gradients would otherwise move weights by a whole step.

    The UNet has two levels of equal width and attention only in its bottleneck: 7 distinct blocks
    to compile (residual blocks of each shape, the attention layer), about 37 s of inductor's first
    step on 2 CPUs, against 12 blocks and 66 s for tiny.yaml's three levels, with every kind of
    block still compiled."""
    from mlflow import MlflowClient

    from rsdiff.features.extractor import FeatureExtractor

    common = [
        f"data.shards={local_shards}", f"run.storage={tmp_path / 'runs'}", "optim.warmup_steps=2",
        "checkpoint.every_steps=5", "checkpoint.keep=2", "tracking.log_every=1",
        "tracking.sample_every=1000", f"tracking.uri={mlflow_uri}", "data.num_workers=0",
        "data.shuffle_buffer=0", "optim.lr=1e-5", "model.channel_mult=[1,1]",
        "model.attention_resolutions=[]",
    ]  # fmt: skip
    fast = ["perf.compile=true", "perf.checkpoint_levels=[0]", "run.name=compiled"]
    eager = run_pretrain(_cfg(*common, "run.name=eager", "optim.max_steps=10"))
    build_unet(ModelConfig(), 3, 16)  # a process's first diffusers import pins its caller's frames
    before = _controllers()
    gc.disable()  # what a full collection would free is not what the controller's exit checks
    try:
        first = run_pretrain(_cfg(*common, *fast, "optim.max_steps=10"))
        # No reference cycle keeps the finished run's controller handle, and the actors it owns, alive.
        wait_for(lambda: not _controllers() - before, "the finished run's controller to exit", 60)
    finally:
        gc.enable()
    assert first.step == 10
    ours = _history(mlflow_uri, first.mlflow_run_id, "loss")
    for (s1, a), (s2, b) in zip(_history(mlflow_uri, eager.mlflow_run_id, "loss"), ours, strict=True):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-3)
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    feats = [
        FeatureExtractor(load_pretrained(r.checkpoint), [50, 250], ["up0.res1", "up1.res1"]).dense(x)
        for r in (eager, first)
    ]
    assert ((feats[1] - feats[0]).norm() / feats[0].norm()).item() < 1e-3

    run_dir = tmp_path / "runs" / "compiled"
    newest = run_dir / "checkpoint_00000010" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # bit rot, or a partial copy
    partial = run_dir / "checkpoint_00000012"
    partial.mkdir()
    (partial / "model.pt").write_bytes(newest.read_bytes()[:999])
    second = run_pretrain(_cfg(*common, *fast, "optim.max_steps=15"))
    assert second.step == 15 and second.checkpoint.endswith("checkpoint_00000015")
    assert read_meta(second.checkpoint)["step"] == 15
    assert second.mlflow_run_id == first.mlflow_run_id
    assert [v for _, v in _history(mlflow_uri, second.mlflow_run_id, "started_at_step")] == [0, 5]
    graphs = _history(mlflow_uri, first.mlflow_run_id, "compile_graphs")  # both processes' steps
    assert max(s for s, _ in graphs) == 15 and min(v for _, v in graphs) >= 1, graphs
    for key in ("compile_recompiles", "compile_graph_breaks"):
        assert {v for _, v in _history(mlflow_uri, first.mlflow_run_id, key)} == {0}, key
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir() and p != partial)
    assert kept == ["checkpoint_00000010-2", "checkpoint_00000015"], kept
    for name, step in zip(kept, (10, 15)):
        state = load_state(run_dir / name)
        assert state["step"] == step
        assert not [k for part in ("model", "ema") for k in state[part] if "_orig_mod" in k or "module." in k]
    listed = re.findall(
        r"checkpoint_\d{8}(?:-\d+)?", (run_dir / "checkpoint_manager_snapshot.json").read_text()
    )
    assert set(listed) <= set(kept), (listed, kept)
    params = MlflowClient(mlflow_uri).get_run(second.mlflow_run_id).data.params
    assert params["optim.max_steps"] == "10" and params["checkpoint.every_steps"] == "5"
    assert not [k for k in params if k.startswith("debug.")]  # test hooks are not settings


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        (["data.shards=''"], ConfigError, "data.shards is empty"),
        (["data.shards={tmp}/nothing-here"], DataError, "no manifest.json at"),
        (["data.shards={bucket}/no/prefix"], DataError, "no manifest.json at"),
        (
            ["data.shards=s3://rsdiff-absent-bucket/x"],
            Exception,
            "bucket 'rsdiff-absent-bucket' does not exist",
        ),
        (["data.shards={shards}", "model.in_channels=3"], ConfigError, "model.in_channels=3 but the shards"),
        (["data.shards={shards}", "model.image_size=128"], ConfigError, "exceeds the shards' tile size 64"),
        (["data.shards={shards}", "data.splits=[test]"], DataError, "has no shards for splits ['test']"),
        (["data.shards={shards}", "optim.max_steps=0"], ConfigError, "optim.max_steps=0 is out of range"),
        (
            ["data.shards={shards}", "perf.checkpoint_levels=[3]"],
            ConfigError,
            "perf.checkpoint_levels=[3]: levels run from 0 (full resolution) to 2",
        ),
    ],
)
def test_bad_input_fails_before_any_worker_starts(
    local_shards, bucket, tmp_path, mlflow_uri, overrides, error, needle
):
    fmt = {"tmp": tmp_path, "bucket": bucket, "shards": local_shards}
    cfg = _cfg(
        *[o.format(**fmt) for o in overrides],
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_uri}",
    )
    with pytest.raises(error) as err:
        run_pretrain(cfg)
    assert needle in str(err.value)
    assert not (tmp_path / "runs").exists()  # no run folder, no checkpoint
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_uri).get_experiment_by_name("rsdiff-pretrain") is None  # no run opened


@pytest.mark.integration
def test_local_storage_is_refused_where_ranks_would_leave_this_node(local_shards, tmp_path, mlflow_uri):
    """3 ranks of 1 CPU do not fit the 2-CPU test cluster: they would run on other nodes (an
    autoscaler's), which cannot see a folder here. Refused before anything is written."""
    cfg = _cfg(f"data.shards={local_shards}", f"run.storage={tmp_path / 'runs'}", "scaling.num_workers=3",
               f"tracking.uri={mlflow_uri}", "optim.max_steps=5")  # fmt: skip
    refused = r"is a folder on this node, but this node cannot hold 3 x \{CPU: 1\}"
    with pytest.raises(ClusterError, match=refused):
        run_pretrain(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_ranks_the_cluster_never_places_fail_after_the_placement_timeout(local_shards, tmp_path, mlflow_uri):
    """No autoscaler, 2 CPUs, 3 ranks asked for: Ray Train alone would wait forever. rsdiff ends the
    run after ``scaling.placement_timeout_s`` with one message, and the cluster's CPUs are free again."""
    import time

    import ray
    from mlflow import MlflowClient

    cfg = _cfg(f"data.shards={local_shards}", f"run.storage={tmp_path / 'runs'}", "run.shared_storage=true",
               "scaling.num_workers=3", "scaling.placement_timeout_s=5", f"tracking.uri={mlflow_uri}",
               "optim.max_steps=5", "run.name=never-placed")  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        run_pretrain(cfg)
    took = time.monotonic() - t0
    said = str(err.value)
    assert "placed no training rank within scaling.placement_timeout_s=5 s: 3 rank(s) of {CPU: 1}" in said
    assert "1 live node(s): {CPU: 2}" in said and "scaling.num_workers" in said
    assert took < 60, took
    # The controller and its pending placement group are gone: nothing holds the CPUs.
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 2, "the test cluster's CPUs to be free")
    run = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("rsdiff-pretrain").experiment_id]
    )[0]
    assert run.info.status == "FAILED"


@pytest.mark.integration
def test_job_script_rejects_unknown_key_and_missing_manifest(tmp_path):
    proc = run_job_inline("pretrain.py", "--config", str(TINY), "model.chanels=64")
    assert proc.returncode == 2 and "unknown config key 'model.chanels'" in proc.stderr
    assert "base_channels" in proc.stderr  # the message lists the valid keys
    proc = run_job_inline(
        "pretrain.py", f"data.shards={tmp_path}/none", f"tracking.uri=sqlite:///{tmp_path}/m.db"
    )
    assert proc.returncode == 2 and "no manifest.json at" in proc.stderr and "Traceback" not in proc.stderr


# What a submit says while the head is up but not yet (or not for a moment) serving jobs, before
# any job was created: worth a retry. Anything else, and any answer once the head process has
# exited, is the test's result.
_TRANSIENT_SUBMIT = ("No available agent", "Failed to connect to Ray")


def _head_logs(temp_dir: Path, head_out: Path, lines: int = 40) -> str:
    """The last ``lines`` of the head's own output and of its Ray logs (dashboard, agent, raylet,
    GCS): what a failure of the submit test prints, so that it explains itself."""
    logs = temp_dir / "session_latest" / "logs"
    names = ["dashboard.log", "dashboard.err", "dashboard_agent.log", "raylet.out", "raylet.err",
             "gcs_server.out", "gcs_server.err"]  # fmt: skip
    parts = [head_out, *(logs / n for n in names)]
    out = []
    for path in parts:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} ---\n" + "\n".join(tail))
    return "\n".join(out) or f"(no head logs under {temp_dir})"


def _answers(url: str) -> bool:
    """True once an HTTP server answers at ``url`` (any status)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.mark.e2e
def test_ray_job_submit_to_a_local_head(local_shards, tmp_path):
    """``ray start --head`` + ``ray job submit --working-dir . -- python jobs/pretrain.py``, token auth on."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import agent_port_args, free_port

    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes) so its logs are its own.
    temp_dir = Path(tempfile.mkdtemp(prefix="rsdiff-head-"))
    head_out = tmp_path / "head.out"
    with open(head_out, "wb") as out:
        head = subprocess.Popen(
            [str(bindir / "ray"), "start", "--head", f"--port={free_port()}", f"--dashboard-port={dash}",
             "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats", "--block",
             f"--temp-dir={temp_dir}", *agent_port_args()],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"

    def ray_cli(*args, extra=None, timeout=300):
        return subprocess.run(
            [str(bindir / "ray"), *args], cwd=REPO, env={**env, **(extra or {})},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def head_alive() -> bool:
        if head.poll() is not None:
            pytest.fail(f"the head exited ({head.returncode}):\n{_head_logs(temp_dir, head_out)}")
        return True

    try:
        # Polled over HTTP from here: a `ray job list` process per poll costs as much CPU as the
        # head's own start on 2 cores. Any answer, 401 included, means the dashboard serves.
        wait_for(lambda: head_alive() and _answers(address), "the local Ray head to come up", timeout_s=90)
        # Authentication stays on: no token, or a wrong one, is refused.
        (tmp_path / "home").mkdir()
        no_token = ray_cli("job", "list", "--address", address, extra={"HOME": str(tmp_path / "home")})
        assert no_token.returncode != 0 and "token" in (no_token.stderr + no_token.stdout).lower()
        wrong = ray_cli("job", "list", "--address", address, extra={"RAY_AUTH_TOKEN": "0" * 32})
        assert wrong.returncode != 0
        submit_args = (
            "job", "submit", "--address", address, "--working-dir", ".", "--",
            "python", "jobs/pretrain.py", "--config", "configs/pretrain/tiny.yaml", *FAST,
            f"data.shards={local_shards}", f"run.storage={tmp_path / 'runs'}", "run.name=submitted",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.max_steps=10",
            "checkpoint.every_steps=5", "tracking.sample_every=10",
        )  # fmt: skip
        submitted = []

        def accepted() -> bool:  # the head's job agent comes up a little after its dashboard
            submitted[:] = [ray_cli(*submit_args, timeout=400)]
            said = submitted[0].stdout + submitted[0].stderr
            return head_alive() and not any(sign in said for sign in _TRANSIENT_SUBMIT)

        wait_for(accepted, "the head's job agent to accept the submission", timeout_s=120, poll_s=2)
        submit = submitted[0]
        said = submit.stdout[-3000:] + submit.stderr[-3000:]
        assert submit.returncode == 0, said + "\n" + _head_logs(temp_dir, head_out)
        assert "succeeded" in submit.stdout + submit.stderr
        assert read_meta(str(tmp_path / "runs/submitted/checkpoint_00000010"))["step"] == 10
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_pretraining_never_makes_data_itself_and_says_how_to(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)  # no runs/shards/sample here
    cfg = _cfg(f"tracking.uri={mlflow_uri}")
    assert cfg.data.shards == "runs/shards/sample"
    with pytest.raises(DataError, match=r"no shards at runs/shards/sample .*python jobs/make_sample.py"):
        run_pretrain(cfg)
    assert list(tmp_path.iterdir()) == [tmp_path / "mlflow.db"]  # nothing was generated


@pytest.mark.integration
def test_make_sample_job_writes_the_shards_pretraining_reads(tmp_path, ray_address):
    out = tmp_path / "sample"
    proc = run_job_inline("make_sample.py", f"output={out}", "scenes=3", "size=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(str(out))
    assert manifest.bands == ["red", "green", "blue", "nir"] and manifest.tile_size == 64
    assert sum(manifest.samples.values()) == 3 and set(manifest.samples) == {"train", "val"}
    assert manifest.labeled
    again = run_job_inline("make_sample.py", f"output={out}", "scenes=3", "size=64")
    assert again.returncode == 2 and "already holds shards; pass overwrite=true" in again.stderr


MUTE_SCRIPT = """
import io, sys, time, ray
from rsdiff.train.placement import mute_worker_output

seen = io.StringIO()
class Tee(io.TextIOBase):
    def write(self, text):
        seen.write(text)
        return sys.__stderr__.write(text)
sys.stderr = Tee()
ray.init(address=sys.argv[1])

@ray.remote(num_cpus=0)
def say(word):
    print(word, file=sys.stderr, flush=True)

ray.get(say.remote("before-the-stop"))
deadline = time.monotonic() + 60  # the log monitor forwards in batches; wait until it has
while "before-the-stop" not in seen.getvalue():
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.2)
mute_worker_output()
ray.get(say.remote("after-the-stop"))
time.sleep(5)  # what was not forwarded by now would have been (a bound, not a timing)
"""


@pytest.mark.e2e
def test_after_the_stop_a_ranks_dying_words_are_not_forwarded_to_the_job(ray_address, tmp_path):
    """A rank blocked in ``report`` when Ctrl-C killed its controller printed a traceback into the
    job's output after rsdiff's own line."""
    import subprocess
    import sys

    script = tmp_path / "mute.py"
    script.write_text(MUTE_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), ray_address["RAY_ADDRESS"]], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]  # 3: the first line was never forwarded
    assert "before-the-stop" in out.stderr, out.stderr[-3000:]
    assert "after-the-stop" not in out.stderr + out.stdout


@pytest.mark.integration
def test_the_placement_watch_stays_armed_after_the_start_and_ends_a_restart_that_is_never_placed(ray_cluster):
    """Once rank 0 ran, a restart (a preempted node) asks for the ranks again with a new placement
    group of this job; one that waits past ``scaling.placement_timeout_s`` ends the run with one
    message, as a first start that is never placed does. A group of another shape is not the run's."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from rsdiff.train.placement import PlacementWatch

    request = {"CPU": 7.0, "memory": 1.0}  # more than the test cluster holds: it stays pending
    stopped: list[float] = []
    other = placement_group([{"CPU": 6.0}])  # pending too, but not the ranks' shape
    watch = PlacementWatch(request, 1, timeout_s=2.0, started=lambda: True, stop=lambda: stopped.append(1),
                           poll_s=0.2)  # fmt: skip
    with watch:
        time.sleep(3)
        assert not stopped  # running, nothing of the run waits
        restart = placement_group([request])  # what Ray Train's restart asks for
        wait_for(lambda: stopped, "the watch to end the restarted run", 60)
    remove_placement_group(restart)
    remove_placement_group(other)
    said = str(watch.failure)
    assert isinstance(watch.failure, ClusterError), said
    assert ("after a restart of the training ranks" in said and "placement_timeout_s=2 s" in said) or (
        "no node type of this cluster can hold one training rank" in said
    ), said
    ray.util.placement_group_table()  # the cluster still answers
