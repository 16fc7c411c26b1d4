"""Pretrain an unconditional DDPM on WebDataset shards with Ray Train (DDP, EMA, checkpoints, MLflow).

python jobs/make_sample.py && python jobs/pretrain.py    # the built-in sample shards, local Ray
python jobs/pretrain.py --config tiny data.shards=s3://bucket/shards
ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain/adm256.yaml ...

Start from existing weights (an OpenAI guided-diffusion .pt with its MODEL_FLAGS, a diffusers
UNet2DModel folder, or an rsdiff checkpoint), band-adapted to the shards:
python jobs/pretrain.py --config tiny data.shards=... init.from=runs/ray/other/checkpoint_00000300
python jobs/pretrain.py --config adm256 data.shards=... init.from=s3://bucket/256x256_diffusion_uncond.pt \\
    init.adm_flags='--image_size 256 --num_channels 256 --num_head_channels 64 --learn_sigma True ...'
"""

import json
import sys

from _cli import run_job

from rsdiff.config import redact_uri
from rsdiff.train.config import PretrainConfig


def _run(cfg: PretrainConfig) -> None:
    from rsdiff.pretrain import run_pretrain  # heavy (torch, Ray): only once the config is read

    result = run_pretrain(cfg)
    print(
        json.dumps(
            {
                "checkpoint": result.checkpoint,
                "step": result.step,
                "loss": result.metrics.get("loss"),
                "mlflow_run_id": result.mlflow_run_id,
                "tracking_uri": redact_uri(result.tracking_uri),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("pretrain", __doc__, PretrainConfig, _run))
