"""Names of a run's checkpoint folders: ``checkpoint_{step:08d}``, and a fresh name where Ray
Train's list of checkpoints already holds that one.

After a resume that skipped an unreadable newest checkpoint (see
:func:`~rsdiff.train.loop.resume_state`), the steps after the fallback point are trained again and
their checkpoints would reuse the broken one's folder name, which Ray Train's list (its snapshot
``checkpoint_manager_snapshot.json``) still holds: pruning that old entry (``checkpoint.keep``)
would delete the new checkpoint in its folder. Such a step's folder is ``checkpoint_{step:08d}-2``
(``-3``, ...) instead; names still sort in step order.
"""

from __future__ import annotations

import contextlib
import json

from rsdiff import storage

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def registered(run_dir: str) -> set[str]:
    """The checkpoint folder names Ray Train's list holds for the run in ``run_dir`` (empty when it
    has none yet, or writes a snapshot this reader does not know)."""
    with contextlib.suppress(Exception):
        snapshot = json.loads(storage.read_text(storage.join(run_dir, SNAPSHOT)))
        return {str(r["checkpoint_dir_name"]) for r in snapshot["checkpoint_results"]}
    return set()


def checkpoint_name(step: int, taken: set[str]) -> str:
    """``checkpoint_{step:08d}``, or with the first ``-{n}`` suffix (n >= 2) not in ``taken``."""
    name = f"checkpoint_{step:08d}"
    n = 2
    while name in taken:
        name, n = f"checkpoint_{step:08d}-{n}", n + 1
    return name
