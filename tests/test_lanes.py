"""The suite's lanes for ``pytest -n 2`` (``tests/lanes.py``), run on small generated test files in
inner pytest sessions: the tests that ask for the session chain, from any module, share one worker
and build it once, the other tests run beside them, and each worker's span is summed up at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from lanes import THREAD_VARS, next_scope
from test_tiers import INI  # the inner sessions' tier marks

pytestmark = pytest.mark.unit

# A chain fixture that says in which worker it was built, and where each test ran.
CONFTEST = """
import os
import pytest

pytest_plugins = ("tiers", "lanes")


def record(what):
    with open(os.environ["LANES_LOG"], "a") as f:
        f.write(f"{what} {os.environ.get('PYTEST_XDIST_WORKER', 'main')}\\n")


@pytest.fixture(scope="session")
def sample_demo():
    record("built")
    return "demo"


@pytest.fixture(autouse=True)
def _where(request):
    record(request.node.name)
"""

# Chain tests in two modules, one of them beside tests that do not ask for it; one asks through
# another fixture.
CHAIN_TESTS = """
import time
import pytest


@pytest.fixture
def through_another(sample_demo):
    return sample_demo


@pytest.mark.integration
@pytest.mark.parametrize("n", range(2))
def test_chain(sample_demo, n):
    time.sleep(0.5)


@pytest.mark.integration
def test_chain_through_another(through_another):
    time.sleep(0.5)
"""

OTHER_TESTS = """
import time
import pytest


@pytest.mark.unit
@pytest.mark.parametrize("n", range(6))
def test_other(n):
    time.sleep(0.2)
"""


def _plugins_beside_a_conftest(pytester: pytest.Pytester, conftest: str) -> None:
    """As in the suite: a conftest names the plugins, which lie beside it, so pytest-xdist's workers
    import them from there."""
    for name in ("tiers.py", "lanes.py"):
        shutil.copy(Path(__file__).with_name(name), pytester.path / name)
    pytester.makeconftest(conftest)


def test_under_two_workers_the_chain_runs_in_one_and_the_other_tests_beside_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    log = pytester.path / "lanes.log"
    monkeypatch.setenv("LANES_LOG", str(log))
    pytester.makeini(INI)
    pytester.makepyfile(
        test_some=CHAIN_TESTS,
        test_mixed=OTHER_TESTS + "\n\n@pytest.mark.e2e\ndef test_chain_too(sample_demo):\n    pass\n",
    )
    _plugins_beside_a_conftest(pytester, CONFTEST)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=10)

    ran = [line.split() for line in log.read_text().splitlines()]
    built = [worker for what, worker in ran if what == "built"]
    chain = {worker for what, worker in ran if what.startswith("test_chain")}
    other = {worker for what, worker in ran if what.startswith("test_other")}
    assert len(built) == 1 and chain == set(built), ran  # built once, in the worker that ran the chain
    assert other - chain, ran  # the other worker ran tests beside the chain from the start

    after = result.stdout.str().split("pytest-xdist workers (tests/lanes.py)")[1]
    lines = re.findall(r"^(gw\d) +(\d+) tests +\d+:\d\d to \d+:\d\d(   the chain's lane)?$", after, re.M)
    assert sorted(w for w, _, _ in lines) == ["gw0", "gw1"], after
    assert sum(int(n) for _, n, _ in lines) == 10, after
    assert [w for w, _, mark in lines if mark] == list(chain), after


def test_a_run_without_workers_has_no_worker_lines(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_other=OTHER_TESTS.replace("range(6)", "range(1)"))
    _plugins_beside_a_conftest(pytester, 'pytest_plugins = ("tiers", "lanes")\n')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "pytest-xdist workers" not in result.stdout.str()


def test_under_two_workers_each_tier_goes_longest_first_by_the_durations_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    """The two tests the file says are longest are the first each worker runs; a longer e2e test
    still waits for its tier."""
    log = pytester.path / "lanes.log"
    monkeypatch.setenv("LANES_LOG", str(log))
    pytester.makeini(INI + "lanes_durations = durations.json\n")
    pytester.makepyfile(test_other=OTHER_TESTS + "\n\n@pytest.mark.e2e\ndef test_late():\n    pass\n")
    long = {"test_other.py::test_other[4]": 3.0, "test_other.py::test_other[2]": 2.0}
    (pytester.path / "durations.json").write_text(json.dumps({**long, "test_other.py::test_late": 99.0}))
    _plugins_beside_a_conftest(pytester, CONFTEST)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=7)

    ran = [line.split() for line in log.read_text().splitlines()]
    first = {worker: name for name, worker in reversed(ran)}  # each worker's first test
    assert sorted(first.values()) == ["test_other[2]", "test_other[4]"], ran  # not test_late


def test_save_durations_writes_the_runs_longer_tests_to_the_durations_file(pytester: pytest.Pytester):
    """A test that ran gets its new seconds, or leaves the file under 1 s; one that did not run
    keeps its entry; a failed run changes nothing."""
    pytester.makeini(INI + "lanes_durations = durations.json\n")
    earlier = {"test_elsewhere.py::test_not_run": 5.0, "test_other.py::test_other[0]": 3.0}
    (pytester.path / "durations.json").write_text(json.dumps(earlier))
    slow = "\n\n@pytest.mark.unit\ndef test_slow():\n    time.sleep(1.0)\n"
    pytester.makepyfile(test_other=OTHER_TESTS.replace("range(6)", "range(2)") + slow)
    _plugins_beside_a_conftest(pytester, 'pytest_plugins = ("tiers", "lanes")\n')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--save-durations")
    result.assert_outcomes(passed=3)
    saved = json.loads((pytester.path / "durations.json").read_text())
    assert list(saved) == ["test_elsewhere.py::test_not_run", "test_other.py::test_slow"], saved
    assert saved["test_elsewhere.py::test_not_run"] == 5.0 and 1.0 <= saved["test_other.py::test_slow"] < 5
    result.stdout.fnmatch_lines(["--save-durations: 2 tests' seconds in *durations.json"])

    pytester.makepyfile(test_fails="import pytest\n\n\n@pytest.mark.unit\ndef test_fails():\n    assert 0\n")
    again = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--save-durations")
    again.assert_outcomes(passed=3, failed=1)
    again.stdout.fnmatch_lines(["--save-durations: *durations.json left as it was (the run failed)"])
    assert json.loads((pytester.path / "durations.json").read_text()) == saved


def test_each_worker_gets_its_share_of_the_cores_for_its_thread_pools(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    for name in THREAD_VARS:  # unset for the inner run; this process's own values come back after
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    pytester.makeini(INI)
    pytester.makepyfile(
        test_threads=f"""
import os
import pytest
import torch


@pytest.mark.unit
@pytest.mark.parametrize("n", range(2))
def test_threads(n):
    assert [os.environ.get(v) for v in {THREAD_VARS!r}] == [{str(share)!r}] * 3
    assert torch.get_num_threads() == {share}
"""
    )
    _plugins_beside_a_conftest(pytester, 'pytest_plugins = ("tiers", "lanes")\n')
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2").assert_outcomes(passed=2)


def test_a_modules_tests_that_share_a_module_fixture_run_in_one_worker_which_builds_it_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    """... in their file's order, whatever their durations (a module's tests may build on the state
    its earlier ones left)."""
    log = pytester.path / "lanes.log"
    monkeypatch.setenv("LANES_LOG", str(log))
    pytester.makeini(INI + "lanes_durations = durations.json\n")
    (pytester.path / "durations.json").write_text(json.dumps({"test_cluster.py::test_on_cluster[3]": 9.0}))
    pytester.makepyfile(
        test_other=OTHER_TESTS,
        test_cluster="""
import time
import pytest
from conftest import record


@pytest.fixture(scope="module")
def cluster():
    record("built")
    return "cluster"


@pytest.mark.e2e
@pytest.mark.parametrize("n", range(4))
def test_on_cluster(cluster, n):
    time.sleep(0.2)
""",
    )
    _plugins_beside_a_conftest(pytester, CONFTEST)
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2").assert_outcomes(passed=10)

    ran = [line.split() for line in log.read_text().splitlines()]
    built = [worker for what, worker in ran if what == "built"]
    on_cluster = {worker for what, worker in ran if what.startswith("test_on_cluster")}
    assert len(built) == 1 and on_cluster == set(built), ran
    assert [what for what, _ in ran if what.startswith("test_on_cluster")] == [
        f"test_on_cluster[{n}]" for n in range(4)
    ], ran


def test_the_worker_that_comes_free_first_takes_the_longest_scope_left():
    queue = [("long", 90.0, 1), ("mid", 30.0, 1), ("short", 2.0, 1), ("also-short", 2.0, 1), ("e2e", 1.0, 2)]
    assert next_scope(queue, left_here_s=10.0, left_elsewhere_s=50.0) == "long"
    assert next_scope(queue, left_here_s=10.0, left_elsewhere_s=10.0) == "long"
    # Busy for longer than the other worker: the shortest of the head's tier (the last of equals),
    # not a later tier's.
    assert next_scope(queue, left_here_s=80.0, left_elsewhere_s=50.0) == "also-short"
    assert next_scope([("only", 9.0, 0)], left_here_s=80.0, left_elsewhere_s=0.0) == "only"


def test_a_long_test_is_not_queued_behind_another_in_a_worker_that_comes_free_later(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    """Three long tests by the durations file, on two workers: the worker that holds the longest
    is handed a short test as its next one, not the third long test, which goes to the worker that
    comes free first."""
    log = pytester.path / "lanes.log"
    monkeypatch.setenv("LANES_LOG", str(log))
    pytester.makeini(INI + "lanes_durations = durations.json\n")
    long = {f"test_mixed.py::test_long[{n}]": s for n, s in enumerate((100.0, 90.0, 80.0))}
    short = {f"test_mixed.py::test_short[{n}]": 1.0 for n in range(6)}
    (pytester.path / "durations.json").write_text(json.dumps({**long, **short}))
    tests = """
import time
import pytest


@pytest.mark.integration
@pytest.mark.parametrize("n", range(6))
def test_short(n):
    time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.parametrize("n", range(3))
def test_long(n):
    time.sleep(0.3)
"""
    pytester.makepyfile(test_mixed=tests)
    _plugins_beside_a_conftest(pytester, CONFTEST)
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2").assert_outcomes(passed=9)

    where = dict(line.split() for line in log.read_text().splitlines())
    assert where["test_long[0]"] not in {where["test_long[1]"], where["test_long[2]"]}, where
