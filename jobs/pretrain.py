"""Pretrain an unconditional DDPM on WebDataset shards with Ray Train (DDP, EMA, checkpoints, MLflow).

python jobs/make_sample.py && python jobs/pretrain.py    # the built-in sample shards, local Ray
python jobs/pretrain.py --config tiny data.shards=s3://bucket/shards
ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain/adm256.yaml ...
"""

import json
import sys

from _cli import run_job

from rsdiff.config import redact_uri
from rsdiff.pretrain import PretrainConfig, run_pretrain


def _run(cfg: PretrainConfig) -> None:
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
