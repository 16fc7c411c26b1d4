"""Where the training ranks run: checks on the driver that a multi-node cluster can hold them and
that every node can reach the checkpoints, and a watch that ends a run whose ranks are never placed.

On an autoscaling cluster the ranks' placement group waits while the autoscaler launches nodes
(minutes for GPU instances), and Ray Train, left alone, waits forever for a resource no node type
offers. :class:`PlacementWatch` fails the run instead, with one message naming what was asked for:

- at once when the autoscaler reports that no node type can fulfil a rank's request (its cluster
  event "No available node types can fulfill resource request ...");
- after ``scaling.placement_timeout_s`` when rank 0 has still not started (the autoscaler may not
  launch more nodes: ``max_workers`` reached, no spot capacity, a launch failing).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from rsdiff import storage
from rsdiff.errors import ClusterError

log = logging.getLogger(__name__)

INFEASIBLE = "No available node types can fulfill resource request"


def check_storage_reach(run_storage: str, shared: bool, request: dict[str, float], num_workers: int) -> None:
    """Refuse a local ``run.storage`` when ranks may run on other nodes than this driver's.

    Ray Train writes each checkpoint on the node of rank 0 and the driver reads it back; a folder
    on one node's disk is invisible to the others. Local storage is fine when the cluster is this
    one node and it can hold every rank, or when ``run.shared_storage`` says the folder is a
    shared filesystem mounted at the same path on every node (NFS, EFS, Lustre).

    Raises:
        ClusterError: local storage on a cluster whose ranks would leave this node.
    """
    import ray

    if storage.is_s3(run_storage) or shared:
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = next((n["Resources"] for n in alive if n["NodeID"] == here), {})
    fits = all(mine.get(k, 0) >= v * num_workers for k, v in request.items())
    if len(alive) == 1 and fits:
        return
    why = (
        f"this cluster has {len(alive)} nodes"
        if len(alive) > 1
        else f"this node cannot hold {num_workers} x {_fmt(request)}, so the ranks will run on nodes "
        "the autoscaler adds"
    )
    raise ClusterError(
        f"run.storage={run_storage} is a folder on this node, but {why}: checkpoints written there are "
        "not visible from the other nodes (resuming and the final checkpoint would fail). Use an s3:// "
        "prefix (run.storage=s3://bucket/runs), or set run.shared_storage=true if run.storage is a "
        "shared filesystem mounted at the same path on every node"
    )


@contextlib.contextmanager
def keeping_sigint_handler() -> Iterator[None]:
    """Put the process's SIGINT handler back afterwards (Ray Train's ``fit()`` installs one that
    aborts its controller, and leaves it behind when the controller is gone)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def mute_worker_output() -> None:
    """Stop forwarding Ray workers' stdout/stderr to this driver (the ``log_to_driver`` stream),
    for the rest of the process. Ray has no public switch for this once connected; if its private
    dispatcher moves, output stays forwarded (noisier, never wrong)."""
    with contextlib.suppress(Exception):
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")


def kill_switch(trainer: Any) -> Callable[[], None]:
    """A function that ends ``trainer.fit()`` now, from any thread: it kills the run's Ray Train
    controller actor, removes the run's placement groups (Ray Train's own cleaner does so only
    while the State API answers), withdraws the run's autoscaling request, and ``fit()`` raises.

    Ray Train's own Ctrl-C path asks the controller to abort, which waits behind a placement group
    that never comes, lets the ranks go on training and checkpointing meanwhile, and then returns
    as if the run had failed. The controller's handle is caught where Ray Train passes it to its
    SIGINT setup (main thread only), and Ctrl-C there does what the switch does: the controller
    (and the ranks it owns) killed at once, so nothing is written after the signal, and ``fit()``
    raises ``KeyboardInterrupt`` like every other job. From Ctrl-C on, the ranks' dying words (a
    rank blocked in ``report`` when its controller goes prints a traceback) are no longer forwarded
    to this process, so the job's own line is the last thing the user reads. Off the main thread
    the switch interrupts the main thread instead.
    """
    import ray

    held: dict[str, Any] = {}
    # The trainer holds ``keep`` (below), which reaches ``end``: a strong reference back to the
    # trainer would make a cycle that only the cyclic collector frees, and the run's controller
    # actor (and the actors it owns) would live on after fit() until then, in a process that goes
    # on (a notebook, a service). The caller holds the trainer for as long as the run can be ended.
    trainer_ref = weakref.ref(trainer)

    def end() -> None:
        ray.kill(held["controller"], no_restart=True)
        if (run := trainer_ref()) is not None:
            withdraw_resource_request(run)
            remove_run_groups(run)

    def on_sigint(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is plain
        mute_worker_output()
        end()
        raise KeyboardInterrupt

    def keep(controller: Any) -> None:
        held["controller"] = controller
        signal.signal(signal.SIGINT, on_sigint)

    trainer._register_sigint_handler = keep

    def stop() -> None:
        if "controller" in held:
            end()
        else:
            _thread.interrupt_main()

    return stop


def withdraw_resource_request(trainer: Any) -> None:
    """Cancel the autoscaling request a Ray Train run registered when its controller started.

    The controller withdraws it when the run ends or aborts; a killed controller cannot, and its
    request would stand for Ray Train's expiry time (180 s), asking the autoscaler for nodes no job
    wants: the ranks of a refused run would launch nodes for the next job to pay for. The request
    lives on Ray's ``AutoscalingCoordinator`` actor under ``train-<run_id>``.
    """
    import ray

    run_id = getattr(getattr(trainer, "train_run_context", None), "run_id", None)
    if run_id is None:
        return
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.cancel_request.remote(requester_id=f"train-{run_id}"), timeout=10)
    except Exception as exc:  # no coordinator (nothing was requested), or it is gone
        log.debug("no autoscaling request withdrawn for run %s: %s", run_id, exc)


class PlacementWatch:
    """Watch a starting Ray Train run from the driver (a daemon thread polling every ``poll_s``).

    ``started()`` returns True once rank 0 runs. On an infeasible request or after ``timeout_s``
    without a start, or after a restart whose ranks stay unplaced as long (the watch stays armed
    for the whole run), the watch keeps the :class:`ClusterError` in :attr:`failure` and calls
    ``stop()`` (:func:`kill_switch`), which makes the blocked ``fit()`` raise; the caller raises
    :attr:`failure` in its place. Use as a context manager around ``trainer.fit()``.
    """

    def __init__(
        self,
        request: dict[str, float],
        num_workers: int,
        timeout_s: float,
        started: Callable[[], bool],
        stop: Callable[[], None],
        poll_s: float = 2.0,
    ) -> None:
        self.request = request
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.started = started
        self.stop = stop
        self.poll_s = poll_s
        self.failure: ClusterError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rsdiff-placement-watch", daemon=True)
        self._seen: set[str] = set()

    def __enter__(self) -> PlacementWatch:
        self._seen = {_event_key(e) for e in _infeasible_events()}  # older events are not ours
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                if self.started():
                    log.info("placement: rank 0 started %.0f s after the launch", time.monotonic() - t0)
                    self._watch_restarts()
                    return
            except Exception as exc:  # a flaky tracking read must not end the run
                log.debug("placement watch: %s", exc)
                continue
            failure = self._infeasible() or self._timed_out(time.monotonic() - t0)
            if failure is not None and not self._stop.is_set():
                self.failure = failure  # the caller raises it: not logged here as well
                log.info("placement: stopping the run %.0f s after the launch", time.monotonic() - t0)
                self.stop()
                return

    def _watch_restarts(self) -> None:
        """After the start: a restart (a preempted node, a failed rank) asks for the ranks again with
        a new placement group; one that stays pending for ``timeout_s``, or that no node type can
        hold, ends the run as at the first start instead of waiting forever."""
        pending_since: dict[str, float] = {}
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            try:
                pending = _pending_groups(self.request, self.num_workers)
            except Exception as exc:  # a flaky GCS read must not end the run
                log.debug("placement watch: %s", exc)
                continue
            pending_since = {pg: pending_since.get(pg, now) for pg in pending}
            waited = max((now - t for t in pending_since.values()), default=0.0)
            failure = (self._infeasible() if pending else None) or self._timed_out(waited, restart=True)
            if failure is not None and not self._stop.is_set():
                self.failure = failure
                log.info("placement: stopping the run: its ranks were not placed again after a restart")
                self.stop()
                return

    def _infeasible(self) -> ClusterError | None:
        for event in _infeasible_events():
            if _event_key(event) in self._seen:
                continue
            message = str(event.get("message", ""))
            if _request_in(message) == {k: float(v) for k, v in self.request.items()}:
                return ClusterError(
                    f"no node type of this cluster can hold one training rank, which asks for "
                    f"{_fmt(self.request)} (x {self.num_workers} ranks); the autoscaler says: "
                    f"{message.strip()} Change scaling.accelerator_type / scaling.cpus_per_worker / "
                    "scaling.use_gpu to what a node type offers, or add such a node type to the cluster"
                )
        return None

    def _timed_out(self, waited_s: float, restart: bool = False) -> ClusterError | None:
        if waited_s < self.timeout_s:
            return None
        what = (
            "after a restart of the training ranks (a preempted or failed node), the cluster did not "
            "place them again"
            if restart
            else "the cluster placed no training rank"
        )
        kept = (
            " Every complete checkpoint is kept: re-run the command once the cluster has room."
            if restart
            else ""
        )
        return ClusterError(
            f"{what} within scaling.placement_timeout_s={self.timeout_s:g} s: "
            f"{self.num_workers} rank(s) of {_fmt(self.request)} were asked for; {_cluster_summary()}. "
            "Check `ray status` (max_workers reached, no capacity for the instance type, failed "
            f"launches), lower scaling.num_workers, or raise scaling.placement_timeout_s.{kept}"
        )


def _pending_groups(request: dict[str, float], num_workers: int) -> list[str]:
    """Ids of this job's placement groups for ``num_workers`` bundles of ``request`` that wait for
    room (pending, or rescheduling after their node died)."""
    return _run_groups(request, num_workers, ("PENDING", "RESCHEDULING"))


def _run_groups(request: dict[str, float], num_workers: int, states: tuple[str, ...]) -> list[str]:
    """Ids of this job's placement groups in ``states`` for ``num_workers`` bundles of ``request``."""
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    want = [{k: float(v) for k, v in request.items()}] * num_workers
    return [
        pg_id for pg_id, pg in placement_group_table().items()
        if pg_id.endswith(job) and pg.get("state") in states
        and [{k: float(v) for k, v in b.items()} for _, b in sorted(pg.get("bundles", {}).items())] == want
    ]  # fmt: skip


def remove_run_groups(trainer: Any) -> None:
    """Remove the placement groups of ``trainer``'s ranks (this job's groups of its rank shape)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    scaling = getattr(trainer, "scaling_config", None)
    if scaling is None:
        return
    request = dict(scaling._resources_per_worker_not_none)
    try:
        for pg_id in _run_groups(request, int(scaling.num_workers), ("PENDING", "CREATED", "RESCHEDULING")):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    except Exception as exc:  # the run is ending anyway: Ray Train's cleaner may still do it
        log.debug("placement groups of the run not removed: %s", exc)


def _infeasible_events() -> list[dict[str, Any]]:
    """The autoscaler's "no node type can fulfil" events, from the connected cluster's dashboard
    (none where it has none, e.g. a local Ray started without it: the State API would otherwise
    search for another cluster's and wait 40 s)."""
    import ray._private.worker
    from ray.util.state import list_cluster_events

    node = getattr(ray._private.worker, "_global_node", None)
    dashboard = getattr(node, "webui_url", None) if node is not None else None
    if not dashboard:
        return []
    address = dashboard if "://" in dashboard else f"http://{dashboard}"
    try:
        events = list_cluster_events(address=address, limit=1000, timeout=10, raise_on_missing_output=False)
    except Exception as exc:
        log.debug("cluster events unavailable: %s", exc)
        return []
    return [e for e in events if INFEASIBLE in str(e.get("message", ""))]


def _event_key(event: dict[str, Any]) -> str:
    return str(event.get("event_id") or f"{event.get('time')}|{event.get('message')}")


def _request_in(message: str) -> dict[str, float] | None:
    """The resource dict an autoscaler event quotes (``... request {'CPU': 1.0, 'GPU': 1.0}. ...``)."""
    import ast

    start, end = message.find("{"), message.find("}")
    if start < 0 or end < start:
        return None
    try:
        quoted = ast.literal_eval(message[start : end + 1])
        return {str(k): float(v) for k, v in quoted.items()}
    except (ValueError, SyntaxError, AttributeError, TypeError):
        return None


def _cluster_summary() -> str:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    plain = ("node:", "memory", "object_store")
    offers = [{k: v for k, v in n["Resources"].items() if not k.startswith(plain)} for n in alive]
    nodes = "; ".join(_fmt(o) for o in offers)
    return f"the cluster has {len(alive)} live node(s): {nodes}"


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"
