"""A Ctrl-C or SIGTERM that Python drops is raised again in the main thread's own code.

Python reports an exception raised where it cannot propagate (an at-fork hook, a finalizer) as
"Exception ignored in ..." and drops it. A Ctrl-C that lands while Ray forks its daemons is raised
in logging's at-fork hook, so without this a job would run on as if the key was never pressed.

:func:`install` puts a ``sys.unraisablehook`` in place that, for a dropped ``KeyboardInterrupt``
(``Terminated`` included), only queues its signal number and returns. One helper thread per
process takes it from the queue, waits until no hook call is in progress, and raises the signal in
the main thread (``_thread.interrupt_main``), which meets it back in its own code. Anything else
goes to the hook that was there before.
"""

from __future__ import annotations

import _thread
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rsdiff.errors import Terminated

SETTLE_S = 0.05  # lets the main thread leave the code that dropped the signal before it comes again


class _Redeliverer:
    """The helper thread and the flag it waits on (one per process)."""

    def __init__(self) -> None:
        self.pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.in_hook = 0  # hook calls in progress (main thread only; read by the helper)
        threading.Thread(target=self._run, name="rsdiff-redeliver-signal", daemon=True).start()

    def dropped(self, signum: int) -> None:
        self.pending.put(signum)

    def _run(self) -> None:
        while True:
            signum = self.pending.get()
            time.sleep(SETTLE_S)
            while self.in_hook:  # raised inside the hook, it would be dropped for good
                time.sleep(0.005)
            _thread.interrupt_main(signum)


_redeliverer: _Redeliverer | None = None


def install() -> Callable[[], None]:
    """Hand dropped interrupts back to the main thread from now on; returns what undoes it."""
    global _redeliverer
    if _redeliverer is None:
        _redeliverer = _Redeliverer()
    helper, previous = _redeliverer, sys.unraisablehook

    def hook(unraisable: Any) -> None:
        helper.in_hook += 1
        try:
            exc = unraisable.exc_value
            if isinstance(exc, KeyboardInterrupt):
                helper.dropped(exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
            else:
                previous(unraisable)
        finally:
            helper.in_hook -= 1

    sys.unraisablehook = hook

    def uninstall() -> None:
        sys.unraisablehook = previous

    return uninstall
