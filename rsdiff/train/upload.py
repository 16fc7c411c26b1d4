"""Checkpoint uploads to S3 that are complete or fail, never partial.

Ray Train's default upload, ``pyarrow.fs.copy_files``, can return success with a file missing: when
S3 answers a part upload with ``503 SlowDown`` past pyarrow's retries, pyarrow 25 logs "Error ignored
when destroying file" and goes on. Ray Train then registers a checkpoint folder without its
``model.pt`` or its EMA files. So for an S3 run folder, rank 0 uploads each checkpoint through
rsdiff's own S3 client (:func:`rsdiff.storage.upload`: transient errors retried with backoff, and
logged), sidecars last so that a folder half-uploaded by a dying rank is not taken for a checkpoint,
then lists the folder back and compares every file's size before Ray Train registers it. A mismatch
raises: the attempt fails, and Ray Train restarts it from the last registered checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.diffusion.checkpoint import EMA_META, META

SIDECARS = (EMA_META, META)  # written last, in this order: they mark an artifact complete


def upload_order(files: list[str]) -> list[str]:
    """``files`` (paths relative to the checkpoint folder) with the sidecars last."""
    last = {name: i for i, name in enumerate(SIDECARS)}
    return sorted(files, key=lambda f: (last.get(Path(f).name, -1), f))


def upload_verified(folder: Path, dest: str) -> dict[str, int]:
    """Upload every file under the local ``folder`` to ``dest`` (a folder URI), then check that
    ``dest`` holds each of them at its size. Returns ``{relative path: bytes}``.

    Raises:
        rsdiff.storage.StorageError: an upload failed after its retries, or the listing lacks a
            file or has one at another size (named in the message).
    """
    local = storage.sizes(str(folder))
    for rel in upload_order(list(local)):
        storage.upload(folder / rel, storage.join(dest, rel))
    stored = storage.sizes(dest)
    wrong = [f"{r} ({stored.get(r, 'missing')} of {n} bytes)" for r, n in local.items() if stored.get(r) != n]
    if wrong:
        raise storage.StorageError(
            f"checkpoint upload to {storage.display(dest)} is incomplete after it reported success: "
            + ", ".join(wrong)
        )
    return local


def checkpoint_uploader(run_dir: str) -> Callable[[Any, str], Any] | None:
    """Ray Train's ``checkpoint_upload_fn`` for checkpoints of the run folder ``run_dir``: the
    verified upload for S3; ``None`` (Ray Train's own copy) for a local or shared-disk folder."""
    if not storage.is_s3(run_dir):
        return None

    def upload(checkpoint: Any, name: str) -> Any:
        import ray.train

        upload_verified(Path(checkpoint.path), storage.join(run_dir, name))
        where = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(where.build_checkpoint_path_from_name(name), where.storage_filesystem)

    return upload
