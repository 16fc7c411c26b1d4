"""WebDataset tar shards: the sample codec, a size-capped atomic shard writer, and a reader.

A sample has key ``<scene>/<row>_<col>`` and members

- ``tile.npy``: ``(C, H, W)`` array in the source dtype (uint8/uint16), pixels as read;
- ``label.npy``: optional ``(H, W)`` uint8 class ids, 255 = no label;
- ``meta.json``: scene id, window ``[row, col, height, width]``, CRS (WKT or null), transform
  (6 GDAL-order numbers or null) and nodata fraction.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from rsdiff import storage
from rsdiff.tempfiles import task_tempdir


@dataclass
class Sample:
    """One decoded tile."""

    key: str
    image: np.ndarray  # (C, H, W) source dtype
    label: np.ndarray | None  # (H, W) uint8, or None for unlabeled imagery
    meta: dict[str, Any]


@dataclass
class ShardInfo:
    """A finished shard: its URI, sample count and size in bytes."""

    uri: str
    samples: int
    bytes: int


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: Sample) -> dict[str, Any]:
    """A :class:`Sample` as the dict of bytes that ``webdataset.TarWriter`` stores."""
    out: dict[str, Any] = {
        "__key__": sample.key,
        "tile.npy": _npy(sample.image),
        "meta.json": json.dumps(sample.meta).encode(),
    }
    if sample.label is not None:
        out["label.npy"] = _npy(sample.label)
    return out


def decode_sample(raw: dict[str, Any]) -> Sample:
    """The inverse of :func:`encode_sample` for a dict read back from a shard."""
    label = raw.get("label.npy")
    return Sample(
        key=raw["__key__"],
        image=np.load(io.BytesIO(raw["tile.npy"]), allow_pickle=False),
        label=None if label is None else np.load(io.BytesIO(label), allow_pickle=False),
        meta=json.loads(raw["meta.json"]),
    )


class ShardWriter:
    """Writes samples into ``{out}/{prefix}-{n:05d}.tar`` shards of at most ~``max_bytes`` each.

    Each shard is built in a local temporary file and published atomically when full (or on
    ``close``), so an interrupted ingest never leaves a truncated shard. Used as a context
    manager, a failure deletes the shards this writer already published.
    """

    def __init__(self, out_uri: str, prefix: str, max_bytes: int) -> None:
        self.out_uri = out_uri
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tmpdir = task_tempdir("shard")
        self._file: Any = None
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: Sample) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(encode_sample(sample))
        self._count += 1
        if self._file.tell() >= self.max_bytes:
            self._publish()

    def close(self) -> list[ShardInfo]:
        """Publish the last partial shard; returns every shard written."""
        if self._tar is not None:
            self._publish()
        self._tmpdir.cleanup()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress and delete the published ones."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        for info in self.shards:
            storage.delete(info.uri)
        self.shards = []
        self._tmpdir.cleanup()

    def _open(self) -> None:
        path = Path(self._tmpdir.name) / "current.tar"
        self._file = open(path, "wb")  # noqa: SIM115 - closed by TarWriter in _publish
        # USTAR: one 512-byte header per member (PAX adds a second one that readers must parse).
        self._tar = wds.TarWriter(self._file, encoder=False, format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _publish(self) -> None:
        assert self._tar is not None
        self._tar.close()  # also closes self._file
        self._tar = None
        path = Path(self._tmpdir.name) / "current.tar"
        uri = storage.join(self.out_uri, f"{self.prefix}-{len(self.shards):05d}.tar")
        # Recorded before the upload: an abort that interrupts it (Ctrl-C) still deletes the shard.
        self.shards.append(ShardInfo(uri, self._count, path.stat().st_size))
        storage.upload(path, uri)
        path.unlink()


def raise_error(exc: Exception) -> bool:
    """Shard read error handler that re-raises (the default for one-shard reads)."""
    raise exc


def iter_shard(
    uri: str, handler: Callable[[Exception], bool] = raise_error, keys: Container[str] | None = None
) -> Iterator[Sample]:
    """Decode every sample of one shard (or only those whose key is in ``keys``; the others are
    skipped undecoded), streamed: S3 objects are not downloaded first."""
    for raw in _raw_samples(uri, handler):
        if keys is None or raw["__key__"] in keys:
            yield decode_sample(raw)


def shard_keys(uri: str) -> list[str]:
    """The sample keys of one shard, in order, without decoding any sample."""
    return [raw["__key__"] for raw in _raw_samples(uri, raise_error)]


def _raw_samples(uri: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    stream = storage.open_stream(uri)
    try:
        files = tar_file_expander([{"url": uri, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
    finally:
        stream.close()
