"""The MLflow UI, in a real headless Chromium, on the demo's tracking store: the address the demo
prints opens the experiment's training-runs table (not MLflow 3's GenAI overview with 0 traces),
and the demo run's page shows the winner and the test score in its description.

Needs a Chromium binary (``.ci/run`` installs Debian's ``chromium``); skipped by capability check
where there is none."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _render(url: str, out_png: str) -> str:
    """The DOM of ``url`` after its scripts ran (and a screenshot of it at ``out_png``)."""
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=20000", "--window-size=1400,900"]  # fmt: skip
    subprocess.run([*flags, f"--screenshot={out_png}", url], capture_output=True, timeout=120)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_the_printed_address_opens_the_runs_table(sample_demo, tmp_path):
    printed = re.search(r"then open (\S+)", (sample_demo / "stdout.txt").read_text()).group(1)
    port = free_port()
    url = printed.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    store = f"sqlite:///{sample_demo / 'mlflow.db'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        dom = _render(url, str(tmp_path / "runs.png"))
        # The machine-learning workflow (workflowType=machine_learning): its runs page and sidebar,
        # not the GenAI workflow's "Training runs" tab a browser would otherwise remember.
        assert re.search(r">\s*Runs\s*<", dom) and "Model registry" in dom, dom[-2000:]
        assert "Training runs" not in dom
        exp = MlflowClient(store).get_experiment_by_name("rsdiff-demo")
        assert f"/experiments/{exp.experiment_id}/runs" in url
        assert re.search(r">\s*demo\s*<", dom), "the demo run is not in the table"
        assert "Traces</h" not in dom  # not the GenAI overview
        # The demo run's page answers first: its description names the winner and the test score,
        # and the winning timesteps are a parameter of their own.
        demo = next(r for r in MlflowClient(store).search_runs([exp.experiment_id])
                    if r.data.tags.get("rsdiff.stage") == "demo")  # fmt: skip
        page = _render(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{demo.info.run_id}",
                       str(tmp_path / "demo-run.png"))  # fmt: skip
        test_miou = float(demo.data.metrics["test_miou"])
        assert "<strong>Winner</strong>: timesteps [" in page, page[-2000:]
        assert f"<strong>Test mIoU {test_miou:.3f}</strong>" in page and "worst class: " in page
        assert ">best.timesteps<" in page and ">best.blocks<" in page
    finally:
        server.terminate()
        server.wait(timeout=30)
