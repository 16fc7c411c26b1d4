"""A node-local copy of a feature table, made once per node and shared by every process on it.

Head fitting reads a table many times: every epoch of every sweep trial, every draw of a
label-efficiency run. Instead of fetching the parts from storage each time, the first process on a
node copies the table into ``{cache_dir}/{key}/`` as one memory-mappable array per split and
column; later processes (other trials on that node, other epochs) map the same files, so the
operating system's page cache holds one copy in RAM for all of them. ``key`` is a digest of the
table's URI and its ``table.json`` (which lists its parts by unique name), so a re-extraction to
the same URI gets a new entry and a stale copy is never read.

Layout of one entry::

    {split}.features.npy   (N, D) float16     {split}.labels.npy  (N,) uint8
    {split}.image.npy      (N,) unicode ids    {split}.rows.npy / .cols.npy  (N,) int32
    parts.json             part name -> [split, start, end): its rows in that split's arrays

The entry is built under a temporary name and renamed into place, under an exclusive ``flock`` on
``{key}.lock``, so concurrent processes build it once and nobody maps a half-written copy. Entries
not used for longest are deleted when the cache would exceed ``max_gb``; a table larger than the
free disk (or than ``max_gb``) is not copied and is read from storage as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.config import bounded
from rsdiff.features.parts import COLUMNS, read_part

log = logging.getLogger(__name__)

PARTS = "parts.json"
LAYOUT = 1  # of an entry's files; part of its key, so a new layout never maps an old entry


@dataclass
class TableCacheConfig:
    """How head fitting reads a feature table (sweep trials, label-efficiency draws).

    ``node_cache``: copy the table to node-local disk once and share it (off: read parts from
    storage every pass). ``cache_dir``: where; null = ``$RSDIFF_CACHE_DIR`` or
    ``{system temp}/rsdiff-cache``. ``max_gb``: the cache's size bound on each node.
    ``memory_mb``: a head trains from in-memory tensors when the selected channels of its rows fit
    this budget (fp16, per process, on the head's device), else it streams batches.
    """

    node_cache: bool = True
    cache_dir: str | None = None
    max_gb: float = bounded(50.0, gt=0)
    memory_mb: float = bounded(4096.0, ge=0)


def cache_root(cfg: TableCacheConfig) -> Path:
    """The cache folder on this node."""
    return Path(
        cfg.cache_dir or os.environ.get("RSDIFF_CACHE_DIR") or Path(tempfile.gettempdir()) / "rsdiff-cache"
    )


def table_key(root: str, meta: dict) -> str:
    """A digest of the table's URI and its ``table.json``: a new extraction gets a new key."""
    text = json.dumps({"uri": storage.absolute(root), "meta": meta, "layout": LAYOUT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def table_bytes(meta: dict) -> int:
    """Bytes of the node-local copy of a table (all splits; fp16 features + per-row columns)."""
    rows = sum(int(p["rows"]) for p in meta["parts"])
    return rows * (int(meta["dim"]) * 2 + 1 + 8 + 128)  # + labels, rows/cols, ~32-char ids


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; without ``wait``, yield False if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def local_copy(root: str, meta: dict, cfg: TableCacheConfig) -> LocalTable | None:
    """The node-local copy of the table at ``root`` (``meta`` = its ``table.json``), made now if
    no process on this node made it yet, and mapped; None when it does not fit (then read from
    storage). Mapping happens under the entry's lock, so an eviction cannot pull the files away
    in between (once mapped, a deleted entry stays readable until unmapped)."""
    cache = cache_root(cfg)
    key = table_key(root, meta)
    entry = cache / key
    need = table_bytes(meta)
    with _locked(cache / f"{key}.lock"):
        if (entry / PARTS).is_file():
            os.utime(entry)  # most recently used
            return LocalTable(entry)
        for stale in cache.glob(f"{key}.tmp-*"):  # a build killed midway (we hold its key's lock)
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(cache).free
        if need > cfg.max_gb * 2**30 or need > 0.9 * free:
            log.warning(
                "feature table %s (%.1f GB as a local copy) exceeds the node cache (max_gb=%g, %.1f GB free "
                "in %s); reading it from storage on every pass", storage.display(root), need / 2**30,
                cfg.max_gb, free / 2**30, cache,
            )  # fmt: skip
            return None
        _evict(cache, keep=key, room=need, max_bytes=int(cfg.max_gb * 2**30))
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache))
        try:
            _build(root, meta, tmp)
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "copied feature table %s to %s in %.1f s", storage.display(root), entry, time.perf_counter() - t0
        )
        return LocalTable(entry)


def _build(root: str, meta: dict, out: Path) -> None:
    """Concatenate each split's parts into one ``.npy`` per column (features written in place)."""
    ranges: dict[str, list[Any]] = {}
    dim = int(meta["dim"])
    for split in sorted({p["split"] for p in meta["parts"]}):
        parts = [p for p in meta["parts"] if p["split"] == split]
        total = sum(int(p["rows"]) for p in parts)
        feats = np.lib.format.open_memmap(out / f"{split}.features.npy", "w+", np.float16, (total, dim))
        columns: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS[1:]}
        at = 0
        for p in parts:
            arrays = read_part(root, p["name"])
            n = len(arrays["labels"])
            feats[at : at + n] = arrays["features"]
            for c in columns:
                columns[c].append(arrays[c])
            ranges[p["name"]] = [split, at, at + n]
            at += n
        feats.flush()
        del feats
        for c, chunks in columns.items():
            np.save(out / f"{split}.{c}.npy", np.concatenate(chunks) if chunks else np.zeros(0))
    (out / PARTS).write_text(json.dumps(ranges))  # written last: the entry is complete


def _evict(cache: Path, keep: str, room: int, max_bytes: int) -> None:
    """Delete the least recently used complete entries until ``room`` more bytes fit in ``max_bytes``
    (processes still mapping a deleted entry keep reading it: the files stay until unmapped)."""
    entries = [p for p in cache.iterdir() if p.is_dir() and (p / PARTS).is_file() and p.name != keep]
    used = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    total = sum(used.values())
    for p in sorted(entries, key=lambda e: e.stat().st_mtime):
        if total + room <= max_bytes:
            break
        with _locked(cache / f"{p.name}.lock", wait=False) as free:
            if not free:  # another process is opening it right now: leave it
                continue
            shutil.rmtree(p, ignore_errors=True)
        total -= used[p]
        log.info("evicted cached feature table %s", p.name)


class LocalTable:
    """Read access to a node-local copy: memory-mapped columns of each split, sliced by part. All
    files are mapped when it is made (pages are read lazily, from the page cache)."""

    def __init__(self, entry: Path) -> None:
        self.entry = entry
        self.ranges: dict[str, list[Any]] = json.loads((entry / PARTS).read_text())
        self._maps = {
            tuple(f.name.split(".")[:2]): np.load(f, mmap_mode="r") for f in sorted(entry.glob("*.npy"))
        }

    def column(self, split: str, name: str) -> np.ndarray:
        """A whole column of ``split`` (memory-mapped)."""
        return self._maps[split, name]

    def part(self, name: str) -> dict[str, np.ndarray]:
        """The columns of one part, as :func:`~rsdiff.features.parts.read_part` returns them."""
        split, start, end = self.ranges[name]
        return {c: self.column(split, c)[start:end] for c in COLUMNS}
