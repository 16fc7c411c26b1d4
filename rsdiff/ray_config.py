"""Which Ray cluster a job runs on, as config (without importing Ray; see :mod:`rsdiff.raytools`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RayConfig:
    """Which Ray cluster to use: ``address`` null = ``RAY_ADDRESS`` if set, else a local one."""

    address: str | None = None
    num_cpus: int | None = None
