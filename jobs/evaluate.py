"""Score predicted class maps against label masks: mIoU, per-class IoU, OA, F1, confusion matrix.

    python jobs/evaluate.py predictions=runs/predictions
    python jobs/evaluate.py predictions=s3://bucket/maps 'labels.mask_template={dir}/../labels/{stem}.tif' \\
        labels.kind=index

Label classes default to the head's (colours for colour masks, values for index masks). Writes
metrics.json next to the predictions and an MLflow run (experiment rsdiff-evaluate) with the
confusion-matrix PNG.
"""

import sys

from _cli import run_job

from rsdiff.evaluate import EvaluateConfig, format_metrics, run_evaluate


def _run(cfg: EvaluateConfig) -> None:
    result = run_evaluate(cfg)
    print(format_metrics(result.metrics))
    print(f"metrics: {result.output}")


if __name__ == "__main__":
    sys.exit(run_job("evaluate", __doc__, EvaluateConfig, _run))
