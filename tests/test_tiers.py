"""The suite's tier plugin (``tests/tiers.py``), run on small generated test files in inner pytest
sessions: a test without exactly one tier is refused by name, the run goes unit -> integration ->
e2e with each tier's time limit, and the run ends with one line per tier, also under pytest-xdist."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

INI = """
[pytest]
markers =
    unit: u
    integration: i
    e2e: e
"""

MIXED = """
import pytest

ORDER = []


@pytest.mark.e2e
def test_e2e_first_in_the_file(request):
    ORDER.append("e2e")
    assert ORDER == ["unit", "integration", "e2e"]


@pytest.mark.integration
def test_integration_that_fails(request):
    ORDER.append("integration")
    assert request.node.get_closest_marker("timeout").args == (900,)
    assert False, "on purpose"


@pytest.fixture
def broken():
    raise RuntimeError("a fixture that cannot be built")


@pytest.mark.integration
def test_integration_whose_fixture_fails(broken):
    pass


@pytest.mark.unit
def test_unit_last_in_the_file(request):
    ORDER.append("unit")
    assert request.node.get_closest_marker("timeout").args == (120,)


@pytest.mark.unit
@pytest.mark.timeout(7)
def test_unit_with_its_own_limit(request):
    assert request.node.get_closest_marker("timeout").args == (7,)


@pytest.mark.e2e
def test_e2e_skipped():
    pytest.skip("no such machine here")
"""


# The machine's cores over a tier's span: "-" for a span under half a second.
BUSY = r"(-|\d+\.\d\d of \d+ cores busy(, \d+\.\d\d stolen)?|cores busy unmeasured \(no psutil\))"


def _tier_lines(text: str) -> dict[str, str]:
    after = text.split("tiers, in the order they ran")[1]
    return {m.group(1): m.group(0) for m in re.finditer(r"^(unit|integration|e2e) .*$", after, re.M)}


def _load_through_a_conftest(pytester: pytest.Pytester) -> None:
    """As in the suite: a conftest names the plugin, which lies beside it, so pytest-xdist's workers
    and a pytest subprocess import it from there."""
    shutil.copy(Path(__file__).with_name("tiers.py"), pytester.path / "tiers.py")
    pytester.makeconftest('pytest_plugins = ("tiers",)')


def test_a_test_without_exactly_one_tier_is_refused_by_name(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(
        test_bad="""
        import pytest

        def test_with_none():
            pass

        @pytest.mark.unit
        @pytest.mark.e2e
        def test_with_two():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad.py::test_with_none: marked with no tier; mark it with exactly*"])


def test_tiers_run_cheapest_first_with_their_limits_and_are_summed_up_at_the_end(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_mixed=MIXED)
    result = pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, skipped=1, errors=1)
    lines = _tier_lines(result.stdout.str())
    assert list(lines) == ["unit", "integration", "e2e"], lines
    assert re.match(rf"unit +2 tests +0:0\d in tests +0:0\d first to last +{BUSY} +2 passed$", lines["unit"])
    assert lines["integration"].endswith("  1 failed, 1 error") and " 2 tests " in lines["integration"]
    assert lines["e2e"].endswith("  1 passed, 1 skipped") and " 2 tests " in lines["e2e"]


def test_each_tier_says_how_busy_the_machines_cores_were_over_its_span(pytester: pytest.Pytester):
    """A tier whose test keeps one core working for a second reads at least most of a core busy or
    taken by a hypervisor, whatever else the machine runs; no tier reads more cores than the
    machine has."""
    import psutil

    pytester.makeini(INI)
    pytester.makepyfile(
        test_busy="""
        import time
        import pytest

        @pytest.mark.unit
        def test_one_core_working_for_a_second():
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                pass

        @pytest.mark.integration
        def test_waiting_for_a_second():
            time.sleep(1.0)
        """
    )
    result = pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    lines = _tier_lines(result.stdout.str())
    busy, stolen = {}, {}
    for tier, line in lines.items():
        match = re.search(r"  (\d+\.\d\d) of (\d+) cores busy(, (\d+\.\d\d) stolen)?", line)
        assert match and int(match[2]) == psutil.cpu_count(), line
        busy[tier], stolen[tier] = float(match[1]), float(match[4] or 0)
    assert busy["unit"] + stolen["unit"] >= 0.7 and busy["unit"] <= psutil.cpu_count() + 0.05, lines
    assert 0.0 <= busy["integration"] <= psutil.cpu_count() + 0.05, lines


def test_without_psutil_the_summary_says_the_busy_cores_are_unmeasured(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    import tiers

    monkeypatch.setattr(tiers, "psutil", None)
    pytester.makeini(INI)
    pytester.makepyfile(test_one="import pytest\n\n@pytest.mark.unit\ndef test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert _tier_lines(result.stdout.str())["unit"].endswith(
        "first to last   cores busy unmeasured (no psutil)   1 passed"
    )


def test_the_summary_counts_the_reports_of_xdist_workers(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_mixed=MIXED.replace('assert ORDER == ["unit", "integration", "e2e"]', "pass"))
    _load_through_a_conftest(pytester)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=3, failed=1, skipped=1, errors=1)
    lines = _tier_lines(result.stdout.str())
    assert lines["unit"].endswith("  2 passed"), lines
    assert lines["integration"].endswith("  1 failed, 1 error"), lines
    assert lines["e2e"].endswith("  1 passed, 1 skipped"), lines


def test_a_test_stopped_by_ctrl_c_is_not_counted_as_passed(pytester: pytest.Pytester):
    """Ctrl-C (or ``timeout -s INT``) in a test's call: its set-up passed and its call never ended,
    so it counts as unfinished; the test that passed before it still counts as passed."""
    pytester.makeini(INI)
    pytester.makepyfile(
        test_stopped="""
        import pytest

        @pytest.mark.integration
        def test_done():
            pass

        @pytest.mark.integration
        def test_stopped_midway():
            raise KeyboardInterrupt
        """
    )
    # A process of its own: an in-process run would pass the KeyboardInterrupt on to this session.
    _load_through_a_conftest(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    lines = _tier_lines(result.stdout.str())
    assert lines["integration"].endswith("  1 passed, 1 unfinished"), lines
