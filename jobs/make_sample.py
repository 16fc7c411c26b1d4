"""Make the built-in sample shards: generated 4-band scenes, ingested (pretraining's default data).

python jobs/make_sample.py                     # -> runs/shards/sample, then: python jobs/pretrain.py
python jobs/make_sample.py output=s3://bucket/shards/sample scenes=24
"""

import json
import sys

from _cli import run_job

from rsdiff.sample import SampleConfig, make_sample


def _run(cfg: SampleConfig) -> None:
    manifest = make_sample(cfg)
    print(json.dumps({"manifest": f"{manifest.root}/manifest.json", "samples": manifest.samples}))


if __name__ == "__main__":
    sys.exit(run_job("make_sample", __doc__, SampleConfig, _run))
