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

A resume replays the draws of the samples it skips (:mod:`rsdiff.train.shuffle`) when the shards'
sample counts are known and the epoch read so far matched them; it then reads only the shards that
hold the tiles waiting in the shuffle buffer and the shard it stands in. Otherwise (no counts, or a
damaged shard met earlier in the epoch) it re-reads the epoch up to its position.
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
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from rsdiff import storage
from rsdiff.data.dihedral import dihedral
from rsdiff.data.normalize import Normalizer
from rsdiff.errors import DataError
from rsdiff.train.shuffle import EpochShuffle, ShardIndex, fast_forward, locate

log = logging.getLogger(__name__)


@dataclass
class StreamPosition:
    """Where one (rank, loader worker) slot's stream stands: ``consumed`` samples of ``epoch`` used;
    ``replayable`` when the epoch read up to there matched the shard index, so a resume may replay
    the draws instead of re-reading the samples."""

    epoch: int = 0
    consumed: int = 0
    replayable: bool = False


@dataclass
class _EpochStart:
    """Where a slot's epoch continues: its rng and shuffle, the tiles already read and held, the
    next item's index and the next sample id to read; ``tail`` once the reading is over."""

    rng: np.random.Generator
    shuffle: EpochShuffle
    held: dict[int, np.ndarray]
    index: int = 0
    head: int = 0
    tail: list[int] | None = None


@dataclass
class _Agreement:
    """Whether what a slot read of its epoch so far matches the shard index."""

    ok: bool


class ShardStream(IterableDataset):
    """Endless, resumable stream of normalised, augmented tiles.

    Items are dicts: ``x`` ``(C, size, size)`` float32, plus ``slot``, ``epoch``, ``index`` (the
    sample's place in its slot's epoch) and ``replayable``, so a consumer can record how far each
    slot was read (:meth:`positions_after`) and a new stream can continue exactly there (``resume``).

    A slot's epoch is a deterministic function of ``(seed, slot, epoch)``: its shard order, the
    shuffle buffer (emptied at the end of each epoch) and the augmentation draws. With ``index``
    (the shards' sample counts), a resume replays the draws of the skipped samples and reads only
    the shards holding the buffered tiles and the shard it stands in: what it reads no longer grows
    with the position in the epoch (the replay does, a few microseconds per skipped sample).
    Without it, or when the epoch met a damaged or miscounted shard before the position, the resume
    re-reads the epoch up to there (decoding, but not normalising or augmenting, the skipped
    samples).

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
        index: what the manifest says each shard holds (see :class:`~rsdiff.train.shuffle.ShardIndex`);
            None: resumes re-read their epoch up to the position.
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
        index: ShardIndex | None = None,
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
        self.index = index
        self._local_errors = 0  # errors this process met (one slot per loader process)
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
        replayable = bool(batch["replayable"][-1]) if "replayable" in batch else False
        epoch, index = int(batch["epoch"][-1]), int(batch["index"][-1])
        return {**positions, slot: StreamPosition(epoch, index + 1, replayable)}

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
        self._local_errors += 1
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

    def _raw_epoch(self, epoch: int, bad: set[str], start: tuple[int, int] = (0, 0)) -> Iterator[tuple]:
        """``(shard position, member, raw sample)`` of this slot's ``epoch``, from member
        ``start[1]`` of shard ``start[0]`` on (members before it are read, not decoded). A slot whose
        shards were all unreadable reads another readable shard instead (position -1). Raises
        DataError when no shard is readable."""
        slot, _ = self._slot()
        yielded = 0
        for k, uri in enumerate(self.shard_order(epoch)[start[0] :], start[0]):
            reader = self._read_shard(uri, bad)
            for j, raw in enumerate(reader):
                yielded += 1
                if k > start[0] or j >= start[1]:
                    yield k, j, raw
        if yielded or start != (0, 0):
            return
        candidates = [u for u in self.shards if u not in bad]
        random.Random(self.seed * 7919 + epoch * 104_729 + slot + 1).shuffle(candidates)
        for uri in candidates:
            for j, raw in enumerate(self._read_shard(uri, bad)):
                yielded += 1
                yield -1, j, raw
            if yielded:
                return
        raise DataError(
            f"none of the {len(self.shards)} shards (e.g. "
            f"{[storage.display(u) for u in self.shards][:3]}) gave a readable sample "
            f"({self.errors} errors); check the shards and their URI"
        )

    def _decode(self, raw: dict[str, Any]) -> np.ndarray:
        """The ``(C, H, W)`` tile of a raw sample. Raises DataError for a malformed one."""
        expect = len(self.normalizer.mean)
        tile = np.load(io.BytesIO(raw["tile.npy"]), allow_pickle=False)
        if tile.ndim != 3 or tile.shape[0] != expect or min(tile.shape[1:]) < self.size:
            raise DataError(
                f"sample {raw.get('__key__')} of {raw.get('__url__')}: tile.npy has shape "
                f"{tile.shape}, expected ({expect}, H, W) with H and W at least {self.size}"
            )
        return tile

    def _checked_tiles(self, epoch: int, bad: set[str], head: int, agree: _Agreement) -> Iterator[np.ndarray]:
        """This slot's valid tiles of ``epoch`` in read order from sample id ``head`` on, keeping
        ``agree.ok`` true only while every shard read holds the indexed count of tiles of the
        indexed shape and nothing was skipped as damaged."""
        counts = self.index.counts(self.shard_order(epoch)) if self.index else None
        agree.ok = agree.ok and counts is not None
        start = locate(counts, [head])[0] if counts is not None and head else (0, 0)
        errors, (shard, members) = self._local_errors, start
        for k, j, raw in self._raw_epoch(epoch, bad, start):
            try:
                tile = self._decode(raw)
            except Exception as exc:
                self._handler(exc)
                continue
            if agree.ok and counts is not None and self.index is not None:
                if k != shard:
                    agree.ok = k > shard and _shard_done(counts, shard, members, k)
                    shard, members = k, 0
                members += 1
                agree.ok = agree.ok and j < counts[k] and tile.shape == self.index.tile_shape
                agree.ok = agree.ok and self._local_errors == errors
            yield tile
        if agree.ok and counts is not None:
            agree.ok = _shard_done(counts, shard, members, len(counts)) and self._local_errors == errors

    def _fetch(
        self, order: list[str], counts: list[int], ids: list[int], shape: tuple[int, ...]
    ) -> dict[int, np.ndarray] | None:
        """The tiles of sample ids ``ids`` of an epoch reading ``order``, read from the shards that
        hold them (None, logged, when one of them no longer holds a tile of ``shape`` there)."""
        wanted: dict[int, dict[int, int]] = {}
        for sample, (k, j) in zip(ids, locate(counts, ids), strict=True):
            wanted.setdefault(k, {})[j] = sample
        tiles: dict[int, np.ndarray] = {}
        for k, members in sorted(wanted.items()):
            try:
                tiles.update(self._read_members(order[k], members))
            except storage.AccessError:
                raise
            except Exception as exc:
                log.warning("re-reading the epoch to resume: %s: %s", storage.display(order[k]), exc)
                return None
        if len(tiles) != len(ids) or any(t.shape != shape for t in tiles.values()):
            log.warning("re-reading the epoch to resume: the shards no longer hold what the index says")
            return None
        return tiles

    def _read_members(self, uri: str, members: dict[int, int]) -> dict[int, np.ndarray]:
        """``{members[j]: tile}`` for the ``j``-th samples of shard ``uri`` (reading stops after the last)."""
        tiles, last = {}, max(members)
        stream = storage.open_stream(uri)
        try:
            files = tar_file_expander([{"url": uri, "stream": stream}], handler=reraise_exception)
            for j, raw in enumerate(group_by_keys(files, handler=reraise_exception)):
                if j in members:
                    tiles[members[j]] = self._decode(raw)
                if j >= last:
                    break
        finally:
            stream.close()
        return tiles

    def _jump(self, slot: int, epoch: int, skip: int) -> _EpochStart | None:
        """The epoch continued after its first ``skip`` items by replaying their draws (None when
        the shards are not indexed or no longer match the index)."""
        order = self.shard_order(epoch)
        counts = self.index.counts(order) if self.index else None
        if counts is None or self.index is None:
            return None
        rng = np.random.default_rng([self.seed, slot, epoch])
        shuffle = EpochShuffle(self.shuffle_buffer, rng)
        shape = self.index.tile_shape
        jump = fast_forward(sum(counts), skip, shuffle, lambda: self._augmentation(shape, rng))
        if jump is None:
            log.warning("re-reading the epoch to resume: position %d is past the indexed epoch", skip)
            return None
        held = self._fetch(order, counts, jump.held, shape)
        if held is None:
            return None
        log.info(
            "slot %d resumes epoch %d at sample %d: draws replayed without reading, %d buffered tiles read",
            slot, epoch, skip, len(held),
        )  # fmt: skip
        return _EpochStart(rng, shuffle, held, index=skip, head=jump.head, tail=jump.tail)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._slot()
        start = self.resume.get(slot, StreamPosition())
        epoch, skip, replayable = start.epoch, start.consumed, start.replayable
        bad: set[str] = set()
        while True:
            yield from self._epoch(slot, epoch, skip, replayable, bad)
            epoch, skip, replayable = epoch + 1, 0, False

    def _epoch(self, slot: int, epoch: int, skip: int, replayable: bool, bad: set[str]) -> Iterator[dict]:
        """This slot's items of ``epoch`` from the ``skip``-th on."""
        begin = self._jump(slot, epoch, skip) if skip and replayable else None
        agree = _Agreement(ok=begin is not None or self.index is not None)
        if begin is None:
            rng = np.random.default_rng([self.seed, slot, epoch])
            begin = _EpochStart(rng, EpochShuffle(self.shuffle_buffer, rng), {})
        held, index = begin.held, begin.index

        def emit(sample: int) -> dict[str, Any] | None:
            nonlocal index
            index += 1
            return self._item(held.pop(sample), begin.rng, (slot, epoch, index - 1), skip, agree.ok)

        tail = begin.tail
        if tail is None:
            for sample, tile in enumerate(self._checked_tiles(epoch, bad, begin.head, agree), begin.head):
                held[sample] = tile
                out = begin.shuffle.push(sample)
                if out is not None and (item := emit(out)) is not None:
                    yield item
            tail = begin.shuffle.drain()
        for out in tail:
            if (item := emit(out)) is not None:
                yield item

    def _item(
        self, tile: np.ndarray, rng: np.random.Generator, where: tuple[int, int, int], skip: int, ok: bool
    ) -> dict[str, Any] | None:
        """The item ``where = (slot, epoch, index)`` (None for an index before ``skip``: only its
        draws); ``ok``: the epoch read so far matched the shard index."""
        crop, turns, flip = self._augmentation(tile.shape, rng)  # drawn for skipped tiles too
        slot, epoch, index = where
        if index < skip:
            return None
        x = self._prepare(tile, crop, turns, flip)
        return {"x": x, "slot": slot, "epoch": epoch, "index": index, "replayable": ok}

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


def _shard_done(counts: list[int], shard: int, members: int, upto: int) -> bool:
    """Whether shard position ``shard``, read to its end with ``members`` tiles, and the shards
    after it up to ``upto`` (which gave nothing) hold what ``counts`` says."""
    return (shard >= len(counts) or counts[shard] == members) and not any(counts[shard + 1 : upto])
