"""The suite's lanes for ``pytest -n 2`` (``tests/lanes.py``), run on small generated test files in
inner pytest sessions: the tests that ask for the session chain, from any module, share one worker
and build it once, the other tests run beside them, and each worker's span is summed up at the end."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
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
