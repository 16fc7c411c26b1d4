"""One live writer per run folder: a lease object with its owner and a heartbeat, local or S3.

A job that writes a named run (pretraining's ``{run.storage}/{run.name}``, a sweep's experiment)
first takes the lease ``{folder}/rsdiff-lease.json``: ``{"owner", "host", "pid", "started",
"heartbeat"}`` (seconds since the epoch). While the job runs a thread renews the heartbeat every
``ttl_s / 4``. A second job that finds a live lease refuses with one line naming its holder. A
lease is stale, and taken over with a warning, when its heartbeat is older than ``ttl_s`` or its
holder was a process on this host that no longer exists (a killed driver resubmitted at once).

Taking and renewing are compare-and-swap, so two jobs starting together cannot both win: on S3
conditional PUTs (``If-None-Match: *`` to create, ``If-Match: <etag>`` to renew or take over);
on a local or shared filesystem an exclusive create, and an atomic rename to claim a stale lease.
Some S3-compatible stores accept those headers and ignore them; the first lease on each bucket
probes that the store refuses a conditional write that must fail, and refuses leases (one line,
:class:`~rsdiff.errors.ConfigError`) on a store that does not.

A holder that loses its lease stops writing: when a heartbeat finds another owner, or no heartbeat
has reached the store for ``ttl_s`` (after which another job may take it over), :attr:`Lease.lost`
is set and :attr:`Lease.on_lost` is called (the job's stop switch; by default the main thread is
interrupted). Writers on other processes (pretraining's rank 0, before each checkpoint) check
:func:`holder` against the owner id they were given and raise :class:`LeaseLost` instead of writing.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.errors import ConfigError, RsdiffError

log = logging.getLogger(__name__)

LEASE = "rsdiff-lease.json"
TTL_S = float(os.environ.get("RSDIFF_LEASE_TTL_S", "60"))


class LeaseHeld(ConfigError):
    """Another live job holds the lease."""


class LeaseLost(RsdiffError):
    """This job's lease was taken over (or could not be renewed in time): it stopped writing."""


_PROBED: dict[str, bool] = {}  # bucket (with endpoint) -> conditional writes honoured


def holder(uri: str) -> str | None:
    """The owner id recorded in the lease ``uri`` (None when there is none or it is unreadable)."""
    try:
        record = json.loads(storage.read_bytes(uri))
    except (storage.NotFoundError, ValueError):
        return None
    return record.get("owner") if isinstance(record, dict) else None


def check_conditional_writes(folder: str) -> None:
    """Refuse an S3 store that ignores ``If-None-Match`` / ``If-Match`` (checked once per bucket).

    Writes a probe object under ``folder``, then writes it again under conditions that must fail;
    a store that accepts either cannot keep two jobs from both taking a lease.

    Raises:
        ConfigError: the store accepted a write that a condition should have refused.
    """
    bucket, prefix = storage.split_s3(folder)
    client = storage.s3_client()
    where = f"{client.meta.endpoint_url}/{bucket}"
    if where in _PROBED:
        return
    key = f"{prefix.rstrip('/')}/rsdiff-lease-probe-{uuid.uuid4().hex}".lstrip("/")
    probe = f"s3://{bucket}/{key}"
    storage.write_bytes(probe, b"probe")
    ignored = []
    try:
        for name, cond in (("If-None-Match", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": '"0"'})):

            def put(c: dict[str, str] = cond) -> Any:
                return storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"2", **c)

            try:
                storage.retrying(put, probe, "write")
                ignored.append(name)
            except storage.StorageError as exc:
                if not _precondition_failed(exc):
                    raise
    finally:
        with contextlib.suppress(Exception):
            storage.delete(probe)
    if ignored:
        raise ConfigError(
            f"the S3 store holding {storage.display(folder)} ignores conditional writes "
            f"({', '.join(ignored)} was accepted where it must be refused), so two jobs could both hold "
            "the same run and mix their checkpoints; put run.storage / storage on a store that "
            "honours them (AWS S3, MinIO, Ceph RGW and GCS do) or on a shared filesystem"
        )
    _PROBED[where] = True


@contextlib.contextmanager
def record_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``{uri}.lock`` (local and shared filesystems; a no-op on S3,
    whose conditional writes are atomic): a renewal's read-compare-write and a takeover's
    rename-create cannot interleave with another process's."""
    if storage.is_s3(uri):
        yield
        return
    import fcntl

    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{uri}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _precondition_failed(exc: storage.StorageError) -> bool:
    """Whether a failed S3 write was a condition refusing it (412, or 409 for a concurrent one)."""
    from botocore.exceptions import ClientError

    cause = exc.__cause__
    if not isinstance(cause, ClientError):
        return False
    code = cause.response.get("Error", {}).get("Code")
    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in (409, 412)


class Lease:
    """The lease on ``folder`` (a local path or S3 prefix) for ``what`` (e.g. ``run.name=x``).

    Use as a context manager: entering takes it (or raises :class:`LeaseHeld`), leaving releases it.
    ``ttl_s`` defaults to :data:`TTL_S` (``RSDIFF_LEASE_TTL_S``, 60 s).
    """

    def __init__(self, folder: str, what: str, ttl_s: float | None = None) -> None:
        self.uri = storage.join(storage.absolute(folder), LEASE)
        self.what = what
        self.ttl_s = float(TTL_S if ttl_s is None else ttl_s)
        self.owner = uuid.uuid4().hex
        self.lost = False
        self.lost_reason = ""
        self.on_lost: Callable[[], None] = _thread.interrupt_main
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- record -------------------------------------------------------------------------------

    def _record(self, started: float) -> bytes:
        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "started": started, "heartbeat": time.time()}  # fmt: skip
        return json.dumps(body).encode()

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current lease and its version (S3 ETag / local mtime), or ``(None, None)``."""
        try:
            if storage.is_s3(self.uri):
                bucket, key = storage.split_s3(self.uri)
                got = storage.retrying(
                    lambda: storage.s3_client().get_object(Bucket=bucket, Key=key), self.uri, "read"
                )
                return json.loads(got["Body"].read()), got["ETag"]
            raw = Path(self.uri).read_bytes()
            return json.loads(raw), None
        except (storage.NotFoundError, FileNotFoundError):
            return None, None
        except ValueError:  # unreadable: treat as stale (it holds no heartbeat)
            return {"owner": "?", "host": "?", "pid": -1, "heartbeat": 0.0}, None

    def _stale(self, lease: dict[str, Any]) -> bool:
        age = time.time() - float(lease.get("heartbeat", 0.0))
        if age > self.ttl_s:
            return True
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return True  # its process on this host is gone
            except PermissionError:
                return False
        return False

    # -- compare-and-swap writes --------------------------------------------------------------

    def _put(self, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> bool:
        """Conditional write; False when the condition failed (someone else wrote in between)."""
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            extra: dict[str, str] = {}
            if if_none_match:
                extra["IfNoneMatch"] = "*"
            if if_match:
                extra["IfMatch"] = if_match
            try:
                got = storage.retrying(
                    lambda: storage.s3_client().put_object(Bucket=bucket, Key=key, Body=body, **extra),
                    self.uri,
                    "write",
                )
            except storage.StorageError as exc:
                if _precondition_failed(exc):
                    return False
                raise
            self._etag = got["ETag"]
            return True
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        if if_none_match:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        with record_lock(self.uri):  # read, compare and write as one step against other writers
            current, _ = self._read()
            if current is None or current.get("owner") != self.owner:
                return False
            storage.write_bytes(self.uri, body)
        return True

    def _claim_stale(self, etag: str | None, started: float) -> bool:
        if storage.is_s3(self.uri):
            return self._put(self._record(started), if_match=etag)
        claimed = Path(f"{self.uri}.stale-{self.owner}")
        with record_lock(self.uri):
            try:
                os.rename(self.uri, claimed)  # atomic: one claimant wins
            except FileNotFoundError:
                return False
            claimed.unlink(missing_ok=True)
            return self._put(self._record(started), if_none_match=True)

    # -- public -------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming the live holder."""
        started = time.time()
        if storage.is_s3(self.uri):
            check_conditional_writes(storage.parent(self.uri))
        for _ in range(3):
            current, etag = self._read()
            if current is None:
                if self._put(self._record(started), if_none_match=True):
                    break
                continue
            if not self._stale(current):
                age = time.time() - float(current.get("heartbeat", 0.0))
                raise LeaseHeld(
                    f"{self.what} is in use by another live job (host {current.get('host')}, pid "
                    f"{current.get('pid')}, heartbeat {age:.0f} s ago); wait for it to end or use another "
                    f"name. If that job is gone, its lease {storage.display(self.uri)} is taken over "
                    f"{self.ttl_s:.0f} s after its last heartbeat"
                )
            if self._claim_stale(etag, started):
                log.warning(
                    "took over the stale lease of %s (host %s, pid %s)",
                    self.what, current.get("host"), current.get("pid"),
                )  # fmt: skip
                break
        else:
            raise LeaseHeld(
                f"{self.what}: another job took the lease {storage.display(self.uri)} at the same time"
            )
        self._thread = threading.Thread(target=self._beat, args=(started,), name="rsdiff-lease", daemon=True)
        self._thread.start()

    def _beat(self, started: float) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                ok = self._put(self._record(started), if_match=self._etag)
            except Exception as exc:  # a flaky store: try again at the next beat, within the TTL
                log.warning("lease heartbeat for %s failed: %s", self.what, exc)
                silent = time.monotonic() - last_ok
                if silent > self.ttl_s:
                    self._lose(f"no heartbeat reached the store for {silent:.0f} s (the lease's TTL is "
                               f"{self.ttl_s:.0f} s), so another job may have taken it over")  # fmt: skip
                    return
                continue
            if not ok:
                self._lose(f"another job took it over (now held by {self._holder_text()})")
                return
            last_ok = time.monotonic()

    def _holder_text(self) -> str:
        current, _ = self._read()
        current = current or {}
        return f"host {current.get('host', '?')}, pid {current.get('pid', '?')}"

    def _lose(self, reason: str) -> None:
        self.lost, self.lost_reason = True, reason
        log.error("lost the lease of %s: %s; stopping this job", self.what, reason)
        self.on_lost()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is no longer this job's (before writing results)."""
        if not self.lost and holder(self.uri) != self.owner:
            self.lost, self.lost_reason = True, f"another job holds it now ({self._holder_text()})"
        if self.lost:
            raise LeaseLost(self.lost_message())

    def lost_message(self) -> str:
        """One line: which lease was lost, why, and that this job stopped writing."""
        return (
            f"{self.what}: this job lost its lease {storage.display(self.uri)}: {self.lost_reason}; it "
            "stopped without writing more (the job holding the lease now owns the folder)"
        )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with record_lock(self.uri):
            current, _ = self._read()
            if current is not None and current.get("owner") == self.owner:
                storage.delete(self.uri)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
