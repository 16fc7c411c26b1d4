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

    checks.json            file name -> {"bytes", "sha256"}: what the build wrote

The entry is built under a temporary name and renamed into place, under an exclusive ``flock`` on
``{key}.lock``, so concurrent processes build it once and nobody maps a half-written copy. An
entry is checked against ``checks.json`` before a process maps it (sizes, then a sha256 of every
file, once per process): a truncated or altered entry is deleted and built again. Entries not used
for longest are deleted to make room, counting the builds other processes have in flight, before
the free disk is checked; a table larger than ``max_gb`` or than the free disk, or a build the
disk refuses, is read from storage as before, with a warning.

The cache folder is this user's: ``{system temp}/rsdiff-cache-{uid}`` by default, created mode
0700; a folder owned by another user or writable by others is not used (another local user could
otherwise plant entries), nor is one that cannot be written: the table is read from storage.
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
CHECKS = "checks.json"
EXPECTED = "expected-bytes"  # in a build's temporary folder: what the finished entry will take
LAYOUT = 1  # of an entry's files; part of its key, so a new layout never maps an old entry


@dataclass
class TableCacheConfig:
    """How head fitting reads a feature table (sweep trials, label-efficiency draws).

    ``node_cache``: copy the table to node-local disk once and share it (off: read parts from
    storage every pass). ``cache_dir``: where; null = ``$RSDIFF_CACHE_DIR`` or
    ``{system temp}/rsdiff-cache-{uid}``. ``max_gb``: the cache's size bound on each node.
    ``memory_mb``: a head trains from in-memory tensors when the selected channels of its rows fit
    this budget (fp16, per process, on the head's device), else it streams batches.
    """

    node_cache: bool = True
    cache_dir: str | None = None
    max_gb: float = bounded(50.0, gt=0)
    memory_mb: float = bounded(4096.0, ge=0)


def cache_root(cfg: TableCacheConfig) -> Path:
    """The cache folder on this node (this user's own by default)."""
    chosen = cfg.cache_dir or os.environ.get("RSDIFF_CACHE_DIR")
    return Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"rsdiff-cache-{os.getuid()}"


class CacheUnusable(Exception):
    """The cache folder cannot be trusted or written; the table is read from storage instead."""


def private_folder(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one belongs to this user and is
    not writable by other users.

    Raises:
        CacheUnusable: owned by another user, or writable by others.
        OSError: it cannot be created (a file in the way, a read-only disk).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise CacheUnusable(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise CacheUnusable(f"{path} is writable by other users (mode {st.st_mode & 0o777:o}); chmod 700 it")


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
    """The node-local copy of the table at ``root`` (``meta`` = its ``table.json``), checked and
    mapped, made now if no process on this node made it yet; None when it does not fit, the disk
    refuses the build or the cache folder cannot be used (then read from storage, with a warning).
    Checking and mapping happen under the entry's lock, so an eviction or rebuild cannot pull the
    files away in between (once mapped, a deleted entry stays readable until unmapped)."""
    cache = cache_root(cfg)
    try:
        private_folder(cache)
        return _local_copy(cache, root, meta, cfg)
    except (OSError, CacheUnusable) as exc:
        log.warning(
            "node cache %s not used (%s); reading feature table %s from storage on every pass",
            cache, exc, storage.display(root),
        )  # fmt: skip
        return None


def _local_copy(cache: Path, root: str, meta: dict, cfg: TableCacheConfig) -> LocalTable | None:
    key = table_key(root, meta)
    entry = cache / key
    need = table_bytes(meta)
    with _locked(cache / f"{key}.lock"):
        if (entry / PARTS).is_file():
            problem = check_entry(entry)
            if problem is None:
                os.utime(entry)  # most recently used
                return LocalTable(entry)
            log.warning("the node copy %s of %s is damaged: %s; building it again", entry,
                        storage.display(root), problem)  # fmt: skip
            _remove(entry)
        for stale in cache.glob(f"{key}.tmp-*"):  # a build killed midway (we hold its key's lock)
            shutil.rmtree(stale, ignore_errors=True)
        short = make_room(cache, key, need, int(cfg.max_gb * 2**30))
        if short:
            log.warning("feature table %s (%.1f GB as a local copy) does not fit the node cache %s (%s); "
                        "reading it from storage on every pass", storage.display(root), need / 2**30,
                        cache, short)  # fmt: skip
            return None
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache))
        try:
            (tmp / EXPECTED).write_text(str(need))
            _build(root, meta, tmp)
            (tmp / EXPECTED).unlink()
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
        log.info(
            "copied feature table %s to %s in %.1f s", storage.display(root), entry, time.perf_counter() - t0
        )
        return LocalTable(entry)


def _remove(entry: Path) -> None:
    """Delete an entry: renamed aside first, so no process sees it half deleted."""
    aside = entry.with_name(f"{entry.name}.tmp-removed-{os.getpid()}")
    entry.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


_CHECKED: set[tuple[str, tuple]] = set()  # (entry, its files' mtimes) this process hashed


def check_entry(entry: Path) -> str | None:
    """What is wrong with a complete entry (a missing, resized or altered file), or None. Sizes are
    checked every time, contents (sha256) once per process and whenever a file's mtime changed."""
    try:
        checks = json.loads((entry / CHECKS).read_text())
    except (OSError, ValueError):
        return f"no readable {CHECKS}"
    on_disk = {f.name for f in entry.glob("*.npy")}
    if on_disk != set(checks) - {PARTS}:
        return f"files {sorted(on_disk ^ (set(checks) - {PARTS}))} differ from those built"
    for name, want in checks.items():
        size = (entry / name).stat().st_size if (entry / name).is_file() else -1
        if size != want["bytes"]:
            return f"{name} holds {size} bytes, {want['bytes']} were written"
    stamp = (str(entry), tuple((f.name, f.stat().st_mtime_ns) for f in sorted(entry.iterdir())))
    if stamp not in _CHECKED:
        for name, want in checks.items():
            if _sha256(entry / name) != want["sha256"]:
                return f"{name} is not what was written (sha256 differs)"
        _CHECKED.add(stamp)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
    (out / PARTS).write_text(json.dumps(ranges))
    checks = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(out.glob("*.npy"))}
    checks[PARTS] = {"bytes": (out / PARTS).stat().st_size, "sha256": _sha256(out / PARTS)}
    (out / CHECKS).write_text(json.dumps(checks))


def make_room(cache: Path, keep: str, need: int, max_bytes: int) -> str | None:
    """Evict the least recently used entries until ``need`` more bytes fit both under ``max_bytes``
    and on the free disk (keeping 10% free), counting what the builds in flight on this node will
    still write; None when they fit, else why not."""
    if need > max_bytes:
        return f"max_gb={max_bytes / 2**30:g}"
    entries = [p for p in cache.iterdir() if p.is_dir() and (p / PARTS).is_file() and p.name != keep]
    used = {p: _size(p) for p in entries}
    building, still_to_write = _in_flight(cache, keep)

    def why_not() -> str | None:
        if sum(used.values()) + building + need > max_bytes:
            return f"max_gb={max_bytes / 2**30:g} with the other copies"
        free = free_bytes(cache) - still_to_write
        return None if need <= 0.9 * free else f"{free / 2**30:.1f} GB free after the builds in flight"

    for p in sorted(entries, key=lambda e: e.stat().st_mtime):
        if why_not() is None:
            break
        with _locked(cache / f"{p.name}.lock", wait=False) as free:
            if not free:  # another process is opening it right now: leave it
                continue
            _remove(p)
        del used[p]
        log.info("evicted cached feature table %s", p.name)
    return why_not()


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding ``folder``."""
    return shutil.disk_usage(folder).free


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _in_flight(cache: Path, keep: str) -> tuple[int, int]:
    """``(bytes, still to write)`` of the entries other processes are building now. A build whose
    key's lock is free was killed midway: its folder is deleted."""
    total = remaining = 0
    for tmp in cache.glob("*.tmp-*"):
        key = tmp.name.split(".tmp-")[0]
        if key == keep or not tmp.is_dir():
            continue
        with _locked(cache / f"{key}.lock", wait=False) as free:
            if free:
                shutil.rmtree(tmp, ignore_errors=True)
                continue
        try:
            expected = int((tmp / EXPECTED).read_text())
        except (OSError, ValueError):
            continue
        total += expected
        remaining += max(0, expected - _size(tmp))
    return total, remaining


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
