"""One rank's training batches: its shard stream, the loader over it, and where it stands.

The position (the stream's seed, the loader slot that serves the next batch, and each slot's
epoch, sample count and whether its epoch so far can be replayed from the shard counts) is what a
checkpoint saves per rank, so a resumed run with the same world size and loader workers continues
at the exact sample; otherwise it starts a new seeded order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rsdiff.train.config import TrainPlan
from rsdiff.train.stream import ShardStream, StreamPosition

log = logging.getLogger(__name__)


def stop_loader(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (idempotent; a no-op without workers).

    torch stops them when the iterator is freed. After a worker's error the iterator is held by a
    reference cycle (the re-raised exception's traceback holds its frames), so only the cyclic
    collector frees it, and that closes the iterator's queues before the iterator can send its
    workers the stop signal: each worker's join then waits out torch's 5 s timeout.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch has no public call for this
    if shutdown is not None:
        shutdown()


class RankData:
    """Batches of ``(B, C, S, S)`` images in [-1, 1] for rank ``rank`` of ``world``.

    ``saved`` is the per-rank ``"stream"`` list of the checkpoint resumed from (None when fresh);
    ``start`` the step resumed at; ``loader_seed`` seeds the loader's own generator (the default
    generator is left alone); ``pin`` pins host memory for a CUDA device.
    """

    def __init__(
        self, plan: TrainPlan, rank: int, world: int, saved: Any, start: int, loader_seed: int, pin: bool
    ) -> None:
        self.workers = max(1, plan.data.num_workers)
        mine = saved[rank] if isinstance(saved, list) and len(saved) == world else None
        if mine is not None and mine["workers"] == self.workers:  # continue at the exact sample
            self.seed, self.first_slot = int(mine["seed"]), int(mine["next_slot"])
            self.positions = {int(k): StreamPosition(*v) for k, v in mine["positions"].items()}
        else:  # fresh, or the world size / loader workers changed: a new seeded order
            if start > 0:
                log.warning("[rank %d] data stream restarts in a new order (no matching position)", rank)
            self.seed, self.first_slot, self.positions = plan.seed + 7919 * start, 0, {}
        self.stream = ShardStream(
            plan.shards, rank, world, plan.normalizer, plan.image_size,
            shuffle_buffer=plan.data.shuffle_buffer, augment=plan.data.augment,
            seed=self.seed, resume=self.positions, first_slot=self.first_slot,
            max_bad_fraction=plan.data.max_bad_shard_fraction, index=plan.shard_index,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=plan.data.batch_size,
            num_workers=plan.data.num_workers,
            pin_memory=pin,
            drop_last=True,  # the stream is endless, so every batch is full: one shape for compile
            persistent_workers=plan.data.num_workers > 0,
            generator=torch.Generator().manual_seed(loader_seed),
        )
        self._batches = iter(loader)
        self.consumed = 0  # batches taken from the loader (its workers take turns, in order)
        self.last_image: torch.Tensor | None = None  # ``(C, S, S)``: the first image of the last batch

    @property
    def errors(self) -> int:
        """Shard and sample errors skipped so far (see :class:`ShardStream`)."""
        return self.stream.errors

    def next_batch(self) -> torch.Tensor:
        """The next ``(B, C, S, S)`` batch; the position moves past it. If the loader raises (a
        stream error such as too many damaged shards), its worker processes are stopped first."""
        try:
            batch = next(self._batches)
        except BaseException:
            stop_loader(self._batches)
            raise
        self.positions = ShardStream.positions_after(self.positions, batch)
        self.consumed += 1
        self.last_image = batch["x"][0]
        return batch["x"]

    def position(self) -> dict[str, Any]:
        """Where this rank stands, as a checkpoint saves it (JSON-able)."""
        return {
            "seed": self.seed,
            "workers": self.workers,
            "next_slot": (self.first_slot + self.consumed) % self.workers,
            "positions": {k: [p.epoch, p.consumed, p.replayable] for k, p in self.positions.items()},
        }
