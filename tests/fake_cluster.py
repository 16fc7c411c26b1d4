"""An autoscaling Ray cluster on one machine, made from ``cluster/aws.yaml``'s own node types.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``) launches each "node" the autoscaler asks
for as a local raylet with the node type's declared resources; the head runs the real autoscaler
(monitor), GCS, dashboard and job server. The launcher YAML is read and changed only where one
machine forces it: worker CPUs divided by 8 (a g5.2xlarge's 8 become 1, a p4de's 96 become 12, so
the autoscaler still prefers the node type it would on AWS), at most a few workers, a short idle
timeout. GPUs stay declared resources (no process uses CUDA; training runs on the CPU). The head
type is renamed ``ray.head.default``, the name the fake provider gives its head.

Unlike ``ray.cluster_utils.AutoscalingCluster`` it never runs ``ray stop`` (which would kill the
test session's own Ray as well): the head is a ``ray start --block`` process of its own, on its own
ports, and teardown kills exactly the processes that talk to this cluster's GCS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import agent_port_args

CPU_SCALE = 8  # a fake worker node declares 1 CPU per 8 of its instance type (at least 1)
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for its head node
OBJECT_STORE = 150 * 1024**2  # bytes per node: a dozen raylets share 24 GiB with the training


def fake_provider_config(
    launcher_yaml: Path, *, gcs_port: int, idle_timeout_minutes: float, max_workers: int
) -> dict[str, Any]:
    """The fake provider's cluster config for the node types of ``launcher_yaml``.

    Head: its declared resources (``CPU: 0`` in rsdiff's YAML: it schedules no work). Workers: each
    type keeps its GPU count and custom resources (``accelerator_type:...``) and ``min_workers``;
    its CPUs are divided by :data:`CPU_SCALE`, ``max_workers`` capped at ``max_workers``.
    """
    launcher = yaml.safe_load(launcher_yaml.read_text())
    head_type = launcher["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in launcher["available_node_types"].items():
        resources = dict(spec.get("resources", {}))
        if name == head_type:
            types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        resources["CPU"] = max(1, int(resources.get("CPU", 1)) // CPU_SCALE)
        resources["object_store_memory"] = OBJECT_STORE
        types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": min(int(spec.get("max_workers", 1)), max_workers),
        }
    return {
        "cluster_name": f"fake-{launcher['cluster_name']}",
        "max_workers": max_workers,
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start_env(launcher_yaml: Path) -> dict[str, str]:
    """The environment ``launcher_yaml``'s head start command sets for ``ray start`` (its leading
    ``NAME=value`` words, e.g. ``RAY_AUTH_MODE=token``), which the fake head is started with too."""
    launcher = yaml.safe_load(launcher_yaml.read_text())
    start = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    env = {}
    for word in shlex.split(start.split("ray start")[0]):
        name, sep, value = word.partition("=")
        if sep:
            env[name] = value
    return env


@dataclass
class FakeCluster:
    """A running fake autoscaling cluster: ``address`` (GCS) and ``dashboard`` (job API URL)."""

    config: dict[str, Any]
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    log: Path
    head: subprocess.Popen | None = None
    _ray: str = field(default_factory=lambda: str(Path(sys.executable).parent / "ray"))
    _jobs: Any = None  # the job API client, made at the first poll

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, workdir: Path) -> None:
        """``ray start --head --block`` with the autoscaling config; returns once the job API answers."""
        cfg = workdir / "fake-cluster.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        head = self.config["available_node_types"][self.config["head_node_type"]]["resources"]
        args = [
            self._ray, "start", "--head", f"--port={self.gcs_port}", f"--autoscaling-config={cfg}",
            f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
            f"--object-store-memory={OBJECT_STORE}", f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true", "--disable-usage-stats", "--block",
            # Own ports: the session's test cluster already holds Ray's default agent ports.
            *agent_port_args(),
        ]  # fmt: skip
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        if custom:
            args.append(f"--resources={json.dumps(custom)}")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.head = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the fake cluster's head exited: {self.log.read_text()[-3000:]}")
            if self._job_api_answers():
                return
            time.sleep(1)
        raise TimeoutError(f"the fake cluster's job API did not answer: {self.log.read_text()[-3000:]}")

    def ray(self, *args: str, timeout: float = 600, env: dict[str, str | None] | None = None):
        """Run the ``ray`` CLI against this cluster (its token in the environment); ``env`` adds
        variables, or removes those it maps to None."""
        merged = {**self.env, **(env or {})}
        return subprocess.run(
            [self._ray, *args], env={k: v for k, v in merged.items() if v is not None},
            capture_output=True, text=True, timeout=timeout, cwd=self.env.get("RSDIFF_REPO"),
        )  # fmt: skip

    # The tests poll the job and the nodes every few seconds. They ask the head's HTTP APIs from this
    # process: a `ray job status` or `ray list nodes` process per poll is a Python start with Ray's
    # imports, about 2 CPU-seconds, so polling alone kept one of CI's two cores busy.

    def _auth(self) -> dict[str, str]:
        """The head's token (what ``ray`` CLI calls read from ``RAY_AUTH_TOKEN_PATH``) as a header."""
        return {"Authorization": f"Bearer {Path(self.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"}

    def _job_api_answers(self) -> bool:
        """Whether the head's job API lists jobs for this cluster's token (what a ``ray job list``
        that exits 0 shows, without a Python start per poll)."""
        from ray.job_submission import JobSubmissionClient

        try:
            jobs = JobSubmissionClient(self.dashboard, headers=self._auth())
            jobs.list_jobs()
        except Exception:  # not up yet: the connection is refused, or the API answers an error
            return False
        self._jobs = jobs
        return True

    def job_status(self, job: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the head's job API."""
        from ray.job_submission import JobSubmissionClient

        if self._jobs is None:
            self._jobs = JobSubmissionClient(self.dashboard, headers=self._auth())
        return str(self._jobs.get_job_status(job).value)

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes: ``{node_id, is_head, resources}`` from the head's State API."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard, headers=self._auth())
        options = ListApiOptions(filters=[("state", "=", "ALIVE")], detail=True, timeout=60)
        out = []
        for node in client.list(StateResource.NODES, options=options, raise_on_missing_output=False):
            node = node if isinstance(node, dict) else dataclasses.asdict(node)
            out.append(
                {
                    "node_id": node["node_id"],
                    "is_head": bool(node.get("is_head_node")),
                    "resources": node.get("resources_total", {}),
                }
            )
        return out

    def workers(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if not n["is_head"]]

    def preempt(self, node_id: str) -> int:
        """Take node ``node_id`` away as a spot reclaim would: SIGKILL its raylet and everything it
        started (its workers, its agents). Returns how many processes were killed."""
        import psutil

        raylets = [p for p in _cluster_processes(self.gcs_port) if _is_raylet_of(p, node_id)]
        if not raylets:
            raise LookupError(f"no raylet of node {node_id} on this machine")
        victims: list[Any] = []
        for raylet in raylets:
            victims += [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        return len(victims)

    def stop(self) -> None:
        """Stop the head (``--block`` takes its own processes down) and kill every process left
        that talks to this cluster's GCS (the worker nodes the monitor launched)."""
        import psutil

        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)
            try:
                self.head.wait(timeout=10)  # then killed, with whatever it left (below)
            except subprocess.TimeoutExpired:
                self.head.kill()
        for proc in _cluster_processes(self.gcs_port):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        # `ray start` recorded this cluster as the machine's current one; it is gone now.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()


def _cluster_processes(gcs_port: int) -> list[Any]:
    import psutil

    needle = f"127.0.0.1:{gcs_port}"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(needle in part for part in proc.info["cmdline"] or []) and proc.pid != os.getpid():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _is_raylet_of(proc: Any, node_id: str) -> bool:
    import psutil

    try:
        cmd = proc.info["cmdline"] or []
        if not cmd or not cmd[0].endswith("raylet"):
            return False
        return proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id or any(
            node_id in part for part in cmd
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
