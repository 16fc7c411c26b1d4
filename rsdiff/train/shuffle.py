"""One slot's shuffled epoch as draws over sample ids, so a resume can replay the draws without
reading the samples it skips.

A slot's epoch reads its shards in order; sample ``id`` is the ``id``-th tile read. The shuffle
buffer and the augmentation draws depend only on the seed and how many tiles of which shape were
read, so when the shards' sample counts are known (the manifest's ``shard_samples``) the state after
``n`` emitted samples (which ids the buffer holds, where the reading stands) is found by replaying
the draws alone (a few microseconds per sample, no I/O). A resumed stream then reads only the shards
holding the buffered tiles and the shard it stands in, however far into the epoch it stopped.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from rsdiff.data.manifest import Manifest


@dataclass(frozen=True)
class ShardIndex:
    """What the manifest says the shards hold: ``samples[uri]`` tiles, each ``tile_shape`` ``(C, H, W)``."""

    samples: dict[str, int]
    tile_shape: tuple[int, int, int]

    @classmethod
    def of(cls, manifest: Manifest) -> ShardIndex | None:
        """The index of an ingest output (None for a manifest written before counts were recorded)."""
        uris = manifest.shard_uris()
        names = [n for split in sorted(manifest.shards) for n in manifest.shards[split]]
        if not names or any(n not in manifest.shard_samples for n in names):
            return None
        size = manifest.tile_size
        counts = {u: int(manifest.shard_samples[n]) for u, n in zip(uris, names, strict=True)}
        return cls(counts, (manifest.num_bands, size, size))

    def counts(self, order: list[str]) -> list[int] | None:
        """The sample count of each shard in ``order`` (None when one is not indexed)."""
        if any(u not in self.samples for u in order):
            return None
        return [self.samples[u] for u in order]


class EpochShuffle:
    """The shuffle buffer of one slot's epoch, over sample ids, drawing from ``rng``.

    ``push`` takes the next id read and returns the id to emit (None while the buffer fills);
    ``drain`` empties the buffer in a random order once the epoch's last tile is read. A buffer of
    size 0 or 1 emits every id as it is read.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.buffer: list[int] = []

    def push(self, sample: int) -> int | None:
        if self.size <= 1:
            return sample
        if len(self.buffer) < self.size:
            self.buffer.append(sample)
            return None
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], sample = sample, self.buffer[i]
        return sample

    def drain(self) -> list[int]:
        order = [self.buffer[i] for i in self.rng.permutation(len(self.buffer))]
        self.buffer = []
        return order


@dataclass
class Jump:
    """An epoch after ``skip`` emitted samples: the ids still to emit that were already read
    (``held``), the next id to read (``head``), and, once the epoch's reading is over, the order in
    which the held ids are emitted (``tail``; None while reading goes on)."""

    held: list[int]
    head: int
    tail: list[int] | None


def fast_forward(total: int, skip: int, shuffle: EpochShuffle, draw: Callable[[], object]) -> Jump | None:
    """Replay the first ``skip`` emissions of an epoch of ``total`` samples on ``shuffle``,
    calling ``draw`` after each (the per-sample augmentation draws). ``shuffle`` and its rng end
    exactly where the live stream's would. None when the epoch emits fewer than ``skip``."""
    emitted = 0
    for sample in range(total):
        if shuffle.push(sample) is None:
            continue
        draw()
        emitted += 1
        if emitted == skip:
            return Jump(held=list(shuffle.buffer), head=sample + 1, tail=None)
    tail = shuffle.drain()
    for pos in range(len(tail)):
        draw()
        emitted += 1
        if emitted == skip:
            return Jump(held=tail[pos + 1 :], head=total, tail=tail[pos + 1 :])
    return None


def locate(counts: list[int], samples: Iterable[int]) -> list[tuple[int, int]]:
    """``(shard position, member)`` of each sample id in ``samples``, in an epoch whose shards hold
    ``counts`` (``(len(counts), 0)`` past the end)."""
    starts = [0, *accumulate(counts)]
    out = []
    for sample in samples:
        k = bisect_right(starts, sample) - 1 if sample < starts[-1] else len(counts)
        out.append((k, sample - starts[k]) if k < len(counts) else (k, 0))
    return out
