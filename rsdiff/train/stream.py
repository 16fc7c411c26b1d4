"""The training data stream: WebDataset shards split by rank and DataLoader worker, resampled,
resumable at the exact sample.

Each (rank, loader worker) slot owns a disjoint share of the shards per epoch (a seeded shuffle,
then ``rank``-strided, then ``worker``-strided). A slot with no share (fewer shards than slots)
draws random shards instead, so the stream never runs dry: the loop stops at ``max_steps`` and
every rank runs the same number of steps. Unreadable or truncated shards and malformed samples are
skipped, logged and counted in :attr:`ShardStream.errors` (shared across loader processes); a slot
whose shards of an epoch gave nothing reads another readable shard instead. The stream fails with
one :class:`~rsdiff.errors.DataError` naming the shards when more than ``max_bad_fraction`` of the
rank's share of shards turned out damaged (the data would otherwise shrink silently), or when no
shard is readable; a store this process cannot use at all (credentials rejected or expired, access
denied, no such bucket: :class:`~rsdiff.storage.AccessError`) fails it at once, never "a bad shard".
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from rsdiff import storage
from rsdiff.data.dihedral import dihedral
from rsdiff.data.normalize import Normalizer
from rsdiff.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class StreamPosition:
    """Where one (rank, loader worker) slot's stream stands: ``consumed`` samples of ``epoch`` used."""

    epoch: int = 0
    consumed: int = 0


class ShardStream(IterableDataset):
    """Endless, resumable stream of normalised, augmented tiles.

    Items are dicts: ``x`` ``(C, size, size)`` float32, plus ``slot``, ``epoch`` and ``index`` (the
    sample's place in its slot's epoch), so a consumer can record how far each slot was read
    (:meth:`positions_after`) and a new stream can continue exactly there (``resume``).

    A slot's epoch is a deterministic function of ``(seed, slot, epoch)``: its shard order, the
    shuffle buffer (emptied at the end of each epoch) and the augmentation draws. Resuming
    re-reads the current epoch up to the position (decoding, but not normalising or augmenting,
    the skipped samples), so the cost is bounded by one epoch of a slot's shards.

    Args:
        shards: shard URIs (local or s3://).
        rank, world_size: this process's place among the data-parallel workers.
        normalizer: source units -> [-1, 1].
        size: output crop in px (random crop when smaller than the tile).
        shuffle_buffer: samples held for shuffling (0 = none).
        augment: random flips and 90-degree rotations (overhead imagery has no "up").
        seed: base seed; the stream differs per rank, worker, epoch and ``seed``.
        resume: ``{slot: StreamPosition}`` to continue from (slots not named start at epoch 0).
        first_slot: the slot DataLoader worker 0 plays; worker ``w`` plays slot
            ``(first_slot + w) % workers`` of this rank, so that after a resume the loader's
            round-robin over workers continues with the slot whose batch was next.
        max_bad_fraction: the share of this rank's shards (``len(shards) / world_size``) that may
            be damaged (unreadable, truncated or holding malformed samples) before the stream fails.
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
        resume: dict[int, StreamPosition] | None = None,
        first_slot: int = 0,
        max_bad_fraction: float = 0.1,
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
        self.resume = dict(resume or {})
        self.first_slot = first_slot
        self.max_bad_fraction = max_bad_fraction
        self._errors = mp.Value("i", 0)
        self._damaged = mp.Array("b", len(self.shards))  # per shard: met damaged by a slot of this rank
        self._first_error = ""

    @property
    def errors(self) -> int:
        """Shards (or members) skipped as unreadable/corrupt so far, across loader workers."""
        return int(self._errors.value)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + (worker + self.first_slot) % workers, self.world_size * workers

    @staticmethod
    def positions_after(
        positions: dict[int, StreamPosition], batch: dict[str, torch.Tensor]
    ) -> dict[int, StreamPosition]:
        """``positions`` updated with a consumed batch (one slot's samples, in stream order)."""
        slot = int(batch["slot"][-1])
        return {**positions, slot: StreamPosition(int(batch["epoch"][-1]), int(batch["index"][-1]) + 1)}

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
        if isinstance(exc, storage.AccessError):
            raise exc
        with self._errors.get_lock():
            self._errors.value += 1
        self._first_error = self._first_error or f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("skipping unreadable shard data (%s): %s", type(exc).__name__, str(exc)[:200])
        return True

    def _count_damaged(self, uri: str) -> None:
        """Mark ``uri`` damaged and fail when the rank's damaged share passes the limit."""
        with self._damaged.get_lock():
            self._damaged[self.shards.index(uri)] = 1
            damaged = sum(self._damaged)
        share = len(self.shards) / self.world_size
        if damaged > self.max_bad_fraction * max(1.0, share):
            raise DataError(
                f"{damaged} damaged shards among the {share:.3g} that rank {self.rank} reads (more than "
                f"data.max_bad_shard_fraction={self.max_bad_fraction:g}), e.g. {storage.display(uri)} "
                f"({self._first_error}); repair or re-ingest them, or raise data.max_bad_shard_fraction "
                "to train on what is left"
            )

    def _read_shard(self, uri: str, bad: set[str]) -> Generator[dict[str, Any], None, int]:
        """Yield the raw samples of one shard; returns how many. A shard that cannot be opened or
        read as a tar is damaged (counted once, see ``max_bad_fraction``), and added to ``bad``
        when it gave no sample; a malformed sample inside is only counted in :attr:`errors`."""
        failed: list[Exception] = []

        def handler(exc: Exception) -> bool:
            failed.append(exc)
            return self._handler(exc)

        try:
            stream = storage.open_stream(uri)
        except Exception as exc:
            handler(exc)
            stream = None
        n = 0
        if stream is not None:
            try:
                files = tar_file_expander([{"url": uri, "stream": stream}], handler=handler)
                for sample in group_by_keys(files, handler=handler):
                    n += 1
                    yield sample
            finally:
                stream.close()
        if failed:
            if n == 0:
                bad.add(uri)
            self._count_damaged(uri)
        return n

    def _raw_epoch(self, epoch: int, bad: set[str]) -> Iterator[dict[str, Any]]:
        """The raw samples of this slot's ``epoch``; a slot whose shards were all unreadable reads
        another readable shard instead. Raises DataError when no shard is readable."""
        slot, _ = self._slot()
        yielded = 0
        for uri in self.shard_order(epoch):
            yielded += yield from self._read_shard(uri, bad)
        if not yielded:
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

    def _tiles(self, epoch: int, bad: set[str], rng: np.random.Generator) -> Iterator[np.ndarray]:
        """This slot's tiles of ``epoch`` in shuffled order (the buffer is emptied at the end)."""
        expect = len(self.normalizer.mean)
        buffer: list[np.ndarray] = []
        for raw in self._raw_epoch(epoch, bad):
            try:
                tile = np.load(io.BytesIO(raw["tile.npy"]), allow_pickle=False)
                if tile.ndim != 3 or tile.shape[0] != expect or min(tile.shape[1:]) < self.size:
                    raise DataError(
                        f"sample {raw.get('__key__')} of {raw.get('__url__')}: tile.npy has shape "
                        f"{tile.shape}, expected ({expect}, H, W) with H and W at least {self.size}"
                    )
            except Exception as exc:
                self._handler(exc)
                continue
            if self.shuffle_buffer <= 1:
                yield tile
            elif len(buffer) < self.shuffle_buffer:
                buffer.append(tile)
            else:
                i = int(rng.integers(len(buffer)))
                buffer[i], tile = tile, buffer[i]
                yield tile
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._slot()
        start = self.resume.get(slot, StreamPosition())
        epoch, skip = start.epoch, start.consumed
        bad: set[str] = set()
        while True:
            rng = np.random.default_rng([self.seed, slot, epoch])
            for index, tile in enumerate(self._tiles(epoch, bad, rng)):
                crop, turns, flip = self._augmentation(tile.shape, rng)  # drawn for skipped tiles too
                if index >= skip:
                    x = self._prepare(tile, crop, turns, flip)
                    yield {"x": x, "slot": slot, "epoch": epoch, "index": index}
            epoch, skip = epoch + 1, 0

    def _augmentation(
        self, shape: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[tuple[int, int] | None, int, bool]:
        """The random crop origin (None when the tile is the crop size), quarter turns and flip."""
        _, h, w = shape
        crop = None
        if h > self.size or w > self.size:
            crop = (int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1)))
        if not self.augment:
            return crop, 0, False
        return crop, int(rng.integers(4)), bool(rng.random() < 0.5)

    def _prepare(
        self, tile: np.ndarray, crop: tuple[int, int] | None, turns: int, flip: bool
    ) -> torch.Tensor:
        if crop is not None:
            r, c = crop
            tile = tile[:, r : r + self.size, c : c + self.size]
        x = dihedral(self.normalizer(tile), turns, flip)
        return torch.from_numpy(np.ascontiguousarray(x))
