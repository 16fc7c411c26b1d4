"""TCP ports for a Ray head that nothing else takes before Ray binds them.

A port found by binding to port 0 comes from the kernel's *ephemeral* range, the same range every
outgoing connection on the machine takes its local port from: between the moment the port is
picked and the moment Ray binds it, any ``connect()`` (a Ray worker talking to its raylet, an
MLflow client, a test's HTTP request) can be handed that port, and the head's dashboard or agent
then fails to bind. :func:`free_ports` picks instead from below the ephemeral range and above Ray's
default worker ports, where only an explicit ``bind`` can land, and never hands out one port twice
in a process. A start that still loses a race (another process bound the port first) is retried by
the caller on fresh ports; :func:`is_port_race` recognises such a failure.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's default range for worker processes' ports (``--min-worker-port`` .. ``--max-worker-port``).
RAY_WORKER_PORTS = (10002, 19999)
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """``(first, last)`` local port the kernel gives outgoing connections (Linux's default elsewhere)."""
    try:
        first, last = (int(v) for v in _EPHEMERAL_FILE.read_text().split())
        return first, last
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def quiet_range() -> tuple[int, int]:
    """``(first, last)`` ports neither the kernel (outgoing connections) nor Ray's workers use by
    default; empty (``first > last``) on a machine whose ephemeral range starts too low."""
    return RAY_WORKER_PORTS[1] + 1, ephemeral_range()[0] - 1


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free now on ``host``, outside the ephemeral range where it
    can (see the module docstring), none handed out before by this process.

    Raises:
        OSError: no free port was found (a machine with almost every port in use).
    """
    first, last = quiet_range()
    rng = random.SystemRandom()
    ports: list[int] = []
    tries = 0
    while len(ports) < count and first <= last and tries < 2000:
        tries += 1
        port = rng.randint(first, last)
        if port not in _handed_out and port not in ports and _bindable(port, host):
            ports.append(port)
    while len(ports) < count:  # no quiet range on this machine: the kernel's choice
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out and port not in ports:
            ports.append(port)
    _handed_out.update(ports)
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One port of :func:`free_ports`."""
    return free_ports(1, host)[0]


_RACE_SIGNS = ("address already in use", "errno 98", "failed to bind", "port is already in use")


def is_port_race(text: str) -> bool:
    """Whether an error text says a port was already taken (a lost race, worth a retry)."""
    low = text.lower()
    return any(sign in low for sign in _RACE_SIGNS)
