"""One storage layer for every location rsdiff reads or writes: local paths and ``s3://`` URIs.

S3 goes through boto3 with the standard AWS environment: the credential chain (env vars,
profile, instance/IRSA role) and ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, Ceph,
moto). Transient failures (5xx, throttling, dropped connections) are retried with exponential
backoff; permanent ones become :class:`~rsdiff.errors.StorageError` with a message that names the
URI and the fix. Writes are atomic: a reader never sees a half-written object (local files are
written to a temporary name and renamed; S3 objects appear only when their PUT/multipart upload
completes). Credentials never appear in messages or logs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from rsdiff.errors import StorageError
from rsdiff.redaction import redact_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
}


class NotFoundError(StorageError):
    """The URI names an object or file that does not exist."""


class AccessError(StorageError):
    """The store cannot be used at all by this process: no or rejected credentials, access
    denied, no such bucket, endpoint unreachable. Not a fault of one object: skipping it and
    reading on would skip everything."""


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith("s3://")


def _local(uri: str) -> Path:
    uri = str(uri)
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"malformed S3 URI {uri!r}: expected s3://bucket/prefix")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with ``/``."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def absolute(uri: str) -> str:
    """S3 URIs as they are; local paths made absolute (Ray workers run in other directories)."""
    return str(uri).rstrip("/") if is_s3(uri) else str(_local(uri).absolute())


def name(uri: str) -> str:
    """The last path component of a URI."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    """The URI one level up."""
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def display(uri: str) -> str:
    """A URI as it is safe to print: any userinfo masked (:func:`rsdiff.redaction.redact_uri`)."""
    return str(redact_uri(str(uri)))


# --------------------------------------------------------------------------------------------
# S3 client, retries, error mapping


@functools.cache
def _client_for_pid(pid: int) -> Any:
    import boto3
    from botocore.config import Config

    # Tries per request: AWS's own AWS_MAX_ATTEMPTS where set, else 4 (botocore's standard retry
    # mode: exponential backoff with jitter on throttling, 5xx and connection errors).
    tries = os.environ.get("AWS_MAX_ATTEMPTS", "")
    cfg = Config(
        retries={"total_max_attempts": max(1, int(tries)) if tries.isdigit() else 4, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    session = boto3.session.Session()
    _SIGNED_WITH[pid] = session_keys(session)
    return session.client("s3", config=cfg)


_SIGNED_WITH: dict[int, tuple[str, str, str] | None] = {}  # pid -> the keys its client was made with


def session_keys(session: Any) -> tuple[str, str, str] | None:
    """A boto3 session's current ``(access key, secret, token)`` (refreshable credentials refresh
    here); None without credentials."""
    credentials = session.get_credentials()
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token or ""


def s3_client() -> Any:
    """A boto3 S3 client for this process (clients are not shared across forks)."""
    return _client_for_pid(os.getpid())


def renew_client() -> bool:
    """After the store refused this process's keys: if the credential chain now gives other keys
    (a refreshed token, a rotated profile or environment), the next :func:`s3_client` signs with
    them and this returns True; False when the chain gives the same keys (or none)."""
    import boto3

    s3_client()  # the keys in use are recorded when the client is made
    fresh = session_keys(boto3.session.Session())
    if fresh is None or fresh == _SIGNED_WITH.get(os.getpid()):
        return False
    _client_for_pid.cache_clear()
    log.info("S3 credentials renewed (the store refused the keys in use)")
    return True


def endpoint() -> str:
    """The S3 endpoint in use (``AWS_ENDPOINT_URL`` or AWS's default)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def max_attempts() -> int:
    """How many times a transient S3 failure is tried (``RSDIFF_S3_MAX_ATTEMPTS``, default 6)."""
    return max(1, int(os.environ.get("RSDIFF_S3_MAX_ATTEMPTS", "6")))


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return code in _TRANSIENT_CODES or status >= 500
    return isinstance(
        exc,
        EndpointConnectionError
        | ConnectionClosedError
        | ReadTimeoutError
        | ResponseStreamingError
        | IncompleteReadError
        | ProtocolError
        | ConnectionError,
    )


def _translate(exc: BaseException, uri: str, action: str) -> StorageError:
    """Map a boto/OS exception to a StorageError that names the URI and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = display(uri)
    if isinstance(exc, NoCredentialsError):
        return AccessError(
            f"cannot {action} {where}: no AWS credentials found. Set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run on a node with an instance profile."
        )
    if isinstance(exc, EndpointConnectionError):
        return AccessError(
            f"cannot {action} {where}: S3 endpoint {endpoint()} is unreachable. "
            "Check AWS_ENDPOINT_URL and the network."
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else "?"
        if code == "NoSuchBucket":
            return AccessError(
                f"cannot {action} {where}: bucket {bucket!r} does not exist at {endpoint()}. "
                "Create it or fix the URI."
            )
        if code in {"PreconditionFailed", "412"}:
            return StorageError(f"cannot {action} {where}: the object was replaced while it was being read")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return NotFoundError(f"cannot {action} {where}: no such object")
        if code in {"AccessDenied", "403", "AllAccessDisabled"}:
            return AccessError(
                f"cannot {action} {where}: access denied. Check that the credentials/IAM role "
                f"in use allow s3:{'PutObject' if action == 'write' else 'GetObject'} on bucket {bucket!r}."
            )
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}:
            return AccessError(
                f"cannot {action} {where}: the AWS credentials were rejected ({code}). "
                "Refresh or fix them (the key itself is not shown)."
            )
        return StorageError(f"cannot {action} {where}: S3 error {code or 'unknown'}")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"cannot {action} {where}: no such file or directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"cannot {action} {where}: permission denied")
    return StorageError(f"cannot {action} {where}: {type(exc).__name__}: {exc}")


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with jitter, at most 8 s."""
    return min(8.0, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random())


def _keys_refused(exc: BaseException) -> bool:
    """True for the answers S3 gives to keys it no longer takes (HEAD answers carry no code)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in _REFUSED_KEYS


_REFUSED_KEYS = {"ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AccessDenied", "400", "403"}  # fmt: skip


def retrying(fn: Callable[[], T], uri: str, action: str) -> T:
    """Run ``fn`` with exponential backoff on transient S3 errors; when the store refuses the keys
    in use, once with renewed ones (:func:`renew_client`); translate the rest."""
    attempts, attempt, renewed = max_attempts(), 1, False
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            if not renewed and _keys_refused(exc) and renew_client():
                renewed = True
                continue
            if attempt < attempts and _is_transient(exc):
                delay = backoff(attempt)
                log.warning(
                    "transient error on %s %s (%s), retry %d/%d in %.1fs",
                    action,
                    display(uri),
                    type(exc).__name__,
                    attempt,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
                attempt += 1
                continue
            raise _translate(exc, uri, action) from exc


# --------------------------------------------------------------------------------------------
# Reading


def read_bytes(uri: str) -> bytes:
    """The whole object/file as bytes."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return retrying(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(), uri, "read")
    try:
        return _local(uri).read_bytes()
    except OSError as exc:
        raise _translate(exc, uri, "read") from exc


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object/file: one ranged GET on S3, retried like any read.

    Raises:
        StorageError: fewer bytes than asked for (the object is shorter, e.g. replaced since).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        span = f"bytes={start}-{end - 1}"
        data = retrying(
            lambda: s3_client().get_object(Bucket=bucket, Key=key, Range=span)["Body"].read(), uri, "read"
        )
    else:
        try:
            with open(_local(uri), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except OSError as exc:
            raise _translate(exc, uri, "read") from exc
    if len(data) != end - start:
        raise StorageError(
            f"{display(uri)} gave {len(data)} of bytes {start}-{end - 1}: it changed since it was indexed"
        )
    return data


def read_text(uri: str) -> str:
    """The whole object/file decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


class S3ObjectStream(io.RawIOBase):
    """A read-only stream over one S3 object that survives connections cut mid-body.

    A transient error (or an early end) while reading the body re-opens the object with a ranged
    GET from the byte reached, pinned to the first response's ETag (``If-Match``), so a replaced
    object fails instead of mixing two versions. Up to ``RSDIFF_S3_MAX_ATTEMPTS`` tries per
    position, each logged as a warning.
    """

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.etag: str | None = None
        self.size = 0
        self._body = self._open()

    def _open(self) -> Any:
        extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.etag else {}
        resp = retrying(
            lambda: s3_client().get_object(Bucket=self.bucket, Key=self.key, **extra), self.uri, "read"
        )
        if self.etag is None:
            self.etag, self.size = resp.get("ETag"), int(resp["ContentLength"])
        return resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        attempts = max_attempts()
        for attempt in range(1, attempts + 1):
            try:
                chunk = self._body.read(want)
                if not chunk:
                    raise ConnectionError(f"body ended at byte {self.pos} of {self.size}")
                buffer[: len(chunk)] = chunk
                self.pos += len(chunk)
                return len(chunk)
            except Exception as exc:
                if attempt == attempts or not _is_transient(exc):
                    raise _translate(exc, self.uri, "read") from exc
                log.warning(
                    "read of %s cut at byte %d (%s): resuming with a ranged GET, retry %d/%d",
                    display(self.uri), self.pos, type(exc).__name__, attempt, attempts - 1,
                )  # fmt: skip
                with contextlib.suppress(Exception):
                    self._body.close()
                time.sleep(backoff(attempt))
                self._body = self._open()
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def open_stream(uri: str) -> IO[bytes]:
    """A buffered binary stream over the object. S3 objects are streamed, not downloaded first, and
    a connection cut mid-body resumes where it stopped (:class:`S3ObjectStream`)."""
    if is_s3(uri):
        return io.BufferedReader(S3ObjectStream(uri), buffer_size=1 << 20)
    try:
        return open(_local(uri), "rb")
    except OSError as exc:
        raise _translate(exc, uri, "read") from exc


def exists(uri: str) -> bool:
    """True if the object/file exists (False for a missing key; errors for a missing bucket)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            retrying(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, "read")
            return True
        except NotFoundError:
            return False
    return _local(uri).exists()


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """All objects/files under ``prefix`` (recursively) whose names end in ``suffix``, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def _list() -> list[str]:
            out = []
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
            return out

        return sorted(u for u in retrying(_list, prefix, "list") if u.endswith(suffix))
    root = _local(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file())


def sizes(prefix: str) -> dict[str, int]:
    """``{path relative to prefix: size in bytes}`` of every object/file under ``prefix``, the way
    the store reports it (S3's listing; folder markers ending in ``/`` left out)."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def _list() -> dict[str, int]:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return {o["Key"][len(key) :]: int(o["Size"]) for p in pages for o in p.get("Contents", [])}

        return {k: n for k, n in retrying(_list, prefix, "list").items() if k and not k.endswith("/")}
    root = _local(prefix)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in files}


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex with the semantics of Python's ``glob(recursive=True)`` for an S3 key pattern: ``*``,
    ``?`` and ``[..]`` stay within one path segment and do not match a leading ``.``; ``**`` as a
    whole segment matches zero or more segments."""
    out, i, n = [], 0, len(pattern)
    start = True  # at the start of a path segment
    while i < n:
        if pattern.startswith("**/", i) and start:
            out.append(r"(?:(?!\.)[^/]+/)*")
            i += 3
            continue
        if pattern.startswith("**", i) and start and i + 2 == n:
            out.append(r"(?:(?!\.)[^/]+(?:/(?!\.)[^/]+)*)?")
            i += 2
            continue
        ch = pattern[i]
        if ch == "*":
            out.append(r"(?!\.)[^/]*" if start else r"[^/]*")
        elif ch == "?":
            out.append(r"(?!\.)[^/]" if start else r"[^/]")
        elif ch == "[":
            first = i + 2 if pattern[i + 1 : i + 2] == "!" else i + 1
            j = pattern.find("]", first + 1)  # a "]" first in the set is a member, as in fnmatch
            if j < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                out.append(f"(?!/)[{'^' + body[1:] if body.startswith('!') else body}]")
                i, start = j + 1, False
                continue
        else:
            out.append(re.escape(ch))
        start = ch == "/"
        i += 1
    return re.compile("".join(out))


def glob(pattern: str) -> list[str]:
    """Expand a glob (``*``, ``?``, ``[..]``; ``**`` for any depth) on local disk or S3, sorted."""
    if not any(ch in pattern for ch in "*?["):
        if is_s3(pattern):
            return [pattern] if exists(pattern) else list_uris(pattern)
        path = _local(pattern)
        if path.is_dir():
            return list_uris(str(path))
        return [str(path)] if path.exists() else []
    if is_s3(pattern):
        literal = pattern[: min(pattern.index(ch) for ch in "*?[" if ch in pattern)]
        root = literal.rsplit("/", 1)[0]
        regex = glob_regex(pattern)
        return [u for u in list_uris(root) if regex.fullmatch(u)]
    import glob as _glob

    return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))


def download(uri: str, dest: str | Path) -> Path:
    """Copy an object/file to a local path (atomically) and return the path."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            retrying(lambda: s3_client().download_file(bucket, key, str(tmp)), uri, "read")
        else:
            try:
                shutil.copyfile(_local(uri), tmp)
            except OSError as exc:
                raise _translate(exc, uri, "read") from exc
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the object: the file itself when local, a temporary download for S3."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise NotFoundError(f"cannot read {display(uri)}: no such file or directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="rsdiff-") as tmp:
        yield download(uri, Path(tmp) / name(uri))


# --------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def atomic_local_path(uri: str) -> Iterator[Path]:
    """Yield a local temporary path to write; on success it becomes ``uri`` in one step.

    On an exception nothing appears at ``uri`` and the temporary file is removed.
    """
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="rsdiff-") as tmp:
            path = Path(tmp) / name(uri)
            yield path
            upload(path, uri)
        return
    dest = _local(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _translate(exc, uri, "write") from exc
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def upload(path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` atomically."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(lambda: s3_client().upload_file(str(path), bucket, key), uri, "write")
        return
    with atomic_local_path(uri) as tmp:
        shutil.copyfile(path, tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), uri, "write")
        return
    with atomic_local_path(uri) as tmp:
        tmp.write_bytes(data)


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text to ``uri`` atomically."""
    write_bytes(uri, text.encode("utf-8"))


def delete_tree(prefix: str) -> None:
    """Delete everything under a folder/prefix (nothing happens when it is absent)."""
    if is_s3(prefix):
        for uri in list_uris(prefix):  # list_uris treats the prefix as a folder
            delete(uri)
    else:
        shutil.rmtree(_local(prefix), ignore_errors=True)


def delete(uri: str) -> None:
    """Remove an object/file (no error if it is already gone)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(lambda: s3_client().delete_object(Bucket=bucket, Key=key), uri, "delete")
        return
    _local(uri).unlink(missing_ok=True)


def check_writable(uri: str) -> None:
    """Fail early, before any work, if ``uri`` cannot be written (missing bucket, denied, read-only dir)."""
    probe = join(uri, f".rsdiff-write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    delete(probe)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: str, key: str) -> str:
    """``value`` if it is a safe single folder name (letters, digits, ``._-``, no ``..``), else
    :class:`~rsdiff.errors.ConfigError` naming ``key``. Names become paths under a storage root; a
    name with ``/``, ``..`` or a leading ``/`` would put the run outside that root."""
    from rsdiff.errors import ConfigError

    text = str(value)
    if not _SAFE_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(
            f"{key}={text!r} is not a plain name: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (no '/', no '..'); it becomes a folder under the storage root"
        )
    return text
