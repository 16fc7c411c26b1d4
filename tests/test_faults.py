"""Faults and bad input: what the user sees, and that nothing is lost or left looking complete.

Worker SIGKILL and interrupted checkpoint writes are in ``test_pretrain.py``; this module holds
the driver kill + resubmit, corrupt and truncated shards, S3 error bursts through a loopback
proxy, a table of bad inputs across every job, and the credentials audit.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import REPO, TEST_KEY_ID, TEST_SECRET, PicklePayload, run_job_inline, upload_tree, wait_for
from mlflow import MlflowClient
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.manifest import read_manifest
from rsdiff.data.shards import iter_shard
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.ingest import run_ingest

SAMPLE = REPO / "configs" / "ingest" / "sample.yaml"
TINY_FAST = [
    "--config", "configs/pretrain/tiny.yaml", "model.image_size=32", "data.batch_size=4",
    "data.num_workers=0", "data.shuffle_buffer=8", "optim.warmup_steps=2", "tracking.log_every=5",
    "tracking.sample_every=1000", "tracking.sample_count=4", "tracking.sample_steps=4",
]  # fmt: skip


def _secrets_in(blob: bytes) -> list[str]:
    return [s for s in (TEST_SECRET, TEST_KEY_ID) if s.encode() in blob]


def _bucket_objects(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    name = bucket[len("s3://") :]
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name)
        for o in page.get("Contents", [])
    ]
    return {k: s3.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def shards(sample_scenes, tmp_path_factory, ray_cluster) -> str:
    out = tmp_path_factory.mktemp("fault-shards") / "sample"
    run_ingest(load_config(IngestConfig, SAMPLE, [f"inputs=[{sample_scenes}/images/*.tif]", f"output={out}"]))
    return str(out)


@pytest.mark.integration
def test_corrupt_and_truncated_shards_are_skipped_and_counted(shards, tmp_path, ray_cluster, mlflow_uri):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    good = manifest["shards"]["train"][0]
    (bad / "train-9998-00000.tar").write_bytes(os.urandom(20_000))  # not a tar at all
    (bad / "train-9999-00000.tar").write_bytes((bad / good).read_bytes()[: (bad / good).stat().st_size // 2])
    manifest["shards"]["train"] += ["train-9998-00000.tar", "train-9999-00000.tar"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    common = [*TINY_FAST, f"data.shards={bad}", "data.splits=[train]", "optim.max_steps=10",
              "checkpoint.every_steps=10", f"run.storage={tmp_path / 'runs'}",
              f"tracking.uri={mlflow_uri}"]  # fmt: skip
    # More damaged shards than data.max_bad_shard_fraction allows (5%): one line naming them.
    refused = run_job_inline("pretrain.py", *common, "run.name=too-damaged", "run.max_failures=0")
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    want = (
        r"rsdiff pretrain: error: 1 damaged shards among the \d+ that rank 0 reads \(more than "
        r"data\.max_bad_shard_fraction=0\.05\), e\.g\. .*train-999[89]-00000\.tar .*raise "
        r"data\.max_bad_shard_fraction to train on what is left"
    )
    assert re.fullmatch(want, line), line
    # Allowed: skipped and counted.
    proc = run_job_inline("pretrain.py", *common, "run.name=corrupt", "data.max_bad_shard_fraction=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    errors = [m.value for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "skipped_shard_errors")]
    assert errors and errors[-1] >= 2  # both bad shards were met, counted and skipped
    ckpt = load_pretrained(str(tmp_path / "runs" / "corrupt" / "checkpoint_00000010"))
    assert ckpt.meta["step"] == 10 and ckpt.bands == manifest["bands"]


@pytest.mark.e2e
def test_s3_error_bursts_are_retried_without_loss_or_duplicates(
    sample_scenes, bucket, s3_endpoint, tmp_path, ray_cluster
):
    upload_tree(sample_scenes, f"{bucket}/scenes", "*.tif")
    reference = run_ingest(
        load_config(
            IngestConfig,
            SAMPLE,
            [f"inputs=[{bucket}/scenes/images/]", f"output={bucket}/clean", "parallelism=3"],
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with FaultyS3Proxy(s3_endpoint, every=3, burst=2, max_faults=40) as proxy:
        env.update(AWS_ENDPOINT_URL=proxy.url, RSDIFF_S3_MAX_ATTEMPTS="6")
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", str(SAMPLE),
             f"inputs=[{bucket}/scenes/images/]", f"output={bucket}/through-faults", "ray.num_cpus=1",
             "parallelism=3"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        injected = dict(proxy.faults)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert injected["503"] >= 5 and injected["reset"] >= 5, injected
    got = read_manifest(f"{bucket}/through-faults")
    assert got.samples == reference.samples and got.shards == reference.shards
    for key, values in reference.band_stats.items():  # merged in another order: equal to rounding
        assert got.band_stats[key] == pytest.approx(values, rel=1e-12), key
    objects = _bucket_objects(bucket)
    faulty = sorted(k.split("/", 1)[1] for k in objects if k.startswith("through-faults/"))
    clean = sorted(k.split("/", 1)[1] for k in objects if k.startswith("clean/"))
    assert faulty == clean  # nothing extra (no partial or temporary objects), nothing lost
    for a, b in zip(got.shard_uris(), reference.shard_uris(), strict=True):
        for x, y in zip(iter_shard(a), iter_shard(b), strict=True):  # same samples, bit for bit
            assert x.key == y.key and (x.image == y.image).all() and (x.label == y.label).all()


@pytest.mark.integration
def test_s3_bodies_cut_mid_read_resume_without_loss_or_repeats(shards, bucket, s3_endpoint):
    """A connection cut in the middle of a shard body resumes with a ranged GET from the byte
    reached: the samples equal a fault-free read, none lost, none repeated, no shard skipped."""
    from rsdiff.data.normalize import Normalizer
    from rsdiff.train.stream import ShardStream

    name = bucket[len("s3://") :]
    local = read_manifest(shards).shard_uris("train")[:2]
    uris = []
    for path in local:
        boto3.client("s3").upload_file(path, name, f"cut/{Path(path).name}")
        uris.append(f"{bucket}/cut/{Path(path).name}")
    clean = [(s.key, s.image.tobytes()) for u in uris for s in iter_shard(u)]
    raw = [Path(p).read_bytes() for p in local]
    norm = Normalizer((0.0,) * 4, (1.0,) * 4, 1.0)
    saved = os.environ["AWS_ENDPOINT_URL"]
    with FaultyS3Proxy(s3_endpoint, every=1, burst=1, max_faults=12, kinds=("cut",)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        storage._client_for_pid.cache_clear()
        try:
            assert [storage.open_stream(u).read() for u in uris] == raw  # byte for byte
            cut_plain = proxy.faults["cut"]
            got = [(s.key, s.image.tobytes()) for u in uris for s in iter_shard(u)]
            stream = ShardStream(uris, 0, 1, norm, 64, shuffle_buffer=0, augment=False)
            stream_iter = iter(stream)
            tiles = [next(stream_iter)["x"].numpy() for _ in range(len(clean))]
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            storage._client_for_pid.cache_clear()
    assert cut_plain >= 1 and proxy.faults["cut"] >= cut_plain + 2, proxy.faults
    assert got == clean  # same keys, same pixels, same order
    assert stream.errors == 0
    order = {k: i for i, (k, _) in enumerate(clean)}
    assert len(order) == len(clean)  # nothing repeated
    for tile, (_, image) in zip(tiles, clean, strict=True):
        assert np.array_equal(tile, np.clip(np.frombuffer(image, np.uint16).reshape(tile.shape), -1, 1))


@pytest.mark.e2e
def test_pretraining_through_s3_error_bursts_keeps_each_checkpoint_once(
    shards, bucket, s3_endpoint, tmp_path, mlflow_uri
):
    """Shard reads and rank 0's checkpoint uploads (boto3) and Ray Train's own folder and listing
    requests (pyarrow) all meet 503s and resets; no checkpoint is registered without a file."""
    upload_tree(shards, f"{bucket}/shards")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh Ray that sees the proxy
    with FaultyS3Proxy(s3_endpoint, every=5, burst=1, max_faults=30) as proxy:
        env.update(AWS_ENDPOINT_URL=proxy.url)
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "pretrain.py"), *TINY_FAST, f"data.shards={bucket}/shards",
             "optim.max_steps=20", "checkpoint.every_steps=5", "checkpoint.keep=10",
             f"run.storage={bucket}/runs", "run.name=through-faults", f"tracking.uri={mlflow_uri}",
             "ray.num_cpus=2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        by_client = dict(proxy.faults_by_client)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert by_client.get("boto3", 0) >= 1 and by_client.get("arrow", 0) >= 3, by_client  # both clients hit
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and result["checkpoint"].startswith(f"{bucket}/runs/through-faults/")
    # Each checkpoint exactly once and complete: the same files in every checkpoint folder.
    keys = [k.split("/", 2)[2] for k in _bucket_objects(bucket) if k.startswith("runs/through-faults/")]
    files: dict[str, list[str]] = {}
    for k in keys:
        if re.fullmatch(r"checkpoint_\d{8}/.+", k) and not k.endswith("/"):  # not pyarrow's folder markers
            folder, name = k.split("/", 1)
            files.setdefault(folder, []).append(name)
    assert sorted(files) == [f"checkpoint_{s:08d}" for s in (5, 10, 15, 20)], keys
    assert all(sorted(v) == sorted(files["checkpoint_00000020"]) for v in files.values()), files
    assert {"model.pt", "rsdiff.json"} <= set(files["checkpoint_00000020"]), files
    assert load_pretrained(result["checkpoint"]).meta["step"] == 20
    started = [
        m.value
        for m in MlflowClient(mlflow_uri).get_metric_history(result["mlflow_run_id"], "started_at_step")
    ]
    assert set(started) <= {0, 5, 10, 15}, started  # any restart came from a whole checkpoint


@pytest.mark.e2e
def test_killed_driver_resubmitted_resumes_from_the_s3_checkpoint(
    shards, bucket, tmp_path, ray_cluster, mlflow_uri
):
    common = [
        *TINY_FAST, f"data.shards={shards}", "checkpoint.every_steps=5", f"run.storage={bucket}/runs",
        "run.name=driver-kill", f"tracking.uri={mlflow_uri}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    first = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), *common, "optim.max_steps=400"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    snapshot = f"{bucket}/runs/driver-kill/checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray Train has recorded a checkpoint the resubmitted job can find
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        return storage.exists(snapshot) and "checkpoint_000000" in storage.read_text(snapshot)

    wait_for(registered, "a registered checkpoint of the first job", timeout_s=300)
    os.killpg(first.pid, signal.SIGKILL)
    first_log = first.stdout.read().decode()
    first.wait()
    done = storage.list_uris(f"{bucket}/runs/driver-kill", "rsdiff.json")
    assert done, "no checkpoint was written before the kill"
    second = run_job_inline("pretrain.py", *common, "optim.max_steps=20")  # a new driver, this process
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and result["checkpoint"].startswith(f"{bucket}/runs/driver-kill/")
    started = [
        m.value
        for m in MlflowClient(mlflow_uri).get_metric_history(result["mlflow_run_id"], "started_at_step")
    ]
    assert started[0] == 0 and started[-1] >= 5, started  # the resubmitted job did not start over
    # Nothing secret in the logs, the checkpoints in S3, or the MLflow store.
    assert not _secrets_in((first_log + second.stdout + second.stderr).encode())
    leaks = {k: _secrets_in(v) for k, v in _bucket_objects(bucket).items() if _secrets_in(v)}
    assert not leaks, leaks
    db = Path(mlflow_uri[len("sqlite:///") :])
    assert not _secrets_in(db.read_bytes())
    for f in db.parent.rglob("*"):
        if f.is_file() and "mlartifacts" in f.parts:
            assert not _secrets_in(f.read_bytes()), f


@pytest.mark.integration
def test_no_credentials_in_demo_outputs_logs_or_mlflow(sample_demo):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET  # the demo ran with keys in its environment
    leaks = [str(f) for f in sample_demo.rglob("*") if f.is_file() and _secrets_in(f.read_bytes())]
    assert not leaks, leaks
    client = MlflowClient(f"sqlite:///{sample_demo / 'mlflow.db'}")
    for run in client.search_runs([client.get_experiment_by_name("rsdiff-demo").experiment_id]):
        text = json.dumps({"p": run.data.params, "t": run.data.tags})
        assert not _secrets_in(text.encode())


# ----------------------------------------------------------------------------------------------
# Bad input: one clear message, exit status 2, no traceback, nothing that looks complete.


@pytest.fixture(scope="module")
def bad_inputs(sample_demo, sample_scenes, tmp_path_factory):
    """Files the bad-input cases point at."""
    import numpy as np
    import rasterio

    root = tmp_path_factory.mktemp("bad")
    (root / "not-a-raster.tif").write_text("hello")
    with rasterio.open(
        root / "float.tif", "w", driver="GTiff", width=300, height=300, count=1, dtype="float32"
    ) as d:
        d.write(np.zeros((1, 300, 300), np.float32))
    small = root / "small" / "images"
    small.mkdir(parents=True)
    shutil.copy(sample_scenes / "images" / "scene_00.tif", small / "a.tif")
    ckpt = sorted((sample_demo / "ray" / "demo-pretrain").glob("checkpoint_0*"))[-1]
    broken = root / "broken-ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "model.pt").write_bytes(b"not a torch file")
    (broken / "ema" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    broken_old = root / "broken-old-ckpt"  # written before checkpoints held ema/: model.pt is read
    shutil.copytree(broken, broken_old)
    shutil.rmtree(broken_old / "ema")
    (root / "empty").mkdir()
    # Labels whose every pixel matches no class (as a JPEG-compressed colour mask does).
    (root / "unk" / "images").mkdir(parents=True)
    (root / "unk" / "labels").mkdir()
    shutil.copy(sample_scenes / "images" / "scene_00.tif", root / "unk" / "images" / "a.tif")
    with rasterio.open(sample_scenes / "labels" / "scene_00.tif") as src:
        profile = src.profile
    with rasterio.open(root / "unk" / "labels" / "a.tif", "w", **profile) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 7, profile["dtype"]))
    # A scene whose every pixel is nodata.
    with rasterio.open(sample_scenes / "images" / "scene_00.tif") as src:
        profile = {**src.profile, "nodata": 0}
    (root / "nodata").mkdir()
    with rasterio.open(root / "nodata" / "a.tif", "w", **profile) as dst:
        dst.write(np.zeros((profile["count"], profile["height"], profile["width"]), profile["dtype"]))
    # A head whose weights file is a pickle that runs code when unpickled without weights_only.
    poisoned = root / "poisoned-head"
    shutil.copytree(sample_demo / "sweep" / "best", poisoned)
    (poisoned / "head.pt").write_bytes(pickle.dumps(PicklePayload(str(root / "pwned"))))
    (root / "not-a-db.db").write_text("this is not an MLflow store")
    return {
        "root": root, "demo": sample_demo, "scenes": sample_scenes, "ckpt": ckpt, "broken": broken,
        "broken_old": broken_old,
        "poisoned": poisoned,
    }  # fmt: skip


SMP = ["--config", "configs/ingest/sample.yaml"]
SCN = "inputs=[{scenes}/images/*.tif]"
CASES = [
    # (job, argv, expected words in the message, path that must not exist afterwards)
    ("ingest.py", [*SMP, SCN, "tile_sise=64"], "unknown config key 'tile_sise'", None),
    ("ingest.py", [*SMP, "output={root}/o1"], "inputs", "{root}/o1"),
    (
        "ingest.py",
        [*SMP, "inputs=[{root}/nothing/*.tif]", "output={root}/o2"],
        "match no image file",
        "{root}/o2/manifest.json",
    ),
    (
        "ingest.py",
        [*SMP, "inputs=[{root}/not-a-raster.tif]", "output={root}/o3"],
        "not a readable raster",
        "{root}/o3/manifest.json",
    ),
    ("ingest.py", ["inputs=[{root}/float.tif]", "output={root}/o4"], "dtype", "{root}/o4/manifest.json"),
    ("ingest.py", [*SMP, SCN, "bands=[7]", "output={root}/o5"], "band", "{root}/o5/manifest.json"),
    (
        "ingest.py",
        [*SMP, "inputs=[{root}/small/images/*.tif]", "output={root}/o6"],
        "no label mask",
        "{root}/o6/manifest.json",
    ),
    (
        "ingest.py",
        [*SMP, SCN, "tile_size=512", "output={root}/o7"],
        "smaller than",
        "{root}/o7/manifest.json",
    ),
    ("ingest.py", [*SMP, SCN, "output=s3://rsdiff-no-such-bucket/x"], "rsdiff-no-such-bucket", None),
    (
        "ingest.py",
        [*SMP, "inputs=[{scenes}/images/scene_00.tif,{root}/missing.tif]", "output={root}/o8"],
        "missing.tif does not exist",
        "{root}/o8/manifest.json",
    ),
    (
        "ingest.py",
        ["--config", "configs/ingest/missing.yaml"],
        "is neither a file nor a preset of ingest; its presets: ['dubai', 'sample']",
        None,
    ),
    ("pretrain.py", ["data.shards={root}/empty", "run.storage={root}/r1"], "no manifest.json", "{root}/r1"),
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "optim.max_steps=0", "run.storage={root}/r2"],
        "optim.max_steps=0 is out of range",
        "{root}/r2",
    ),
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "optim.lr=fast"],
        "bad value for config key 'optim.lr'",
        None,
    ),
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "model.in_channels=3", "run.storage={root}/r3"],
        "model.in_channels=3 but the shards",
        "{root}/r3",
    ),
    (
        "extract.py",
        ["checkpoint={root}/empty", "output={root}/f1"],
        "/empty: no DDPM checkpoint there; pass the checkpoint folder printed by jobs/pretrain.py",
        "{root}/f1/table.json",
    ),
    (
        "extract.py",
        ["checkpoint={broken}", "output={root}/f2"],
        "cannot load weights of {broken}/ema/diffusion_pytorch_model.safetensors",
        "{root}/f2/table.json",
    ),
    (
        "extract.py",
        ["checkpoint={broken_old}", "output={root}/f2b"],
        "cannot load weights of {broken_old}/model.pt",
        "{root}/f2b/table.json",
    ),
    (
        "extract.py",
        ["checkpoint={ckpt}", "blocks=[up9.res9]", "output={root}/f3"],
        "unknown block 'up9.res9'; valid blocks: ['mid', 'up0.res0'",
        "{root}/f3/table.json",
    ),
    (
        "extract.py",
        ["checkpoint={ckpt}", "timesteps=[5000]", "output={root}/f4"],
        "timesteps [5000]: each must be in [0, 999]",
        "{root}/f4/table.json",
    ),
    ("sweep.py", ["features={root}/empty", "output={root}/s1"], "no table.json at", "{root}/s1/best"),
    (
        "sweep.py",
        ["features={demo}/features", "tracking.uri=http://127.0.0.1:9", "output={root}/s2"],
        "MLflow tracking URI 'http://127.0.0.1:9' is unreachable",
        "{root}/s2/best",
    ),
    (
        "sweep.py",
        ["features={demo}/features", "search.timesteps=[[7]]", "output={root}/s3"],
        "not in the extracted features: timesteps [7]",
        "{root}/s3/best",
    ),
    (
        "predict.py",
        ["head={root}/empty", "inputs=[{scenes}/images/scene_00.tif]", "output={root}/p1"],
        "no head artifact",
        "{root}/p1/predictions.json",
    ),
    (
        "predict.py",
        ["head={demo}/sweep/best", "inputs=[{root}/nothing.tif]", "output={root}/p2"],
        "nothing.tif does not exist",
        "{root}/p2/predictions.json",
    ),
    (  # an explicit file that does not exist is an error even when another input matches
        "predict.py",
        [
            "head={demo}/sweep/best",
            "inputs=[{scenes}/images/scene_00.tif,{root}/gone.tif]",
            "output={root}/p4",
        ],
        "gone.tif does not exist",
        "{root}/p4/predictions.json",
    ),
    (
        "predict.py",
        ["head={demo}/sweep/best", "inputs=[{scenes}/images/scene_00.tif]", "overlap=64", "output={root}/p3"],
        "overlap=64",
        "{root}/p3/predictions.json",
    ),
    ("evaluate.py", ["predictions={root}/empty"], "no predictions.json", "{root}/empty/metrics.json"),
    (
        "evaluate.py",
        [
            "predictions={demo}/predictions",
            "labels.mask_template={dir}/missing/{stem}.png",
            "output={root}/e1.json",
        ],
        "no label mask",
        "{root}/e1.json",
    ),
    (
        "label_efficiency.py",
        ["features={demo}/features", "ks=[1000]", "output={root}/l1"],
        "ks=[1000] must be in [1, ",
        "{root}/l1/results.json",
    ),
    (
        "demo.py",
        ["trials=0", "workdir={root}/d1"],
        "trials, pretrain_steps and head_epochs must be >= 1",
        "{root}/d1",
    ),
    (
        "demo.py",
        ["predict_overlap=64", "workdir={root}/d2"],
        "predict_overlap=64 must be in [0, tile_size=64)",
        "{root}/d2",
    ),
    # Names become folders under a storage root: nothing may escape it.
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "run.storage={root}/r4/runs", "run.name=../../escape"],
        "run.name='../../escape' is not a plain name",
        "{root}/escape",
    ),
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "run.storage={root}/r5", "run.name={root}/abs"],
        "is not a plain name",
        "{root}/abs",
    ),
    (
        "sweep.py",
        ["features={demo}/features", "storage={root}/t1/tune", "name=../../x", "output={root}/s4"],
        "name='../../x' is not a plain name",
        "{root}/x",
    ),
    # Numbers that would silently ruin a run, or fail only inside the workers.
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "optim.ema_decay=2.0"],
        "optim.ema_decay=2.0 is out of range",
        None,
    ),
    (
        "pretrain.py",
        ["data.shards={demo}/shards", "optim.lr=-1"],
        "optim.lr=-1.0 is out of range: it must be",
        None,
    ),
    ("pretrain.py", ["data.shards={demo}/shards", "optim.warmup_steps=500"], "optim.warmup_steps=500", None),
    ("pretrain.py", ["data.shards={demo}/shards", "data.norm_scale=0"], "data.norm_scale=0.0", None),
    (
        "sweep.py",
        ["features={demo}/features", "search.dropout=[1.5]", "output={root}/s5"],
        "search.dropout",
        None,
    ),
    (
        "ingest.py",
        [*SMP, SCN, "max_nodata_fraction=-0.1", "output={root}/o9"],
        "max_nodata_fraction=-0.1",
        None,
    ),
    # Labels that match no class, and scenes with no valid pixel, are refused (no manifest).
    (
        "ingest.py",
        [
            *SMP,
            "inputs=[{root}/unk/images/*.tif]",
            "labels.unknown=ignore",
            "val_fraction=0",
            "output={root}/o10",
        ],
        "no label pixel matched a class",
        "{root}/o10/*",  # no manifest, and no orphan shards
    ),
    (
        "ingest.py",
        [
            *SMP,
            "inputs=[{root}/nodata/a.tif]",
            "labels.mask_template=null",
            "max_nodata_fraction=1.0",
            "val_fraction=0",
            "output={root}/o11",
        ],
        "no valid pixel",
        "{root}/o11/*",
    ),
    # A hostile head file: refused without running it, and without torch's "weights_only=False" advice.
    (
        "predict.py",
        ["head={poisoned}", "inputs=[{scenes}/images/scene_00.tif]", "output={root}/p5"],
        "cannot load weights of",
        "{root}/pwned",
    ),
    # A tracking store that cannot work fails before any work, and nothing is published.
    (
        "evaluate.py",
        ["predictions={demo}/predictions", "tracking.uri=http://127.0.0.1:9", "output={root}/e2.json"],
        "unreachable",
        "{root}/e2.json",
    ),
    (
        "evaluate.py",
        [
            "predictions={demo}/predictions",
            "tracking.uri=sqlite:///{root}/not-a-db.db",
            "output={root}/e3.json",
        ],
        "cannot be opened",
        "{root}/e3.json",
    ),
    (
        "predict.py",
        [
            "head={demo}/sweep/best",
            "inputs=[{scenes}/images/scene_00.tif]",
            "tracking.uri=sqlite:///{root}/not-a-raster.tif/m.db",
            "output={root}/p6",
        ],
        "MLflow tracking store",
        "{root}/p6/predictions.json",
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("job", "argv", "needle", "absent"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_gives_one_clear_message(job, argv, needle, absent, bad_inputs, ray_cluster):
    fmt = {k: str(v) for k, v in bad_inputs.items()}
    done = run_job_inline(job, *[a.format(**fmt) if "{dir}" not in a else a for a in argv])
    code, err = done.returncode, done.stderr
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"rsdiff {job[:-3]}: error:")]
    assert len(lines) == 1, err[-2000:]
    assert needle.format(**fmt) in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err
    if absent:  # a path, or a pattern of which nothing may exist
        assert not glob.glob(absent.format(**fmt)), glob.glob(absent.format(**fmt))
