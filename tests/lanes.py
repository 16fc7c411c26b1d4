"""Two lanes for ``pytest -n 2``, as a pytest plugin (``tests/conftest.py`` loads it).

The session's chain fixtures (a demo run of every stage, and a briefly pretrained tiny DDPM with its
feature table: about 100 CPU-seconds to build) are session-scoped, so each pytest-xdist worker that
asks for one builds its own. Under ``-n 2`` every test that asks for one (directly or through
another fixture) therefore goes to one worker, in the tier order, and the other tests to whichever
worker is free: the chain is built once, and the unit tests, pretraining and the fake autoscaling
cluster run beside it. A module whose tests share a module-scoped fixture (the fake autoscaling
cluster) goes to one worker as a whole, so that it too is built once.

pytest-xdist's schedulers see test ids only, not fixtures: each worker writes, once it has
collected, which of its tests share a scope (the chain, or a module) to a file the controller named
(``workerinput["rsdiff_lanes"]``), and the scheduler reads it when it splits the run. A run without
``-n`` is unaffected (one process, tier order). Under ``-n`` the run ends with one line per worker:
its tests, its clock from first start to last end, and whether it ran the chain, so an unbalanced
run shows which lane held it up.

The lanes end together when the long work goes first: under ``-n`` each tier hands out its scopes
longest first, by the seconds the ``lanes_durations`` file (``tests/durations.json``) holds from an
earlier passing run (a test it does not hold counts as 0 s and goes last in its tier), so the last
tests handed out are short ones, to whichever worker is free. A worker is handed its next scope
before its current test ends (it needs its next test to run the current one): the longest scope
left goes to the worker expected to come free first, by the same seconds, and a worker still busy
for longer than another takes the shortest scope of the tier instead, so that a long test is not
queued behind another long one while the other worker runs out of work.
``pytest -n 2 --save-durations`` writes the file anew from the run's own timings; a failed run
leaves it as it was.

Each worker's thread pools get its share of the cores (``cores // N`` under ``-n N``, at least 1):
torch's OpenMP threads spin while they wait for work, so two workers each running as many threads
as the machine has cores spend CPU time spinning against each other. On 2 cores, ``pytest -m unit
-n 2`` took 49.5 s and 76 CPU-seconds with two threads per worker, 40.1 s and 55 with one. The
variables reach the workers, their job subprocesses and their Ray clusters' processes; one already
set in the environment is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiers import TIERS, clock, tier_of

# Session fixtures that build or read the chain (a test's closure names them however it asks).
CHAIN_FIXTURES = frozenset({"sample_demo", "labeled_ckpt", "labeled_table"})

CHAIN_LANE = "chain"  # the scope name of the chain's tests in pytest-xdist's scheduler
WORKER_KEY = "rsdiff_lanes"  # workerinput key: the folder where workers write their test lanes
SHARED_SCOPES = ("module", "class", "package")  # fixtures a worker keeps for a module's tests
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # torch's and numpy's pools
SAVED_FROM_S = 1.0  # the tests --save-durations keeps: shorter ones order like unknown ones (0 s)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("lanes_durations", "file of each test's seconds (nodeid -> s): the order under -n")
    parser.addoption(
        "--save-durations",
        action="store_true",
        help=f"write the seconds of this run's tests of {SAVED_FROM_S:g} s or more to the "
        "lanes_durations file, the order of the next pytest -n run",
    )


def durations_file(config: pytest.Config) -> Path | None:
    """The ``lanes_durations`` file (relative to the rootdir), or None where none is configured."""
    name = config.getini("lanes_durations")
    return config.rootpath / name if name else None


def read_durations(path: Path | None) -> dict[str, float]:
    """``nodeid -> seconds`` from ``path``; empty when there is none (every test then counts 0 s)."""
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def wants_chain(item: pytest.Item) -> bool:
    """Whether ``item`` asks for a chain fixture (directly or through another fixture)."""
    return bool(CHAIN_FIXTURES.intersection(getattr(item, "fixturenames", ())))


def scope_of(item: pytest.Item) -> str:
    """The unit of work pytest-xdist hands to one worker: :data:`CHAIN_LANE` for a test that asks
    for the chain; its module's path for one that asks for a module-, class- or package-scoped
    fixture (the module's tests share a worker, which builds it once: the fake autoscaling cluster,
    shards a module ingests); otherwise the test alone."""
    if wants_chain(item):
        return CHAIN_LANE
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    if any(d.scope in SHARED_SCOPES for overrides in defs for d in overrides):
        return item.nodeid.split("::")[0]
    return item.nodeid


@dataclass
class LanePlan:
    """What the workers tell the controller's scheduler: the scope of every test that shares one
    (``nodeid -> scope``; any other test is a scope of its own) and each scope's tier (its
    cheapest test's, as an index into :data:`tiers.TIERS`)."""

    scopes: dict[str, str]
    tiers: dict[str, int]

    def scope(self, nodeid: str) -> str:
        return self.scopes.get(nodeid, nodeid)


def lane_order(items: list[pytest.Item], seconds: dict[str, float]) -> LanePlan:
    """Sort ``items`` in place into the order the scheduler hands them out, and return the plan the
    scheduler needs: which tests share a scope, and each scope's tier.

    The chain's tests come first (one unit, to one worker). The other scopes follow by tier (a
    scope's cheapest test's), then longest first by their summed ``seconds`` (unknown: 0), ties in
    collection order. Inside a scope the tests keep their collection order (tier, then file): a
    module's tests may build on the state its earlier tests left (the autoscaling module's spot-run
    test wants a cluster without worker nodes: when its preemption was a test of its own, run
    first, the scale-up test found that test's nodes still up)."""
    order = list(TIERS)
    scope = {it.nodeid: scope_of(it) for it in items}
    total: dict[str, float] = {}
    first_tier: dict[str, int] = {}
    for it in items:
        s = scope[it.nodeid]
        total[s] = total.get(s, 0.0) + seconds.get(it.nodeid, 0.0)
        first_tier[s] = min(first_tier.get(s, len(order)), order.index(tier_of(it)))
    rank = {s: i for i, s in enumerate(dict.fromkeys(scope.values()))}  # collection order
    place = {it.nodeid: i for i, it in enumerate(items)}

    def key(it: pytest.Item) -> tuple:
        s = scope[it.nodeid]
        return (s != CHAIN_LANE, first_tier[s], -total[s], rank[s], place[it.nodeid])

    items.sort(key=key)
    return LanePlan({nodeid: s for nodeid, s in scope.items() if s != nodeid}, first_tier)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker: put the tests in the lanes' order and write which of them share a
    scope, for the controller's scheduler (atomically: a reader sees all of it or nothing). Every
    worker reads the same durations file, so all collect the same order."""
    folder = getattr(config, "workerinput", {}).get(WORKER_KEY)
    if folder is None:
        return
    plan = lane_order(items, read_durations(durations_file(config)))
    path = Path(folder) / f"{config.workerinput['workerid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"scopes": plan.scopes, "tiers": plan.tiers}, sort_keys=True))
    os.replace(tmp, path)


def read_plan(folder: Path) -> LanePlan:
    """The :class:`LanePlan` the workers wrote (any worker's file: they collect the same tests);
    empty when none could be read, and then every test goes alone, in the first tier."""
    for path in sorted(folder.glob("*.json")):
        return LanePlan(**json.loads(path.read_text()))
    return LanePlan({}, {})


def next_scope(queue: list[tuple[str, float, int]], left_here_s: float, left_elsewhere_s: float) -> str:
    """The scope to hand a worker that needs its next one, from ``queue`` (``(scope, seconds,
    tier)`` in the order they are handed out: tier, then longest first).

    ``left_here_s`` is the time this worker still needs for the tests it holds, ``left_elsewhere_s``
    the least any other worker needs. The worker that comes free first takes the head of the queue;
    one that will still be busy after another takes the shortest scope of the head's tier (the last
    of equals), so that the long scopes go where a worker comes free."""
    if left_here_s <= left_elsewhere_s:
        return queue[0][0]
    tier = queue[0][2]
    same_tier = [entry for entry in queue if entry[2] == tier]
    return min(reversed(same_tier), key=lambda entry: entry[1])[0]


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


def _lane_scheduling(config: pytest.Config, log, lanes: Lanes):
    """pytest-xdist's scope scheduler with the lanes' scopes, handed out in the workers' collection
    order (:func:`lane_order`: the chain first, to one worker, then the rest by tier and longest
    first), each to a worker that has fewer than two tests left, which :func:`next_scope` picks by
    the seconds each worker still needs; a worker done with the chain takes its share of the rest."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # pytest-xdist would put the scopes of most tests first
    seconds = read_durations(durations_file(config))

    class LaneScheduling(LoadScopeScheduling):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.since: dict = {}  # node -> when its current test started (its last one ended)

        def _split_scope(self, nodeid: str) -> str:
            return lanes.plan().scope(nodeid)

        def mark_test_complete(self, node, item_index: int, duration: float = 0) -> None:
            self.since[node] = time.monotonic()
            super().mark_test_complete(node, item_index, duration)

        def _left_s(self, node) -> float:
            """Seconds ``node`` still needs for the tests it holds (its current one's so far taken off)."""
            units = self.assigned_work.get(node, {}).values()
            left = [nodeid for unit in units for nodeid, done in unit.items() if not done]
            if not left:
                return 0.0
            ran = time.monotonic() - self.since.get(node, time.monotonic())
            return max(0.0, seconds.get(left[0], 0.0) - ran) + sum(seconds.get(n, 0.0) for n in left[1:])

        def _assign_work_unit(self, node) -> None:
            tiers = lanes.plan().tiers
            queue = [
                (scope, sum(seconds.get(n, 0.0) for n in unit), tiers.get(scope, 0))
                for scope, unit in self.workqueue.items()
            ]
            others = [self._left_s(other) for other in self.nodes if other is not node]
            pick = next_scope(queue, self._left_s(node), min(others, default=float("inf")))
            self.workqueue.move_to_end(pick, last=False)
            self.since.setdefault(node, time.monotonic())  # its first test starts now
            super()._assign_work_unit(node)

    return LaneScheduling(config, log)


class Lanes:
    """The controller's side: a folder for the workers' lists, the scheduler, the worker lines."""

    def __init__(self, save_to: Path | None = None) -> None:
        self.folder: Path | None = None  # made when the first worker is configured (``-n`` only)
        self.workers: dict[str, WorkerSpan] = {}
        self._plan: LanePlan | None = None  # read from the workers' files when first asked
        self.save_to = save_to  # where --save-durations writes this run's seconds
        self.seconds: dict[str, float] = {}  # nodeid -> set-up, call and teardown s (saving only)

    def plan(self) -> LanePlan:
        """The workers' :class:`LanePlan`, read once, when the scheduler first asks (every worker
        has collected by then)."""
        if self._plan is None:
            self._plan = read_plan(self.folder) if self.folder else LanePlan({}, {})
        return self._plan

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
            return _lane_scheduling(config, log, self)
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.save_to is not None:
            self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        node = getattr(report, "node", None)  # pytest-xdist sets it on a worker's reports
        if node is not None:
            span = self.workers.setdefault(node.gateway.id, WorkerSpan())
            span.add(report, self.plan().scope(report.nodeid) == CHAIN_LANE)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter, exitstatus: int) -> None:
        self.save_durations(terminalreporter, exitstatus)
        if not self.workers:
            return
        start = min(w.first for w in self.workers.values())
        terminalreporter.write_sep("=", "pytest-xdist workers (tests/lanes.py)")
        for name, w in sorted(self.workers.items()):
            terminalreporter.write_line(
                f"{name:5} {w.tests:4d} tests   {clock(w.first - start)} to {clock(w.last - start)}"
                + ("   the chain's lane" if w.chain else "")
            )

    def save_durations(self, terminalreporter, exitstatus: int) -> None:
        """With ``--save-durations``: the seconds of this run's tests of ``SAVED_FROM_S`` or more
        go into the file (tests that did not run keep theirs, so a ``-m unit`` run changes only the
        unit tests'), written to a temporary name and renamed; not after a failed run (a test that
        hung or failed early would be ordered by a time that says nothing of it). One line says
        which."""
        if self.save_to is None:
            return
        if exitstatus != 0 or not self.seconds:
            why = "the run failed" if exitstatus != 0 else "no test ran"
            terminalreporter.write_line(f"--save-durations: {self.save_to} left as it was ({why})")
            return
        kept = read_durations(self.save_to)
        for nodeid, seconds in self.seconds.items():
            kept.pop(nodeid, None)
            if seconds >= SAVED_FROM_S:
                kept[nodeid] = round(seconds, 1)
        tmp = self.save_to.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n")
        os.replace(tmp, self.save_to)
        terminalreporter.write_line(f"--save-durations: {len(kept)} tests' seconds in {self.save_to}")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def share_the_cores(workers: int) -> None:
    """Under ``-n workers``: each worker's thread pools get ``cores // workers`` threads (at least
    1), through variables its process inherits when pytest-xdist starts it; ones already set are
    kept."""
    if workers > 0:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        for name in THREAD_VARS:
            os.environ.setdefault(name, str(threads))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller: it schedules, its workers report to it
        share_the_cores(int(getattr(config.option, "numprocesses", None) or 0))
        save_to = durations_file(config) if config.getoption("save_durations") else None
        if config.getoption("save_durations") and save_to is None:
            raise pytest.UsageError("--save-durations: set lanes_durations (a file) in the pytest ini")
        config.pluginmanager.register(Lanes(save_to), "rsdiff-lanes")
