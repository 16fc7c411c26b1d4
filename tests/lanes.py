"""Two lanes for ``pytest -n 2``, as a pytest plugin (``tests/conftest.py`` loads it).

The session's chain fixtures (a demo run of every stage, and a briefly pretrained tiny DDPM with its
feature table: about 100 CPU-seconds to build) are session-scoped, so each pytest-xdist worker that
asks for one builds its own. Under ``-n 2`` every test that asks for one (directly or through
another fixture) therefore goes to one worker, in the tier order, and every other test to whichever
worker is free: the chain is built once, and the unit tests, pretraining and the fake autoscaling
cluster run beside it.

pytest-xdist's schedulers see test ids only, not fixtures: each worker writes, once it has
collected, which of its tests ask for the chain to a file the controller named
(``workerinput["rsdiff_lanes"]``), and the scheduler reads it when it splits the run. A run without
``-n`` is unaffected (one process, tier order). Under ``-n`` the run ends with one line per worker:
its tests, its clock from first start to last end, and whether it ran the chain, so an unbalanced
run shows which lane held it up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiers import clock

# Session fixtures that build or read the chain (a test's closure names them however it asks).
CHAIN_FIXTURES = frozenset({"sample_demo", "labeled_ckpt", "labeled_table"})

CHAIN_LANE = "chain"  # the scope name of the chain's tests in pytest-xdist's scheduler
WORKER_KEY = "rsdiff_lanes"  # workerinput key: the folder where workers write their test lanes


def wants_chain(item: pytest.Item) -> bool:
    """Whether ``item`` asks for a chain fixture (directly or through another fixture)."""
    return bool(CHAIN_FIXTURES.intersection(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker: write the ids of its tests that ask for the chain, for the
    controller's scheduler (atomically: a reader sees all of it or nothing)."""
    folder = getattr(config, "workerinput", {}).get(WORKER_KEY)
    if folder is None:
        return
    path = Path(folder) / f"{config.workerinput['workerid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(it.nodeid for it in items if wants_chain(it))))
    os.replace(tmp, path)


def chain_ids(folder: Path) -> set[str]:
    """The chain's test ids as the workers wrote them (any worker's list: they collect the same
    tests); empty when none could be read, and then every test is balanced alone."""
    for path in sorted(folder.glob("*.json")):
        return set(json.loads(path.read_text()))
    return set()


@dataclass
class WorkerSpan:
    """One pytest-xdist worker's share of the run, from its test reports (epoch seconds)."""

    tests: int = 0
    first: float = float("inf")
    last: float = 0.0
    chain: bool = False

    def add(self, report: pytest.TestReport, chain: bool) -> None:
        self.tests += report.when == "call" or (report.when == "setup" and not report.passed)
        self.first, self.last = min(self.first, report.start), max(self.last, report.stop)
        self.chain |= chain


def _lane_scheduling(config: pytest.Config, log, in_chain: Callable[[str], bool]):
    """pytest-xdist's scope scheduler with the lanes as scopes. It hands out the largest scope first
    (the chain, to one worker), then the tests of one, in tier order, to whichever worker has fewer
    than three left; a worker done with the chain takes its share of the rest."""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CHAIN_LANE if in_chain(nodeid) else nodeid

    return LaneScheduling(config, log)


class Lanes:
    """The controller's side: a folder for the workers' lists, the scheduler, the worker lines."""

    def __init__(self) -> None:
        self.folder: Path | None = None  # made when the first worker is configured (``-n`` only)
        self.workers: dict[str, WorkerSpan] = {}
        self.chain: set[str] | None = None

    def in_chain(self, nodeid: str) -> bool:
        """Whether the test ``nodeid`` asks for the chain: the workers' lists, read once, when the
        scheduler first asks (every worker has collected by then)."""
        if self.chain is None:
            self.chain = chain_ids(self.folder) if self.folder else set()
        return nodeid in self.chain

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="rsdiff-lanes-"))
        node.workerinput[WORKER_KEY] = str(self.folder)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        """Under ``-n N`` with pytest-xdist's default distribution, the lanes; another ``--dist`` is
        left to pytest-xdist."""
        if config.getvalue("dist") == "load":
            return _lane_scheduling(config, log, self.in_chain)
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        node = getattr(report, "node", None)  # pytest-xdist sets it on a worker's reports
        if node is not None:
            span = self.workers.setdefault(node.gateway.id, WorkerSpan())
            span.add(report, self.in_chain(report.nodeid))

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.workers:
            return
        start = min(w.first for w in self.workers.values())
        terminalreporter.write_sep("=", "pytest-xdist workers (tests/lanes.py)")
        for name, w in sorted(self.workers.items()):
            terminalreporter.write_line(
                f"{name:5} {w.tests:4d} tests   {clock(w.first - start)} to {clock(w.last - start)}"
                + ("   the chain's lane" if w.chain else "")
            )

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller: it schedules, its workers report to it
        config.pluginmanager.register(Lanes(), "rsdiff-lanes")
