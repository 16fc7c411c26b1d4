"""Rasters in S3 read by window, straight from the object store through GDAL.

rasterio opens ``s3://bucket/key`` as ``/vsis3/bucket/key`` inside an environment built from the
credential chain boto3 uses (env vars, profile, instance/IRSA role) and the same
``AWS_ENDPOINT_URL`` (path-style addressing, http or https as the URL says) for S3-compatible
stores. GDAL then fetches only the byte ranges it needs: the header (IFDs) when a scene is opened,
the tiles or strips under a window when it is read. A tiled GeoTIFF/COG costs about the window's
bytes; a striped GeoTIFF the strips crossing it; JPG/PNG are decoded whole by their drivers.

Failures: GDAL retries HTTP 429/5xx answers itself (``GDAL_HTTP_MAX_RETRY``). What still fails
(dropped connections, a retry budget spent) surfaces as ``RasterioIOError``; :func:`retrying_read`
retries those with the storage layer's backoff (``RSDIFF_S3_MAX_ATTEMPTS``) and then names the
object, the endpoint and GDAL's reason. Credentials reach GDAL only as in-process config options;
they are never logged or written.

Credentials that expire (IRSA/SSO/assumed-role tokens, about an hour): GDAL keeps the keys a
dataset was opened with, so a scene read for longer than a token lives starts failing mid-scene.
When a read fails, :func:`renew_credentials` asks boto3's credential chain again; if it now gives
other keys (a refreshed token), they become this environment's and the reader reopens its
datasets with them (:class:`~rsdiff.data.scenes.SceneReader`), and the read is tried again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

from rsdiff import storage
from rsdiff.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# GDAL's messages for a file that is there but is no raster it can decode: permanent. Any other
# I/O error on an object that exists (HEAD answered) is the network's or the store's: retried.
_NOT_A_RASTER = ("not recognized as", "supported file format", "not a TIFF", "bad magic")


def gdal_path(uri: str) -> str:
    """``s3://bucket/key`` -> ``/vsis3/bucket/key``; local paths unchanged."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return f"/vsis3/{bucket}/{key}"
    return str(uri)


def gdal_options() -> dict[str, str]:
    """GDAL config options for S3 (no credentials): the endpoint of ``AWS_ENDPOINT_URL[_S3]`` with
    path-style addressing, no directory listing on open, GDAL-level HTTP retries (2, the first after
    0.5 s; ``GDAL_HTTP_MAX_RETRY`` / ``GDAL_HTTP_RETRY_DELAY`` in the environment override them)."""
    opts = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no LIST per open; no .aux.xml/.ovr probing
        "GDAL_HTTP_MAX_RETRY": os.environ.get("GDAL_HTTP_MAX_RETRY", "2"),
        "GDAL_HTTP_RETRY_DELAY": os.environ.get("GDAL_HTTP_RETRY_DELAY", "0.5"),
        "VSI_CACHE": "TRUE",
        "RSDIFF_S3_ENV": "YES",  # marks rsdiff's environment (GDAL ignores unknown options)
    }
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        opts["AWS_S3_ENDPOINT"] = parsed.netloc
        opts["AWS_HTTPS"] = "YES" if parsed.scheme == "https" else "NO"
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"  # path-style: S3-compatible stores rarely do virtual hosts
    return opts


_CHAIN: dict[int, Any] = {}  # pid -> the boto3 session whose credential chain GDAL's keys come from


def _credential_options(session: Any) -> dict[str, str]:
    """The session's current keys as GDAL options (:func:`rsdiff.storage.session_keys`)."""
    keys = storage.session_keys(session) or ("", "", "")
    return dict(zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"), keys, strict=True))


@contextlib.contextmanager
def s3_env() -> Iterator[None]:
    """A rasterio environment in which ``/vsis3/`` paths reach S3 as boto3 would."""
    import boto3
    import rasterio

    session = _CHAIN.get(os.getpid()) or _CHAIN.setdefault(os.getpid(), boto3.Session())
    if session.get_credentials() is None:
        raise StorageError(
            f"cannot read rasters from S3 at {storage.endpoint()}: no AWS credentials found. Set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run on a node with an instance "
            "profile."
        )
    from rasterio.session import AWSSession

    with rasterio.Env(session=AWSSession(session), **gdal_options()):
        yield


def renew_credentials() -> bool:
    """Ask the credential chain for keys again (its refreshable credentials first, then a new
    chain that re-reads the environment, profile and token files); if they differ from the keys
    this thread's S3 environment holds, hand them to GDAL and return True (datasets opened before
    keep the old keys: reopen them). False when nothing changed or no S3 environment is active."""
    import boto3
    import rasterio

    if not _env_active():
        return False
    held = {k: rasterio.env.getenv().get(k) or "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                              "AWS_SESSION_TOKEN")}  # fmt: skip
    for session in (_CHAIN.get(os.getpid()), boto3.Session()):
        if session is None or session.get_credentials() is None:
            continue
        fresh = _credential_options(session)
        if fresh != held:
            _CHAIN[os.getpid()] = session
            rasterio.env.setenv(**fresh)
            log.info("S3 credentials renewed for raster reads (the keys in use were refused)")
            return True
    return False


def open_dataset(uri: str, stack: contextlib.ExitStack) -> Any:
    """A rasterio dataset of ``uri`` (a local file, or an S3 object read in place through GDAL),
    closed with ``stack``; opening reads the header only.

    Raises:
        storage.NotFoundError: no such file or object (checked first: GDAL's messages cannot tell).
        StorageError: S3 still failing after retries (or refusing access, a missing bucket, ...).
        RasterioIOError: the file is no raster GDAL decodes (the caller names it).
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    if storage.is_s3(uri):
        if not storage.exists(uri):  # boto3's HEAD: precise errors (bucket, access, endpoint)
            raise storage.NotFoundError(f"cannot read {storage.display(uri)}: no such object")
        if not _env_active():
            stack.enter_context(s3_env())
    elif not os.path.exists(uri):
        raise storage.NotFoundError(f"cannot read {storage.display(uri)}: no such file or directory")

    def attempt() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(gdal_path(uri))

    return stack.enter_context(retrying_read(attempt, uri, "the header"))


def _env_active() -> bool:
    """True inside an :func:`s3_env` (GDAL's S3 endpoint set for this thread)."""
    import rasterio

    return rasterio.env.hasenv() and rasterio.env.getenv().get("RSDIFF_S3_ENV") == "YES"


# What GDAL says when an HTTP request failed ("HTTP error code: 503 - url. Retrying again in 0.5
# secs", "HTTP response code on url: 503", curl's connection errors).
_HTTP_FAILURE = ("http error code", "http response code", "curl error")


@contextlib.contextmanager
def _gdal_http_errors() -> Iterator[list[str]]:
    """Collect the HTTP failures GDAL reports on this thread while the block runs (rasterio hands
    GDAL's messages to its ``rasterio.*`` loggers, at WARNING where they are retried)."""
    seen: list[str] = []
    thread = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.thread == thread and any(m in text.lower() for m in _HTTP_FAILURE):
                seen.append(text)

    handler = _Collect()
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def retrying_read(fn: Callable[[], T], uri: str, what: str, reopen: Callable[[], None] | None = None) -> T:
    """Run ``fn`` (a rasterio open or read of ``uri``), retrying transient GDAL I/O errors. After a
    failure, renewed credentials (:func:`renew_credentials`) are handed to ``reopen`` (which opens
    the caller's datasets again) before the next try.

    The caller has checked that the object exists (GDAL's messages cannot tell a missing object
    from a failing store), e.g. with :func:`rsdiff.storage.exists`.

    Raises:
        StorageError: still failing after ``RSDIFF_S3_MAX_ATTEMPTS`` tries (names ``what``).
        RasterioIOError: a local file's error, or an object that is no raster GDAL decodes: the
            caller names it.
    """
    from rasterio.errors import RasterioIOError

    attempts = storage.max_attempts() if storage.is_s3(uri) else 1
    for attempt in range(1, attempts + 1):
        try:
            with _gdal_http_errors() as http_errors:
                return fn()
        except RasterioIOError as exc:
            text = str(exc)
            # GDAL names a header it could not fetch "not recognized as a supported format" too:
            # only an answer it did get, with no HTTP failure on the way, says "no raster".
            if not storage.is_s3(uri) or (any(m in text for m in _NOT_A_RASTER) and not http_errors):
                raise
            if attempt == attempts:
                reason = str(exc.__cause__ or exc).strip().splitlines()
                raise StorageError(
                    f"cannot read {what} of {storage.display(uri)} from S3 at {storage.endpoint()} after "
                    f"{attempts} tries: {reason[0] if reason else type(exc).__name__}"
                ) from None
            if reopen is not None and renew_credentials():
                reopen()
                continue
            delay = storage.backoff(attempt)
            log.warning("transient error reading %s of %s (%s), retry %d/%d in %.1fs",
                        what, storage.display(uri), text[:120], attempt, attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")
