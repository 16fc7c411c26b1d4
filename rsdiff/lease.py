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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rsdiff import storage
from rsdiff.errors import ConfigError

log = logging.getLogger(__name__)

LEASE = "rsdiff-lease.json"
TTL_S = float(os.environ.get("RSDIFF_LEASE_TTL_S", "60"))


class LeaseHeld(ConfigError):
    """Another live job holds the lease."""


class Lease:
    """The lease on ``folder`` (a local path or S3 prefix) for ``what`` (e.g. ``run.name=x``).

    Use as a context manager: entering takes it (or raises :class:`LeaseHeld`), leaving releases it.
    """

    def __init__(self, folder: str, what: str, ttl_s: float = TTL_S) -> None:
        self.uri = storage.join(storage.absolute(folder), LEASE)
        self.what = what
        self.ttl_s = float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.lost = False
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
            from botocore.exceptions import ClientError

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
                if isinstance(exc.__cause__, ClientError) and exc.__cause__.response.get("Error", {}).get(
                    "Code"
                ) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
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
        current, _ = self._read()
        if current is None or current.get("owner") != self.owner:
            return False
        storage.write_bytes(self.uri, body)
        return True

    def _claim_stale(self, etag: str | None, started: float) -> bool:
        if storage.is_s3(self.uri):
            return self._put(self._record(started), if_match=etag)
        claimed = Path(f"{self.uri}.stale-{self.owner}")
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
        while not self._stop.wait(self.ttl_s / 4):
            try:
                ok = self._put(self._record(started), if_match=self._etag)
            except Exception as exc:  # a flaky store: try again at the next beat
                log.warning("lease heartbeat for %s failed: %s", self.what, exc)
                continue
            if not ok:
                self.lost = True
                log.error(
                    "the lease of %s was taken over by another job; this job's writes may mix", self.what
                )
                return

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, _ = self._read()
        if current is not None and current.get("owner") == self.owner:
            storage.delete(self.uri)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
