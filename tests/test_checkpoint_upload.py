"""Checkpoint uploads to S3 (``rsdiff.train.upload``, what pretraining's rank 0 hands Ray Train): whole
through S3 error bursts, sidecars last, and a file the store lost named instead of a checkpoint
registered without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage
from rsdiff.errors import StorageError
from rsdiff.train.upload import checkpoint_uploader, upload_verified

pytestmark = pytest.mark.unit

UPLOADS = 10
FILES = {  # a checkpoint folder's files (rsdiff.diffusion.checkpoint's layout), in bytes
    "model.pt": 300_000,
    "rsdiff.json": 300,
    "ema/config.json": 200,
    "ema/diffusion_pytorch_model.safetensors": 100_000,
    "ema/rsdiff-ema.json": 250,
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "checkpoint"
    for rel, size in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


@pytest.fixture
def through(monkeypatch: pytest.MonkeyPatch):
    """Point rsdiff's S3 client at a proxy (or back) for the rest of the test."""

    def point(url: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        storage._client_for_pid.cache_clear()

    yield point
    storage._client_for_pid.cache_clear()


def test_checkpoints_upload_whole_through_s3_error_bursts_with_the_sidecars_last(
    folder, bucket, s3_endpoint, through, monkeypatch
):
    """The faults Ray Train's own upload (pyarrow 25's copy_files) passed over in silence, leaving
    folders without a file: every fifth request a 503 or a dropped connection, through 10 uploads
    of the same folder (retried at once: the backoff's length is not what is checked here)."""
    monkeypatch.setattr(storage, "backoff", lambda attempt: 0.0)
    order: list[str] = []
    real_upload = storage.upload
    monkeypatch.setattr(storage, "upload", lambda p, uri: (order.append(uri), real_upload(p, uri)))
    with FaultyS3Proxy(s3_endpoint, every=5, burst=1, max_faults=1000) as proxy:
        through(proxy.url)
        for i in range(UPLOADS):
            assert upload_verified(folder, f"{bucket}/run/checkpoint_{i:08d}") == FILES
    through(s3_endpoint)
    assert proxy.faults["503"] >= 3 and proxy.faults["reset"] >= 3, proxy.faults
    for i in range(UPLOADS):
        assert storage.sizes(f"{bucket}/run/checkpoint_{i:08d}") == FILES
    names = [uri.split("/", 5)[5] for uri in order[: len(FILES)]]
    assert names[-2:] == ["ema/rsdiff-ema.json", "rsdiff.json"], names


def test_a_file_the_store_lost_fails_the_upload_and_names_it(folder, bucket, monkeypatch):
    real_upload = storage.upload
    monkeypatch.setattr(
        storage, "upload", lambda p, uri: None if uri.endswith("safetensors") else real_upload(p, uri)
    )
    with pytest.raises(StorageError) as err:
        upload_verified(folder, f"{bucket}/run/checkpoint_00000005")
    assert str(err.value) == (
        f"checkpoint upload to {bucket}/run/checkpoint_00000005 is incomplete after it reported success: "
        "ema/diffusion_pytorch_model.safetensors (missing of 100000 bytes)"
    )


def test_local_run_folders_keep_ray_trains_own_copy(tmp_path, bucket):
    assert checkpoint_uploader(str(tmp_path / "runs" / "r")) is None
    assert callable(checkpoint_uploader(f"{bucket}/runs/r"))
