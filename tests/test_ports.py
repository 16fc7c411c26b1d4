"""Ports for Ray heads: picked where no outgoing connection can take them, and a local start that
loses a port race retries on another port (or says so in one line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from rsdiff import ports


@pytest.mark.unit
def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_and_worker_ranges():
    first, last = ports.ephemeral_range()
    picked = ports.free_ports(8) + ports.free_ports(8)
    assert len(set(picked)) == 16  # never the same port twice in one process
    for port in picked:
        assert not first <= port <= last  # no outgoing connection can be handed it
        assert not ports.RAY_WORKER_PORTS[0] <= port <= ports.RAY_WORKER_PORTS[1]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.unit
def test_a_taken_port_is_recognised_in_rays_messages():
    # Ray's check before it starts the dashboard, and the dashboard's own bind failing after it
    assert ports.is_port_race("ValueError: Failed to bind to 127.0.0.1:23456 because it's already occupied")
    assert ports.is_port_race("OSError: [Errno 98] error while attempting to bind on address: address in use")
    assert not ports.is_port_race("ModuleNotFoundError: No module named 'aiohttp'")


_START_LOCAL = textwrap.dedent(
    """
    import json, socket, sys
    from rsdiff import raytools
    from rsdiff.errors import ClusterError

    taken = []
    for _ in range(int(sys.argv[1])):  # ports another process holds before Ray can bind them
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); taken.append(s)
    queue = [s.getsockname()[1] for s in taken]
    fresh = raytools.free_port
    raytools.free_port = lambda: queue.pop(0) if queue else fresh()
    try:
        raytools.connect(num_cpus=1)
    except ClusterError as exc:
        print("ERROR", exc); sys.exit(2)
    import ray
    print("DASHBOARD", ray.worker.get_dashboard_url())
    print("TAKEN", json.dumps([s.getsockname()[1] for s in taken]))
    """
)


def _start_local(taken: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _START_LOCAL, str(taken)], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip


@pytest.mark.e2e
def test_a_local_start_whose_dashboard_port_was_taken_tries_another_port():
    proc = _start_local(taken=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("DASH", "TAKEN")))
    taken = json.loads(out["TAKEN"])
    assert int(out["DASHBOARD"].rsplit(":", 1)[1]) not in taken
    assert "was taken before Ray bound it; trying another" in proc.stderr


@pytest.mark.e2e
def test_a_local_start_that_loses_every_port_race_says_so_in_one_line():
    proc = _start_local(taken=3)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ERROR"))
    assert "could not start a local Ray" in line and "ray start --head" in line
