"""Sweep timestep subsets, decoder-block subsets and head hyperparameters with Ray Tune + MLflow.

    python jobs/sweep.py --config configs/sweep/tiny.yaml features=runs/features/tiny
    python jobs/sweep.py --config configs/sweep/tiny.yaml num_samples=32 'search.kind=[residual,ensemble]'

Re-running with the same name and storage resumes an interrupted sweep. Compare trials in the
MLflow UI: experiment rsdiff-sweep, expand the parent run, select the child runs, Compare.
"""

import json
import sys

from _cli import run_job

from rsdiff.config import redact_uri
from rsdiff.sweep.config import SweepConfig


def _run(cfg: SweepConfig) -> None:
    from rsdiff.sweep.run import run_sweep  # heavy (torch, Ray): only once the config is read

    result = run_sweep(cfg)
    summary = {"best_head": result.best_head, "best_val_miou": result.best["best_val_miou"]}
    print(
        json.dumps(
            {
                **summary,
                "parent_run_id": result.parent_run_id,
                "tracking_uri": redact_uri(result.tracking_uri),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("sweep", __doc__, SweepConfig, _run))
