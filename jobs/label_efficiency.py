"""Label efficiency: test mIoU vs number of labeled scenes, rsdiff's methods against a scratch UNet.

    python jobs/label_efficiency.py features=runs/demo/features selection=runs/demo/sweep/best
    python jobs/label_efficiency.py features=s3://bucket/features 'ks=[1,2,5,10,20]' draws=5
    python jobs/label_efficiency.py features=runs/demo/features val_budget=k 'ks=[1,5]' \
        'methods=[finetune,finetune_random,dense_decoder,scratch_unet]'

Methods: residual / ensemble (heads on frozen DDPM features), finetune (the pretrained denoiser
fine-tuned as a segmenter), finetune_random (the same network from random initialisation),
dense_decoder (a conv decoder on frozen DDPM feature maps), scratch_unet (the baseline). Draws are
nested over k; val_budget=k early-stops each draw on k val scenes, so a row's labels are 2k scenes.

Writes results.json (every run, paired differences with 90% bootstrap intervals), table.md and
label_efficiency.png under output, and one MLflow run
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
