"""Label efficiency: val mIoU vs number of labeled images for frozen-DDPM heads and a scratch UNet.

    python jobs/label_efficiency.py features=runs/demo/features selection=runs/demo/sweep/best
    python jobs/label_efficiency.py features=s3://bucket/features 'ks=[1,2,5,10,20]' draws=5

Writes results.json, table.md and label_efficiency.png under output, and one MLflow run
(experiment rsdiff-label-efficiency).
"""

import sys

from _cli import run_job

from rsdiff.label_efficiency import LabelEfficiencyConfig, run_label_efficiency


def _run(cfg: LabelEfficiencyConfig) -> None:
    result = run_label_efficiency(cfg)
    print(result.table)
    print(f"results: {result.output}")


if __name__ == "__main__":
    sys.exit(run_job("label_efficiency", __doc__, LabelEfficiencyConfig, _run))
