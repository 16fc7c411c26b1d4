"""Cut GeoTIFF / JPG+mask scenes into WebDataset shards plus a manifest (local path or s3://).

python jobs/ingest.py --config configs/ingest/dubai.yaml inputs='[/data/dubai-aerial/*/images/*.jpg]'
"""

import json
import sys

from _cli import run_job

from rsdiff.data.ingest_config import IngestConfig


def _run(cfg: IngestConfig) -> None:
    from rsdiff.ingest import run_ingest  # heavy (torch, Ray): only once the config is read

    manifest = run_ingest(cfg)
    print(
        json.dumps(
            {
                "manifest": f"{manifest.root}/manifest.json",
                "samples": manifest.samples,
                "shards": {k: len(v) for k, v in manifest.shards.items()},
                "dropped": manifest.dropped,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_job("ingest", __doc__, IngestConfig, _run))
