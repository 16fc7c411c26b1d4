"""``run_pretrain(after_step=...)`` hooks for the pretraining tests: fault injection that fails one
rank once, by exception or by SIGKILL of its worker process, and a census of the run's processes.

The hook is pickled by value (Ray workers do not have ``tests/`` on their path).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle


@dataclass
class FailOnce:
    """Fail once at ``step`` on ``rank``: ``kind="raise"`` raises, ``kind="kill"`` SIGKILLs the
    worker after Ray Train has registered the checkpoint before ``step`` (so the restart point is
    deterministic). ``marker`` (a file) records that it fired, across restarts."""

    step: int
    rank: int
    marker: Path
    kind: str = "raise"

    def __call__(self, step: int, rank: int, plan) -> None:
        if step != self.step or rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"fault at step {step}")
        if self.kind == "kill":
            _wait_until_registered(plan.run_dir, step - step % plan.checkpoint.every_steps)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


@dataclass
class RecordRayProcesses:
    """At ``step`` on rank 0, write the names of this machine's Ray actor and task processes
    (``ray::TrainController``, ...; without the method one runs) to ``path``, one per line."""

    step: int
    path: Path

    def __call__(self, step: int, rank: int, plan) -> None:
        import psutil

        if step != self.step or rank != 0:
            return
        names = {
            (p.info["cmdline"] or [""])[0].split(" ")[0].split(".")[0]
            for p in psutil.process_iter(["cmdline"])
        }
        self.path.write_text("\n".join(sorted(n for n in names if n.startswith("ray::"))))


def _wait_until_registered(run_dir: str, step: int, timeout_s: float = 60.0) -> None:
    """Wait until Ray Train's controller has registered checkpoint ``step``: it collects reports
    every couple of seconds, and a worker killed before that loses the queued report (the restart
    would come from the checkpoint before). Registration shows in the run's
    ``checkpoint_manager_snapshot.json``."""
    from rsdiff import storage

    if step <= 0:
        return
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if f"checkpoint_{step:08d}" in storage.read_text(snapshot):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"checkpoint {step} was not registered in {snapshot} within {timeout_s:.0f} s")


@dataclass
class TakeLease:
    """At ``step`` on rank 0, play another job taking over the run folder's lease (the way a
    second job takes a stale one): the lease now names ``owner`` on another host. Records the
    time in ``marker``."""

    step: int
    marker: Path
    owner: str = "the-other-job"

    def __call__(self, step: int, rank: int, plan) -> None:
        import json

        if step != self.step or rank != 0 or self.marker.exists():
            return
        from rsdiff.lease import record_lock

        record = {"owner": self.owner, "host": "other-host", "pid": 4242, "started": time.time(),
                  "heartbeat": time.time()}  # fmt: skip
        with record_lock(plan.lease_uri):  # as a claimant writes it: never inside a renewal
            Path(plan.lease_uri).write_text(json.dumps(record))
        self.marker.write_text(str(time.time()))


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
