"""Predict land-cover maps of whole scenes with a fitted head: georeferenced class-map GeoTIFFs.

    python jobs/predict.py head=runs/sweeps/sweep-tiny/best 'inputs=[/data/scenes/*.tif]'
    python jobs/predict.py head=s3://bucket/sweeps/x/best 'inputs=[s3://bucket/scenes/]' \\
        output=s3://bucket/maps probabilities=true num_gpus=1

Per scene: {scene}.tif (class-map COG with the source CRS/transform and a colour table),
{scene}.quicklook.png and, with probabilities=true, {scene}.proba.tif; predictions.json last.
"""

import json
import sys

from _cli import run_job

from rsdiff.config import redact_uri
from rsdiff.prediction.config import PredictConfig


def _run(cfg: PredictConfig) -> None:
    from rsdiff.prediction.run import run_predict  # heavy (torch, Ray): only once the config is read

    result = run_predict(cfg)
    print(
        json.dumps(
            {
                "output": result.output,
                "scenes": [
                    {k: r[k] for k in ("scene", "class_map", "quicklook", "georeferenced")}
                    for r in result.scenes
                ],
                "mlflow_run_id": result.mlflow_run_id,
                "tracking_uri": redact_uri(result.tracking_uri),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("predict", __doc__, PredictConfig, _run))
