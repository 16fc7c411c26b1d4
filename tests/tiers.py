"""The suite's tiers, as a pytest plugin (``tests/conftest.py`` loads it): every test carries exactly
one of ``unit``, ``integration`` and ``e2e``, the run goes cheapest first, each test gets its
tier's time limit, and the end of the run says, per tier, how many tests passed, failed and were
skipped, how long they took, and how busy the machine's cores were meanwhile (a tier that keeps
them busy gains nothing from running beside another).

The limits are bounds for a hang (``pytest-timeout``, fixture set-up included), not timings.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

try:  # a test dependency; a host installed without it still runs the suite, its figure unmeasured
    import psutil
except ImportError:
    psutil = None

TIERS = {
    # in-process, seconds each: no Ray, no job subprocess (the loopback S3 server is allowed)
    "unit": 120,
    # a stage through its library entry on the session's Ray cluster, S3 server and MLflow store
    "integration": 900,
    # job scripts as processes (signals, exit codes, ray job submit), the fake autoscaling cluster
    "e2e": 1200,
}  # tier -> per-test limit in seconds (fixture set-up included), a bound for a hang, not a timing


def tier_of(item: pytest.Item) -> str:
    """The one tier mark of ``item``; a usage error naming the test if it has none or several."""
    tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
    if len(tiers) != 1:
        raise pytest.UsageError(
            f"{item.nodeid}: marked {tiers or 'with no tier'}; mark it with exactly one of "
            f"{', '.join(TIERS)} (pytestmark = pytest.mark.unit, or a decorator per test)"
        )
    return tiers[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without exactly one tier, give each its tier's time limit (unless it sets its
    own), and order the run unit -> integration -> e2e (stable within a tier)."""
    order = list(TIERS)
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIERS[tier]))
    items.sort(key=lambda it: order.index(tier_of(it)))


class CpuSample(NamedTuple):
    """The clock and the machine's CPU seconds, summed over its cores, at one moment."""

    wall: float  # epoch seconds
    busy: float  # working: user, nice, system, interrupts
    stolen: float  # taken by the hypervisor while this machine's cores wanted to run (0 where unreported)

    @classmethod
    def now(cls) -> CpuSample | None:
        if psutil is None:
            return None
        t = psutil.cpu_times()
        busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
        return cls(time.time(), busy, getattr(t, "steal", 0.0))


def cores_busy(start: CpuSample | None, end: CpuSample | None) -> str:
    """``1.33 of 2 cores busy`` between two samples (``, 0.10 stolen`` where the hypervisor took
    any), ``-`` for a span too short to say, or why it is unmeasured."""
    if start is None or end is None:
        return "cores busy unmeasured (no psutil)"
    wall = end.wall - start.wall
    if wall < 0.5:
        return "-"
    said = f"{(end.busy - start.busy) / wall:.2f} of {psutil.cpu_count()} cores busy"
    stolen = (end.stolen - start.stolen) / wall
    return said + (f", {stolen:.2f} stolen" if stolen >= 0.005 else "")


@dataclass
class TierTally:
    """One tier's results: each test's outcome (its worst phase), the seconds of all its phases, and
    the clock span from its first phase's start to its last phase's end, and the machine's CPU
    samples around its reports. A test counts as passed once its call passed: one set up and never
    called to the end (Ctrl-C, ``timeout -s INT``) stays unfinished."""

    # nodeid -> unfinished / passed / failed / error / skipped
    outcomes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    first: float = float("inf")  # epoch seconds
    last: float = float("-inf")
    cpu_start: CpuSample | None = None  # the run's last sample before this tier's first report
    cpu_end: CpuSample | None = None  # at this tier's latest report

    def add(self, report: pytest.TestReport, before: CpuSample | None, after: CpuSample | None) -> None:
        """Count one phase's report; ``before`` and ``after`` are the run's CPU samples at the
        previous report and at this one."""
        self.cpu_start = self.cpu_start or before
        self.cpu_end = after
        self.seconds += report.duration
        self.first, self.last = min(self.first, report.start), max(self.last, report.stop)
        now = self.outcomes.get(report.nodeid, "unfinished")
        if report.failed:  # a failed call stays "failed" whatever its teardown does
            now = "failed" if report.when == "call" or now == "failed" else "error"
        elif report.skipped and now in ("unfinished", "passed"):
            now = "skipped"
        elif report.when == "call" and now == "unfinished":
            now = "passed"
        self.outcomes[report.nodeid] = now

    def line(self, tier: str) -> str:
        """``tier  N tests  M:SS in tests  M:SS first to last  C of N cores busy  n passed, ...``"""
        counts = Counter(self.outcomes.values())
        kinds = ("passed", "failed", "error", "skipped", "unfinished")
        said = ", ".join(f"{counts[k]} {k}" for k in kinds if counts[k])
        return (
            f"{tier:<12} {len(self.outcomes):>4} tests {clock(self.seconds):>8} in tests "
            f"{clock(self.last - self.first):>8} first to last   "
            f"{cores_busy(self.cpu_start, self.cpu_end)}   {said}"
        )


def clock(seconds: float) -> str:
    """``754.4`` -> ``"12:34"`` (minutes, then seconds)."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


class TierReport:
    """The per-tier tally of one run: fed every phase's report, it writes the summary at the end."""

    def __init__(self) -> None:
        self.tallies = {tier: TierTally() for tier in TIERS}
        self.sample: CpuSample | None = None  # taken when the test loop starts, then at each report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """The first tier's CPU span starts with the test loop, not with collection."""
        self.sample = CpuSample.now()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count each phase under its test's tier (the marks travel with the report, also from
        pytest-xdist's workers). A tier's CPU span runs from the run's sample before its first
        report to its last report: in a serial run the tiers' spans follow one another; under
        pytest-xdist they can overlap, and each says how busy the machine was over its own."""
        tiers = [t for t in TIERS if t in report.keywords]
        before, self.sample = self.sample, CpuSample.now()
        if len(tiers) == 1:
            self.tallies[tiers[0]].add(report, before, self.sample)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """One line per tier, in run order: tests, their summed seconds (set-up and teardown
        included; with pytest-xdist, the sum over its workers), the clock from the tier's first
        test's start to its last one's end (in a serial run, the tier's share of the wall time),
        the machine's busy cores over the tier's span, and outcomes."""
        if not any(t.outcomes for t in self.tallies.values()):
            return
        terminalreporter.write_sep("=", "tiers, in the order they ran")
        for tier, tally in self.tallies.items():
            if tally.outcomes:
                terminalreporter.write_line(tally.line(tier))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # pytest-xdist's workers send their reports to the controller
        config.pluginmanager.register(TierReport(), "rsdiff-tier-report")
