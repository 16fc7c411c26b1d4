"""Driver-side progress of a stage's Ray tasks: counters the tasks bump and a bar that reads them.

Every counter of a driver process lives on one small actor, the driver's :class:`_ProgressBoard`,
under an id of its own. An actor is a fresh process (about 1.5 CPU-seconds and a second or two
before its first answer), so a job that predicts sixteen heads starts one, not sixteen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from tqdm.auto import tqdm


@ray.remote(num_cpus=0)
class _ProgressBoard:
    """Named counters and example notes, kept per tally id; counts sent to a closed tally are
    dropped (a task's last ``add`` may arrive after its driver has moved on)."""

    def __init__(self) -> None:
        self._counts: dict[int, dict[str, int]] = {}
        self._notes: dict[int, dict[str, list[str]]] = {}
        self._next = 0

    def open(self) -> int:
        self._next += 1
        self._counts[self._next], self._notes[self._next] = {}, {}
        return self._next

    def add(self, tally: int, **counts: int) -> None:
        kept = self._counts.get(tally)
        if kept is not None:
            for key, value in counts.items():
                kept[key] = kept.get(key, 0) + value

    def get(self, tally: int) -> dict[str, int]:
        return dict(self._counts.get(tally, {}))

    def note(self, tally: int, key: str, text: str, keep: int) -> None:
        notes = self._notes.get(tally)
        if notes is not None and len(examples := notes.setdefault(key, [])) < keep:
            examples.append(text)

    def notes(self, tally: int) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._notes.get(tally, {}).items()}

    def close(self, tally: int) -> None:
        self._counts.pop(tally, None)
        self._notes.pop(tally, None)


_board_lock = threading.Lock()
_board: tuple[str, Any] | None = None  # (the cluster and job it belongs to, its handle)


def _board_handle(fresh: bool = False) -> Any:
    """This driver's board on the cluster it is connected to, started on first use (or anew when
    ``fresh``: the old one died with its node, or Ray was restarted)."""
    global _board
    context = ray.get_runtime_context()
    owner = f"{context.gcs_address}/{context.get_job_id()}"
    with _board_lock:
        if fresh or _board is None or _board[0] != owner:
            _board = (owner, _ProgressBoard.remote())
        return _board[1]


@dataclass(frozen=True)
class ProgressCounter:
    """One call's counters on its driver's board. Tasks bump them without waiting
    (``counter.add(scenes=1, tiles=12)``); the driver reads them (``counter.get()``). Pickles into
    Ray tasks and Ray Data functions. :meth:`close` when the call is done."""

    board: Any
    tally: int

    @classmethod
    def open(cls) -> ProgressCounter:
        """A new, empty set of counters (Ray must be connected)."""
        board = _board_handle()
        try:
            return cls(board, ray.get(board.open.remote()))
        except ray.exceptions.RayActorError:  # its node died: one board anew
            board = _board_handle(fresh=True)
            return cls(board, ray.get(board.open.remote()))

    def add(self, **counts: int) -> None:
        self.board.add.remote(self.tally, **counts)

    def note(self, key: str, text: str, keep: int = 20) -> None:
        """Keep up to ``keep`` example texts under ``key`` (e.g. which shard was damaged)."""
        self.board.note.remote(self.tally, key, text, keep)

    def get(self) -> dict[str, int]:
        return ray.get(self.board.get.remote(self.tally))

    def notes(self) -> dict[str, list[str]]:
        return ray.get(self.board.notes.remote(self.tally))

    def close(self) -> None:
        self.board.close.remote(self.tally)


def wait_with_progress(
    refs: Sequence[ray.ObjectRef], counter: ProgressCounter, total: int, unit: str, desc: str, extra: str = ""
) -> list[Any]:
    """``ray.get(refs)`` while a tqdm bar shows ``counter[unit]`` of ``total`` (plus ``counter[extra]``).

    Task errors propagate as soon as the first failing task finishes.
    """
    pending = list(refs)
    with tqdm(total=total, desc=desc, unit=unit, mininterval=1.0) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in done:
                ray.get(ref)  # raise early on failure
            counts = counter.get()
            bar.n = counts.get(unit, 0)
            if extra:
                bar.set_postfix({extra: counts.get(extra, 0)}, refresh=False)
            bar.refresh()
            if pending and not done:
                time.sleep(0.1)
    return ray.get(list(refs))
