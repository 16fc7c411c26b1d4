"""The whole rsdiff chain on one machine: ingest -> pretrain -> extract -> sweep -> predict -> evaluate.

    python jobs/demo.py                      # generated sample scenes, ~10 min on 2 CPU cores
    python jobs/demo.py data=/data/dubai-aerial labels_preset=configs/ingest/dubai.yaml
    python jobs/demo.py pretrain_steps=1000 trials=8 fresh=true

Everything goes under workdir (runs/demo): shards, checkpoints, features, sweep, predictions,
metrics and the MLflow store (experiment rsdiff-demo).
"""

import sys

from _cli import run_job

from rsdiff.config import redact_uri
from rsdiff.demo import DemoConfig, run_demo
from rsdiff.evaluate import format_metrics
from rsdiff.tracking import runs_view_url


def _run(cfg: DemoConfig) -> None:
    result = run_demo(cfg)
    store = redact_uri(result.tracking_uri)  # no password on the terminal
    print(f"\ndata: {result.data}")
    print(
        f"test scenes ({len(result.test_scenes)}, held out of every choice): {', '.join(result.test_scenes)}"
    )
    print(f"\nwinner: {result.winner}")
    print(format_metrics(result.metrics))
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.stages.items()))
    first = result.predictions[0]
    print(f"predicted GeoTIFF: {first['class_map']}")
    if first.get("quicklook"):
        print(f"quicklook:         {first['quicklook']}")
    print(f"metrics:           {result.metrics_json}")
    if store.startswith("sqlite"):
        runs = runs_view_url("http://127.0.0.1:5000", result.experiment_id)
        print(f"MLflow UI:         mlflow ui --backend-store-uri {store}")
        print(f"                   then open {runs}")
    else:
        print(f"MLflow runs:       {runs_view_url(store, result.experiment_id)}")
    print(
        f"                   (experiment {result.experiment!r}: the demo run, its stage runs nested under it)"
    )


if __name__ == "__main__":
    sys.exit(run_job("demo", __doc__, DemoConfig, _run))
