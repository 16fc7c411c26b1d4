"""Shared fixtures: one local Ray cluster, a real S3-compatible server on loopback, MLflow stores,
generated rasters, and the shared dubai-aerial sample when it is present.

The S3 server is moto in server mode: boto3 talks HTTP to it through ``AWS_ENDPOINT_URL``, as it
would to MinIO or AWS. Its environment is set before Ray starts so Ray workers inherit it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rsdiff import ports
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.features.config import ExtractConfig
from rsdiff.features.extract import run_extract
from rsdiff.features.parts import read_part
from rsdiff.features.table import FeatureTable
from rsdiff.ingest import run_ingest
from rsdiff.pretrain import run_pretrain
from rsdiff.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
# RSDIFF_TEST_DUBAI points elsewhere (e.g. at nothing, to run the suite as a fresh clone would).
DUBAI = Path(os.environ.get("RSDIFF_TEST_DUBAI", REPO.parent / "shared" / "data" / "dubai-aerial"))
TEST_KEY_ID = "AKIARSDIFFTESTKEY0001"
TEST_SECRET = "rsdiffTestSecretKeyDoNotLeak0123456789abc"


def free_port() -> int:
    """A port free now and outside the kernel's ephemeral range (see :mod:`rsdiff.ports`)."""
    return ports.free_port()


def agent_port_args() -> list[str]:
    """``ray start`` flags giving a second head its own agent and metrics ports (the session's test
    cluster holds Ray's defaults), distinct and outside the ephemeral range."""
    listen, grpc, runtime_env, metrics = ports.free_ports(4)
    return [
        f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
    ]  # fmt: skip


# The tiers (unit -> integration -> e2e, one mark each, a time limit each, a summary at the end) are
# the plugin in tests/tiers.py; pytester runs inner sessions for the tests of that plugin.
pytest_plugins = ("tiers", "lanes", "pytester")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1; AWS_* variables point boto3 (and Ray workers) at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID=TEST_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        RSDIFF_S3_MAX_ATTEMPTS="4",
    )
    os.environ.pop("AWS_PROFILE", None)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str):
    """One local Ray shared by every test (2 CPUs), started after the S3 env is in place."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train's controller checks its workers every 2 s by default, so each of the suite's ~45
    # short training runs waited about 2 s more to start and to end; 0.2 s, measured at 2 s less
    # per run. Set before Ray starts: its workers (the controllers) and the suite's second heads
    # inherit it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # A `ray start --block` head (the suite's second heads) told to stop first drains its node for
    # up to 30 s, for Ray Serve's proxies to finish their requests; these heads serve none, and the
    # `ray job submit` test spent 32 s of its 86 s waiting for its head to go.
    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # Ray Train's preemption watch (an actor per training attempt, ~2 CPU-s to start) acts on nodes
    # a cloud provider drains; this one-node cluster is never drained. Users' clusters keep it, and
    # so does the fake autoscaling cluster, whose nodes the preemption test takes away.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URI."""
    import boto3

    name = f"rsdiff-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its schema created once (the migrations take seconds)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, _empty_mlflow_db: Path) -> str:
    """A real MLflow tracking store (sqlite) of one test's own: a copy of the empty store."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def sample_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six generated 4-band uint16 GeoTIFF scenes (160x192 px) with index-mask labels."""
    from rsdiff.data.synthetic import write_sample_dataset

    folder = tmp_path_factory.mktemp("sample")
    write_sample_dataset(folder, scenes=6)
    return folder


@pytest.fixture(scope="session")
def dubai() -> Path:
    """The shared dubai-aerial sample (54 JPG/PNG pairs); skipped where it is absent."""
    if not (DUBAI / "classes.json").exists():
        pytest.skip(f"shared dubai-aerial sample not found at {DUBAI}")
    return DUBAI


@pytest.fixture
def weight_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The checkpoint weights files (``model.pt``, the EMA safetensors) that the test's own process
    reads whole through ``rsdiff.storage.read_bytes``, in order; Ray's workers are other processes
    and are not watched. A driver plans from a checkpoint's structure and leaves the weights to
    its workers, so a driver's run adds nothing here."""
    from rsdiff import storage
    from rsdiff.diffusion.checkpoint import EMA_WEIGHTS, WEIGHTS

    reads: list[str] = []
    read_bytes = storage.read_bytes

    def watched(uri: str) -> bytes:
        if storage.name(uri) in (WEIGHTS, EMA_WEIGHTS):
            reads.append(uri)
        return read_bytes(uri)

    monkeypatch.setattr(storage, "read_bytes", watched)
    return reads


def wait_for(condition, what: str, timeout_s: float = 120.0, poll_s: float = 0.2) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout_s`` (a bound for a
    hung run, not a timing the test checks)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class PicklePayload:
    """Unpickling this calls ``open(path, "w")``: a file that appears proves code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_job(
    script: str, *args: str, env: dict | None = None, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``python jobs/<script> args...`` (from the repo root unless ``cwd``), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def upload_tree(folder: Path | str, uri: str, pattern: str = "*") -> str:
    """Every file under ``folder`` matching ``pattern`` to the S3 prefix ``uri``, by its relative
    path; returns ``uri``."""
    import boto3

    from rsdiff import storage

    name, prefix = storage.split_s3(uri)
    s3 = boto3.client("s3")
    for f in sorted(Path(folder).rglob(pattern)):
        if f.is_file():
            s3.upload_file(str(f), name, f"{prefix}/{f.relative_to(folder)}")
    return uri


def run_job_inline(
    script: str, *args: str, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``jobs/<script> args...`` in this process, as :func:`run_job` would in a new one: the
    same argv parsing, exit code and printed output, without a fresh interpreter importing torch,
    Ray and MLflow. ``env`` is set for the call only (it reaches the driver, not Ray workers that
    are already running); ``cwd`` (the repository root unless given) is entered for the call only.
    Log records at INFO and above are in the returned stderr, formatted as the job prints them."""
    import contextlib
    import io
    import runpy

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, Path.cwd()
    saved_env = {k: os.environ.get(k) for k in env or {}}  # only these change (threads read the rest)
    # The job's log lines reach its stderr, as they would in a process of its own.
    root = logging.getLogger()
    handler, level = logging.StreamHandler(err), root.level
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sys.path.insert(0, str(REPO / "jobs"))
    sys.argv = [f"jobs/{script}", *args]
    os.environ.update(env or {})
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):  # sys.exit("message") prints it, as the interpreter would
            err.write(exc.code + "\n")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        sys.argv = saved_argv
        sys.path.remove(str(REPO / "jobs"))
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def ray_address(ray_cluster) -> dict:
    """Env that makes a job subprocess join the session's Ray cluster instead of starting one."""
    return {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


# ----------------------------------------------------------------------------------------------
# A tiny DDPM on labeled tiles and its feature table, shared by the feature, head and sweep tests.
# They use dubai-aerial's tile_1 where it is present, else the generated sample, so a fresh clone
# without ../shared still exercises extraction, heads and sweeps.


@dataclass(frozen=True)
class LabeledSource:
    """Labeled scenes to ingest: ``preset`` + ``inputs`` cut them; ``unlabel`` is the override list
    that makes every class pixel an ignore pixel (for the "no labeled pixel" case)."""

    name: str
    preset: Path
    inputs: str
    bands: int
    unlabel: tuple[str, ...]


# The data is in every dependent test's id ([dubai-tile_1] or [generated-sample]): a green run says
# which one it checked.
LABELED_DATA = "dubai-tile_1" if (DUBAI / "classes.json").exists() else "generated-sample"


@pytest.fixture(scope="session", params=[LABELED_DATA])
def labeled_source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LabeledSource:
    if request.param == "dubai-tile_1":
        ignore = "['#3C1098','#8429F6','#6EC1E4','#FEDD3A','#E2A929','#9B9B9B','#000000']"
        return LabeledSource(
            "dubai-aerial tile_1", REPO / "configs/ingest/dubai.yaml", f"{DUBAI}/tile_1/images/*.jpg", 3,
            (f"labels.ignore_colours={ignore}", "labels.classes=[{name: x, colour: '#010203'}]"),
        )  # fmt: skip
    from rsdiff.data.synthetic import write_sample_dataset

    folder = tmp_path_factory.mktemp("labeled-sample")
    write_sample_dataset(folder, scenes=9, height=128, width=128)
    return LabeledSource(
        "generated sample", REPO / "configs/ingest/sample.yaml", f"{folder}/images/*.tif", 4,
        ("labels.ignore_values=[0,1,2,3,4,255]", "labels.classes=[{name: x, value: 200}]"),
    )  # fmt: skip


@pytest.fixture(scope="session")
def labeled_ckpt(labeled_source, tmp_path_factory, ray_cluster) -> tuple[str, str]:
    """A tiny DDPM briefly pretrained on 64 px labeled tiles: (checkpoint, shards)."""
    root = tmp_path_factory.mktemp("labeled")
    shards = str(root / "shards")
    run_ingest(
        load_config(
            IngestConfig,
            labeled_source.preset,
            [f"inputs=[{labeled_source.inputs}]", f"output={shards}", "tile_size=64", "val_fraction=0.34"],
        )
    )
    cfg = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/tiny.yaml",
        [f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
         "optim.max_steps=15", "optim.warmup_steps=3", "checkpoint.every_steps=15", "tracking.log_every=15",
         "tracking.sample_every=1000", "tracking.sample_count=2", "tracking.sample_steps=2",
         f"run.storage={root / 'runs'}",
         f"tracking.uri=sqlite:///{root / 'm.db'}"],
    )  # fmt: skip
    return run_pretrain(cfg).checkpoint, shards


def extract_features(ckpt, shards, output, *extra):
    """``run_extract`` of 24 images per split at t in {10, 100}, every decoder block."""
    cfg = load_config(
        ExtractConfig,
        REPO / "configs" / "extract" / "tiny.yaml",
        [f"checkpoint={ckpt}", f"shards={shards}", f"output={output}", "max_images=24", "timesteps=[10,100]",
         "pixels_per_class=16", "batch_size=4", *extra],
    )  # fmt: skip
    return run_extract(cfg)


def features_by_pixel(table: FeatureTable, split: str) -> dict[tuple[str, int, int], np.ndarray]:
    """Each sampled pixel's feature row (C,) keyed by (image key, row, col). Ray Data hands batches
    to the actors in no fixed order, so two extractions' parts and rows compare only by pixel."""
    out = {}
    for info in table.parts(split):
        part = read_part(table.root, info["name"])
        for i, key in enumerate(zip(part["image"].tolist(), part["rows"].tolist(), part["cols"].tolist())):
            out[key] = part["features"][i]
    return out


@pytest.fixture(scope="session")
def labeled_table(labeled_ckpt, s3_endpoint, ray_cluster) -> FeatureTable:
    import boto3

    boto3.client("s3").create_bucket(Bucket="rsdiff-features")
    ckpt, shards = labeled_ckpt
    return extract_features(ckpt, shards, "s3://rsdiff-features/table")


@pytest.fixture(scope="session")
def sample_demo(tmp_path_factory, ray_cluster) -> Path:
    """``python jobs/demo.py`` on the generated sample (tiny settings), a process of its own joined
    to the session's Ray, so that its console (``stdout.txt``, ``stderr.txt``) is what a user sees,
    the ranks' forwarded lines included."""
    work = tmp_path_factory.mktemp("demo")
    # fresh=true over a workdir holding a user's own file and a stale demo output: the demo deletes
    # only its own outputs (checked by test_hostile's fresh tests).
    (work / "notes-of-the-user.txt").write_text("keep me")
    (work / "sweep").mkdir()
    (work / "sweep" / "from-an-earlier-demo.json").write_text("{}")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "demo.py"), f"workdir={work}", "pretrain_steps=24", "trials=2",
         "head_epochs=3", "pixels_per_class=32", "fresh=true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (work / "stdout.txt").write_text(proc.stdout)
    (work / "stderr.txt").write_text(proc.stderr)
    return work
