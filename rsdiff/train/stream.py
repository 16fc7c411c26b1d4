"""The training data stream: WebDataset shards split by rank and DataLoader worker, resampled.

Each (rank, loader worker) slot owns a disjoint share of the shards per epoch (a seeded shuffle,
then ``rank``-strided, then ``worker``-strided). A slot with no share (fewer shards than slots)
draws random shards instead, so the stream never runs dry: the loop stops at ``max_steps`` and
every rank runs the same number of steps. Unreadable or truncated shards and malformed samples are
skipped, logged and counted in :attr:`ShardStream.errors` (shared across loader processes); a slot
whose shards of an epoch gave nothing reads another readable shard instead, and the stream fails
only when no shard is readable.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from rsdiff import storage
from rsdiff.data.normalize import Normalizer
from rsdiff.errors import DataError

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Endless stream of normalised, augmented ``(C, size, size)`` float32 tiles.

    Args:
        shards: shard URIs (local or s3://).
        rank, world_size: this process's place among the data-parallel workers.
        normalizer: source units -> [-1, 1].
        size: output crop in px (random crop when smaller than the tile).
        shuffle_buffer: samples held for shuffling (0 = none).
        augment: random flips and 90-degree rotations (overhead imagery has no "up").
        seed: base seed; the stream differs per rank, worker, epoch and ``seed``.
    """

    def __init__(
        self,
        shards: list[str],
        rank: int,
        world_size: int,
        normalizer: Normalizer,
        size: int,
        shuffle_buffer: int = 256,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        self.shards = list(shards)
        self.rank, self.world_size = rank, world_size
        self.normalizer = normalizer
        self.size = size
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.seed = seed
        self._errors = mp.Value("i", 0)
        self._shards_read = mp.Value("i", 0)

    @property
    def errors(self) -> int:
        """Shards (or members) skipped as unreadable/corrupt so far, across loader workers."""
        return int(self._errors.value)

    @property
    def shards_read(self) -> int:
        """Shards opened so far, across loader workers."""
        return int(self._shards_read.value)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def shard_order(self, epoch: int) -> list[str]:
        """The shards this slot reads in ``epoch`` (never empty)."""
        slot, slots = self._slot()
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        mine = order[slot::slots]
        if not mine:  # more slots than shards: resample
            rng = random.Random(self.seed * 7919 + epoch * 104_729 + slot)
            mine = [rng.choice(self.shards)]
        return mine

    def _handler(self, exc: Exception) -> bool:
        with self._errors.get_lock():
            self._errors.value += 1
        log.warning("skipping unreadable shard data (%s): %s", type(exc).__name__, str(exc)[:200])
        return True

    def _read_shard(self, uri: str, bad: set[str]) -> Generator[dict[str, Any], None, int]:
        """Yield the raw samples of one shard; returns how many. A shard that fails before giving
        any sample is added to ``bad``; errors are counted either way."""
        errors_before = self.errors
        try:
            stream = storage.open_stream(uri)
        except Exception as exc:
            self._handler(exc)
            bad.add(uri)
            return 0
        with self._shards_read.get_lock():
            self._shards_read.value += 1
        n = 0
        try:
            files = tar_file_expander([{"url": uri, "stream": stream}], handler=self._handler)
            for sample in group_by_keys(files, handler=self._handler):
                n += 1
                yield sample
        finally:
            stream.close()
        if n == 0 and self.errors > errors_before:
            bad.add(uri)
        return n

    def _raw_samples(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._slot()
        bad: set[str] = set()
        epoch = 0
        while True:
            yielded = 0
            for uri in self.shard_order(epoch):
                yielded += yield from self._read_shard(uri, bad)
            if not yielded:  # this slot's shards were unreadable: resample from the readable ones
                candidates = [u for u in self.shards if u not in bad]
                random.Random(self.seed * 7919 + epoch * 104_729 + slot + 1).shuffle(candidates)
                for uri in candidates:
                    yielded = yield from self._read_shard(uri, bad)
                    if yielded:
                        break
            if not yielded:
                raise DataError(
                    f"none of the {len(self.shards)} shards (e.g. "
                    f"{[storage.display(u) for u in self.shards][:3]}) gave a readable sample "
                    f"({self.errors} errors); check the shards and their URI"
                )
            epoch += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot, _ = self._slot()
        rng = np.random.default_rng([self.seed, slot])
        buffer: list[np.ndarray] = []
        for raw in self._raw_samples():
            try:
                tile = np.load(io.BytesIO(raw["tile.npy"]), allow_pickle=False)
                if tile.ndim != 3 or tile.shape[0] != len(self.normalizer.mean):
                    raise DataError(
                        f"sample {raw.get('__key__')} of {raw.get('__url__')}: tile.npy has shape "
                        f"{tile.shape}, expected ({len(self.normalizer.mean)}, H, W)"
                    )
            except Exception as exc:
                self._handler(exc)
                continue
            if self.shuffle_buffer <= 1:
                yield self._prepare(tile, rng)
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(tile)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], tile = tile, buffer[i]
            yield self._prepare(tile, rng)

    def _prepare(self, tile: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        _, h, w = tile.shape
        if h > self.size or w > self.size:
            r, c = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
            tile = tile[:, r : r + self.size, c : c + self.size]
        x = self.normalizer(tile)
        if self.augment:
            x = np.rot90(x, int(rng.integers(4)), axes=(1, 2))
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x))
