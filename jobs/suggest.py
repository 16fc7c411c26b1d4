"""Suggest which tiles of unlabeled scenes to label next: the most uncertain, kept apart.

    python jobs/suggest.py head=runs/sweeps/sweep-tiny/best 'inputs=[/data/scenes/*.tif]' \\
        masks='{dir}/../masks/{stem}.png' budget=20 tile=256
    python jobs/suggest.py head=s3://bucket/sweeps/x/best 'inputs=[s3://bucket/scenes/]' \\
        'labeled=[s3://bucket/shards/labeled]' output=s3://bucket/suggestions num_gpus=1

Scenes with a mask (masks=) or named in labeled= are never suggested. Writes, under output:
suggestions.json (ranked tiles, written last), suggestions.geojson (tile footprints in the
scenes' CRS, for QGIS), contact_sheet.png, and maps/{scene}.tif + maps/{scene}.uncertainty.tif.
"""

import json
import sys

from _cli import run_job

from rsdiff.suggest.config import SuggestConfig


def _run(cfg: SuggestConfig) -> None:
    from rsdiff.suggest.run import run_suggest  # heavy (torch, Ray): only once the config is read

    result = run_suggest(cfg)
    print(
        json.dumps(
            {
                "output": result.output,
                "suggestions": [
                    {k: e[k] for k in ("rank", "scene", "window", "score")} for e in result.suggestions
                ],
                "excluded_labeled_scenes": result.excluded,
                "geojson": result.geojson,
                "mlflow_run_id": result.mlflow_run_id,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("suggest", __doc__, SuggestConfig, _run))
