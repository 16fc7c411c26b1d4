"""Ray plumbing shared by the jobs: joining or starting a cluster, and driver-side progress."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from rsdiff.console import no_token_auth_notice
from rsdiff.ports import free_port, is_port_race

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``), else start one.

    ``address="auto"`` joins a cluster started on this machine with ``ray start``.

    A no-op when Ray is already initialised in this process (tests share one session cluster).
    """
    if ray.is_initialized():
        return
    with _keeping_sigterm_handler():
        _init(address, num_cpus)
    log.info("ray: %s", ray.cluster_resources())


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """``ray.init`` installs its own SIGTERM handler (it logs and exits 1); keep the job's, which
    stops the job like Ctrl-C does and says what was kept."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(address: str | None, num_cpus: int | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        _start_local(num_cpus)


LOCAL_START_ATTEMPTS = 3


def _start_local(num_cpus: int | None, attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """Start a local Ray with its dashboard on a fresh port, again on another port when the port
    was taken between picking and binding it (see :mod:`rsdiff.ports`).

    With its dashboard, the local Ray serves the State API that Ray Train's placement-group cleaner
    polls; its workers are told where (without the dashboard the cleaner warns every second, and
    can stall for its full timeout on a stale `ray start` address).

    Raises:
        ClusterError: the dashboard's port was taken on every attempt.
    """
    from rsdiff.errors import ClusterError

    tried: list[int] = []
    for _ in range(attempts):
        port = free_port()
        tried.append(port)
        try:
            with no_token_auth_notice():
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=True,
                    dashboard_port=port,
                    runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
                    log_to_driver=True,
                )
            return
        except Exception as exc:
            if not is_port_race(str(exc)):
                raise
            ray.shutdown()  # what did start (GCS, raylet) goes before the next try
            log.warning("ray: the dashboard port %d was taken before Ray bound it; trying another", port)
    raise ClusterError(
        f"could not start a local Ray: the dashboard ports {tried} were each taken by another process "
        "before Ray bound them; start Ray once with `ray start --head` and pass ray.address=auto"
    )


def largest_node_cpus() -> int:
    """CPUs of the biggest live node of the connected cluster (at least 1).

    What one actor can ask for and still be placed without a new node.
    """
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def stop_tasks(refs: list[Any], grace_s: float = 5.0, wait_s: float = 10.0, settle_s: float = 3.0) -> None:
    """Stop the tasks of ``refs`` and tidy what they leave behind on this node.

    Each running task is first interrupted (``ray.cancel``: a ``KeyboardInterrupt`` in the task),
    so its ``finally`` blocks and context managers run: a shard writer deletes the shards it
    published and its temporary folder. A task still running ``grace_s`` seconds later is killed
    (``force=True``, waiting up to ``wait_s`` seconds for it to end), and the temporary folders
    killed tasks left on this node are removed once their processes are gone, which can take a
    moment longer (:func:`rsdiff.tempfiles.remove_orphans`, watching for up to ``settle_s``
    seconds; other nodes are tidied by the next task there).
    """
    from rsdiff.tempfiles import remove_orphans

    refs = list(refs)
    _cancel(refs, force=False)
    running = _still_running(refs, grace_s)
    if running:
        log.warning("%d task(s) still ran %.0f s after the interrupt; killing them", len(running), grace_s)
        _cancel(running, force=True)
        _still_running(running, wait_s)
    remove_orphans(settle_s=settle_s if running else 0.0)


def _cancel(refs: list[Any], force: bool) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # finished already, or Ray is going down
            ray.cancel(ref, force=force)


def _still_running(refs: list[Any], timeout_s: float) -> list[Any]:
    """The refs of ``refs`` not yet finished after waiting up to ``timeout_s`` seconds."""
    try:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    except Exception:  # Ray is going down: nothing left to wait for
        return []
    return list(running)


def user_error(exc: BaseException) -> BaseException | None:
    """The rsdiff error (bad input a user can fix) a Ray task or Ray Data failure ``exc`` carries,
    re-made on the driver without Ray's remote traceback (the job prints one line); None when it
    carries none, and the caller re-raises ``exc`` as it is."""
    from rsdiff.errors import RsdiffError

    # A task's RsdiffError comes back as Ray's RayTaskError(<that class>): an instance of both, whose
    # message is the remote traceback. The original is its ``cause``.
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, RsdiffError) and not isinstance(exc, ray.exceptions.RayError):
        cause = exc
    if isinstance(cause, RsdiffError):
        return type(cause)(str(cause))
    return None


def rank_error(exc: BaseException) -> BaseException | None:
    """The rsdiff error (bad input a user can fix) a training rank failed with, from Ray Train's
    ``WorkerGroupError``, re-made without the remote traceback; None when no rank failed with one.
    An error raised in a DataLoader worker arrives re-wrapped with that worker's traceback as its
    message: the original message (its last line) is kept."""
    from rsdiff.errors import RsdiffError

    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, RsdiffError):
            text = str(cause)
            prefix = f"{type(cause).__module__}.{type(cause).__name__}: "
            if text.startswith("Caught ") and prefix in text:
                text = text.rsplit(prefix, 1)[1].strip()
            return type(cause)(text)
    return None


def storage_for_ray(uri: str) -> tuple[str, Any]:
    """``RunConfig(storage_path, storage_filesystem)`` for a local path or s3:// URI.

    For S3 the pyarrow filesystem is built from the same AWS environment boto3 uses
    (``AWS_ENDPOINT_URL`` for S3-compatible stores; the default credential chain).
    """
    from rsdiff import storage

    if not storage.is_s3(uri):
        path = Path(uri).absolute()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return uri[len("s3://") :].rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)
