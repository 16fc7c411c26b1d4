"""The journal a long job keeps of its finished runs: same settings resume, other settings and a
damaged journal start over, and an entry whose artifact is gone is run again."""

from __future__ import annotations

import json

import pytest

from rsdiff.journal import JOURNAL, Journal

pytestmark = pytest.mark.unit


def test_a_journal_resumes_only_the_same_settings_and_only_runs_whose_artifact_exists(tmp_path):
    folder = str(tmp_path)
    first = Journal(folder, {"draws": 2, "unet": {"steps": 4}})
    assert first.entries == {}
    (tmp_path / "heads" / "a").mkdir(parents=True)
    (tmp_path / "heads" / "a" / "head.json").write_text("{}")
    first.add("a", {"test_miou": 0.5})
    first.add("b", {"test_miou": 0.25})
    written = json.loads((tmp_path / JOURNAL).read_text())
    assert set(written["runs"]) == {"a", "b"} and len(written["settings"]) == 64
    again = Journal(folder, {"unet": {"steps": 4}, "draws": 2})  # the same settings, in another order
    assert again.get("a", "heads/a/head.json") == {"test_miou": 0.5}
    assert again.get("b", "heads/b/head.json") is None  # its head is gone
    assert again.get("c", "heads/c/head.json") is None
    assert Journal(folder, {"draws": 2, "unet": {"steps": 5}}).entries == {}
    (tmp_path / JOURNAL).write_text('{"settings": ')  # a damaged journal
    assert Journal(folder, {"draws": 2, "unet": {"steps": 4}}).entries == {}
