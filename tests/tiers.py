"""The suite's tiers, as a pytest plugin (``tests/conftest.py`` loads it): every test carries exactly
one of ``unit``, ``integration`` and ``e2e``, the run goes cheapest first, each test gets its
tier's time limit, and the end of the run says, per tier, how many tests passed, failed and were
skipped and how long they took.

The limits are bounds for a hang (``pytest-timeout``, fixture set-up included), not timings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

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


@dataclass
class TierTally:
    """One tier's results: each test's outcome (its worst phase), the seconds of all its phases, and
    the clock span from its first phase's start to its last phase's end. A test counts as passed
    once its call passed: one set up and never called to the end (Ctrl-C, ``timeout -s INT``) stays
    unfinished."""

    # nodeid -> unfinished / passed / failed / error / skipped
    outcomes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    first: float = float("inf")  # epoch seconds
    last: float = float("-inf")

    def add(self, report: pytest.TestReport) -> None:
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
        """``tier  N tests  M:SS in tests  M:SS first to last  n passed, n failed, ...``"""
        counts = Counter(self.outcomes.values())
        kinds = ("passed", "failed", "error", "skipped", "unfinished")
        said = ", ".join(f"{counts[k]} {k}" for k in kinds if counts[k])
        return (
            f"{tier:<12} {len(self.outcomes):>4} tests {_clock(self.seconds):>8} in tests "
            f"{_clock(self.last - self.first):>8} first to last   {said}"
        )


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


class TierReport:
    """The per-tier tally of one run: fed every phase's report, it writes the summary at the end."""

    def __init__(self) -> None:
        self.tallies = {tier: TierTally() for tier in TIERS}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count each phase under its test's tier (the marks travel with the report, also from
        pytest-xdist's workers)."""
        tiers = [t for t in TIERS if t in report.keywords]
        if len(tiers) == 1:
            self.tallies[tiers[0]].add(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """One line per tier, in run order: tests, their summed seconds (set-up and teardown
        included; with pytest-xdist, the sum over its workers), the clock from the tier's first
        test's start to its last one's end (in a serial run, the tier's share of the wall time),
        and outcomes."""
        if not any(t.outcomes for t in self.tallies.values()):
            return
        terminalreporter.write_sep("=", "tiers, in the order they ran")
        for tier, tally in self.tallies.items():
            if tally.outcomes:
                terminalreporter.write_line(tally.line(tier))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # pytest-xdist's workers send their reports to the controller
        config.pluginmanager.register(TierReport(), "rsdiff-tier-report")
