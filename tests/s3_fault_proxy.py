"""A loopback HTTP proxy in front of the S3 server that fails requests in bursts.

After every ``every`` forwarded requests the next ``burst`` fail, cycling through ``kinds``: an
S3 ``503 SlowDown`` answer, a dropped connection (no response at all), or a body cut mid-way
(``cut``: the real status and headers, then half of the body, then the connection closes; only
GETs with a body are cut, other requests in a ``cut`` slot pass untouched), until ``max_faults``
faults have been injected. Clients point ``AWS_ENDPOINT_URL`` at :attr:`url`. :attr:`faults_by_client`
counts the faults by the client that met them, told apart by User-Agent: ``boto3`` (rsdiff's own
reads and writes), ``arrow`` (pyarrow's S3 filesystem, which Ray Train uses for checkpoints) and
``gdal`` (rasterio's windowed reads). With ``max_faults=0`` it only counts: :attr:`requests` and
:attr:`body_bytes` per ``(method, path)`` of every answer it forwarded.

Three switches play other unlucky stores: :attr:`down` (every request answered ``503`` while set: a
store out of reach), ``strip_conditions`` (``If-None-Match`` / ``If-Match`` dropped before
forwarding: an S3-compatible store that ignores conditional writes) and :attr:`expired_keys`
(requests signed with one of these access key ids are answered ``403 ExpiredToken``, as S3 answers
a temporary credential past its lifetime; :attr:`refused_by_client` counts them).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message></Error>"
)
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyS3Proxy:
    def __init__(
        self,
        upstream: str,
        every: int = 3,
        burst: int = 2,
        max_faults: int = 40,
        kinds: tuple[str, ...] = ("503", "reset"),
        strip_conditions: bool = False,
    ) -> None:
        self.upstream = urlparse(upstream)
        self.every, self.burst, self.max_faults, self.kinds = every, burst, max_faults, kinds
        self.strip_conditions = strip_conditions
        self.down = False
        self.expired_keys: set[str] = set()
        self.refused_by_client: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.seen = 0
        self.faults = {"503": 0, "reset": 0, "cut": 0}
        self.faults_by_client: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.body_bytes: Counter[tuple[str, str]] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                if proxy._expired(self.headers):
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(EXPIRED)))
                    self.end_headers()
                    self.wfile.write(EXPIRED if self.command != "HEAD" else b"")
                    return
                fault = "503" if proxy.down else proxy._next_fault(self.headers.get("User-Agent", ""))
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                dropped = HOP_HEADERS | ({"if-none-match", "if-match"} if proxy.strip_conditions else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy.lock:
                    where = (self.command, urlparse(self.path).path)
                    proxy.requests[where] += 1
                    proxy.body_bytes[where] += len(data) if self.command != "HEAD" else 0
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                conn.close()
                if fault == "cut" and self.command == "GET" and len(data) >= 2:
                    proxy._record("cut", self.headers.get("User-Agent", ""))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # Polled every 50 ms for shutdown, not socketserver's 500 ms: each test that stops a proxy
        # otherwise waited about half a second for it.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def _expired(self, headers: Any) -> bool:
        auth = headers.get("Authorization", "")
        if not any(f"Credential={key}/" in auth for key in self.expired_keys):
            return False
        with self.lock:
            self.refused_by_client[_client(headers.get("User-Agent", ""))] += 1
        return True

    def _next_fault(self, user_agent: str) -> str | None:
        with self.lock:
            self.seen += 1
            injected = sum(self.faults.values())
            phase = (self.seen - 1) % (self.every + self.burst)
            if injected >= self.max_faults or phase < self.every:
                return None
            kind = self.kinds[injected % len(self.kinds)]
            if kind != "cut":  # a cut is counted when a body is really cut
                self._record(kind, user_agent, locked=True)
            return kind

    def _record(self, kind: str, user_agent: str, locked: bool = False) -> None:
        with contextlib.nullcontext() if locked else self.lock:
            self.faults[kind] += 1
            self.faults_by_client[_client(user_agent)] += 1

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """Clients that drop their side of a connection after a fault are expected, not errors."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _client(user_agent: str) -> str:
    agent = user_agent.lower()
    if "aws-sdk-cpp" in agent or "arrow" in agent:
        return "arrow"
    if "boto" in agent:
        return "boto3"
    if "gdal" in agent:
        return "gdal"
    return "other"
