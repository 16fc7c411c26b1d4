"""Extract frozen multi-timestep, multi-block DDPM features at labeled pixels with Ray Data.

    python jobs/extract.py --config configs/extract/tiny.yaml \\
        checkpoint=runs/ray/pretrain-tiny/checkpoint_00000200
    python jobs/extract.py --config configs/extract/tiny.yaml \\
        checkpoint=s3://bucket/runs/x/checkpoint_00002000 shards=s3://bucket/labeled \\
        output=s3://bucket/features concurrency=4 num_gpus=1

    python jobs/extract.py --config configs/extract/tiny.yaml checkpoint=/models/adm.pt \\
        source.adm_flags='--image_size 64 --num_channels 128 ...' shards=runs/shards/dubai \\
        block_numbering=ddpm_seg 'blocks=[5,6,7,8,12]'

An unknown block name fails with the list of valid names (mid, up0.res0, ...). With
block_numbering=ddpm_seg, integers are guided-diffusion's output_blocks numbers (DDPM-Seg's).
"""

import json
import sys

from _cli import run_job

from rsdiff.features.config import ExtractConfig


def _run(cfg: ExtractConfig) -> None:
    from rsdiff.features.extract import run_extract  # heavy (torch, Ray): only once the config is read

    table = run_extract(cfg)
    splits = sorted({p["split"] for p in table.meta["parts"]})
    print(
        json.dumps(
            {
                "table": table.root,
                "dim": table.meta["dim"],
                "timesteps": table.meta["timesteps"],
                "blocks": table.meta["blocks"],
                "rows": {s: table.rows(s) for s in splits},
                "skipped_images_without_labels": table.meta["skipped_images_without_labels"],
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("extract", __doc__, ExtractConfig, _run))
