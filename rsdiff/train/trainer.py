"""The Ray Train trainer the pretraining ranks run under.

Ray Train 2.60 starts a ``DatasetManager`` actor for every attempt, Ray Data datasets or not: a
process of its own (about 2 CPU-seconds to start, and a second of the attempt's start-up on a small
node) that holds nothing when, as in rsdiff, each rank streams its own WebDataset shards.
:func:`stream_trainer` leaves it out; every other part of Ray Train (placement, checkpoints to S3,
restarts, the placement-group cleaner, the preemption watch) is Ray's own.
"""

from __future__ import annotations

from typing import Any


def stream_trainer(**kwargs: Any) -> Any:
    """A ``TorchTrainer(**kwargs)`` without Ray Data's per-attempt dataset actor; refuses
    ``datasets=`` (ranks read shards themselves, :mod:`rsdiff.train.stream`)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    if kwargs.get("datasets"):
        raise ValueError("stream_trainer runs ranks that stream their own shards; pass no datasets")

    class StreamTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return StreamTrainer(**kwargs)
