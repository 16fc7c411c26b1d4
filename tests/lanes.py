"""Two lanes for ``pytest -n 2``, as a pytest plugin (``tests/conftest.py`` loads it).

The session's chain fixtures (a demo run of every stage, and a briefly pretrained tiny DDPM with its
feature table: about 100 CPU-seconds to build) are session-scoped, so each pytest-xdist worker that
asks for one builds its own. Under ``-n 2`` every test of a module in :data:`CHAIN_MODULES` therefore
goes to one worker, in the tier order, and every other test to whichever worker is free: the chain
is built once, and the unit tests, pretraining and the fake autoscaling cluster run beside it.

pytest-xdist's schedulers see test ids only, not fixtures, so the lane is chosen by module; a test
that asks for a chain fixture from a module not in the list is refused at collection, by name, so the
list cannot drift. A run without ``-n`` is unaffected (one process, tier order). Under ``-n`` the run
ends with one line per worker: its tests, its clock from first start to last end, and whether it
ran the chain, so an unbalanced run shows which lane held it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tiers import clock

# Session fixtures that build or read the chain (their closure: asking for labeled_table asks for
# labeled_ckpt too).
CHAIN_FIXTURES = frozenset({"sample_demo", "labeled_ckpt", "labeled_table"})

# The test modules whose tests ask for them; all of each module's tests share the chain's lane.
CHAIN_MODULES = frozenset(
    {
        "test_faults.py",
        "test_features.py",
        "test_gpu.py",
        "test_hostile.py",
        "test_label_efficiency.py",
        "test_mlflow_ui.py",
        "test_predict.py",
        "test_pretrain_init.py",
        "test_suggest.py",
        "test_sweep.py",
    }
)

CHAIN_LANE = "chain"  # the scope name of the chain's tests in pytest-xdist's scheduler


def module_of(nodeid: str) -> str:
    """``tests/test_x.py::test_y[p]`` -> ``test_x.py``."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def lane_of(nodeid: str) -> str:
    """The scheduling unit of a test: :data:`CHAIN_LANE` for a chain module's tests, else the test
    itself (a unit of one, given to whichever worker is free)."""
    return CHAIN_LANE if module_of(nodeid) in CHAIN_MODULES else nodeid


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that asks for a chain fixture from outside :data:`CHAIN_MODULES`: under
    ``-n 2`` it would build a second chain in the other worker."""
    for item in items:
        wanted = sorted(CHAIN_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        if wanted and module_of(item.nodeid) not in CHAIN_MODULES:
            raise pytest.UsageError(
                f"{item.nodeid} asks for the session chain ({', '.join(wanted)}); add "
                f"{module_of(item.nodeid)!r} to CHAIN_MODULES in tests/lanes.py so that `pytest -n 2` "
                "runs it in the chain's worker"
            )


def _lane_scheduling(config: pytest.Config, log):
    """pytest-xdist's scope scheduler with :func:`lane_of` as the scope. It hands out the largest
    scope first (the chain, to one worker), then the tests of one, in tier order, to whichever
    worker has fewer than three left; a worker done with the chain takes its share of the rest."""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane_of(nodeid)

    return LaneScheduling(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``-n N`` with pytest-xdist's default distribution, the lanes; another ``--dist`` is
    left to pytest-xdist."""
    if config.getvalue("dist") == "load":
        return _lane_scheduling(config, log)
    return None


@dataclass
class WorkerSpan:
    """One pytest-xdist worker's share of the run, from its test reports (epoch seconds)."""

    tests: int = 0
    first: float = float("inf")
    last: float = 0.0
    chain: bool = False

    def add(self, report: pytest.TestReport) -> None:
        self.tests += report.when == "call" or (report.when == "setup" and not report.passed)
        self.first, self.last = min(self.first, report.start), max(self.last, report.stop)
        self.chain |= lane_of(report.nodeid) == CHAIN_LANE


class LaneReport:
    """Per-worker spans of a ``-n`` run, written after the tier lines."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerSpan] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        node = getattr(report, "node", None)  # pytest-xdist sets it on a worker's reports
        if node is not None:
            self.workers.setdefault(node.gateway.id, WorkerSpan()).add(report)

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


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller: its workers send their reports to it
        config.pluginmanager.register(LaneReport(), "rsdiff-lane-report")
