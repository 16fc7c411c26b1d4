"""rsdiff's own record of each sweep trial: plain JSON in ``{storage}/{name}/trials/sNNNN.json``,
written after every epoch and read back (never Ray Tune's pickles) to continue a sweep."""

from __future__ import annotations

import json
from typing import Any

from rsdiff import storage
from rsdiff.errors import ConfigError

TRIALS = "trials"  # in the experiment folder: rsdiff's JSON record of each sample


STATUSES = ("running", "finished", "stopped_early", "error")


DONE = ("finished", "stopped_early")  # samples a re-run does not run again


def trial_id(sample: int) -> str:
    """The stable id of sample ``sample`` (its head folder and MLflow run name use it)."""
    return f"s{sample:04d}"


def record_uri(experiment: str, sample: int) -> str:
    return storage.join(experiment, TRIALS, f"{trial_id(sample)}.json")


def write_record(experiment: str, record: dict[str, Any]) -> None:
    storage.write_text(
        record_uri(experiment, record["sample"]), json.dumps(record, indent=1, allow_nan=False)
    )


def read_records(experiment: str, num_samples: int) -> dict[int, dict[str, Any]]:
    """rsdiff's own trial records of an experiment (plain JSON), by sample index.

    Raises:
        ConfigError: a record that is not one rsdiff wrote (unparsable, wrong fields or index).
    """
    records: dict[int, dict[str, Any]] = {}
    for uri in storage.list_uris(storage.join(experiment, TRIALS), ".json"):
        try:
            rec = json.loads(storage.read_text(uri))
            sample = rec["sample"]
            ok = (
                isinstance(sample, int)
                and 0 <= sample < num_samples
                and storage.name(uri) == f"{trial_id(sample)}.json"
                and rec["status"] in STATUSES
                and all(isinstance(h.get("val_miou"), int | float) for h in rec["history"])
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{storage.display(uri)} is not a trial record this sweep wrote; delete it (that trial runs "
                "again) or pass fresh=true"
            )
        records[sample] = rec
    return records


def mark_ended(grid: Any, experiment: str, num_samples: int) -> None:
    """Record how this attempt's unfinished trials ended: stopped early by the scheduler (done, not
    run again) or failed (run again by the next invocation)."""
    records = read_records(experiment, num_samples)
    for r in grid:
        if r.config is None or "sample" not in r.config:
            continue
        sample = int(r.config["sample"])
        if sample not in records and r.error is None:
            continue  # never started (e.g. time_budget_s ran out): the next run runs it
        rec = records.get(sample, {"sample": sample, "trial_id": trial_id(sample), "history": []})
        if rec.get("status") == "finished":
            continue
        if r.error is None:
            rec["status"] = "stopped_early"
        else:
            rec.update(status="error", error=str(r.error)[:200])
        write_record(experiment, rec)
