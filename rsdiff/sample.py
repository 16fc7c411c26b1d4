"""The built-in sample: generated scenes ingested into shards, so pretraining can be tried with no
data of one's own (``python jobs/make_sample.py``, then ``python jobs/pretrain.py``).

The scenes are :mod:`rsdiff.data.synthetic`'s 4-band uint16 GeoTIFFs with index masks; they are
cut with the shipped ``ingest/sample`` preset. Made by this explicit step only: pretraining never
creates data on its own.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rsdiff import storage
from rsdiff.config import bounded, build, check_ranges, load_config, preset
from rsdiff.data.manifest import Manifest
from rsdiff.errors import ConfigError
from rsdiff.ray_config import RayConfig
from rsdiff.train.config import SAMPLE_SHARDS

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Config of ``jobs/make_sample.py``."""

    output: str = SAMPLE_SHARDS  # local folder or s3:// prefix; pretraining's default data.shards
    scenes: int = bounded(12, ge=2)
    size: int = bounded(256, ge=64)  # px, square scenes
    overwrite: bool = False
    ray: RayConfig = field(default_factory=RayConfig)


def make_sample(cfg: SampleConfig) -> Manifest:
    """Generate ``cfg.scenes`` scenes in a temporary folder and ingest them into ``cfg.output``.

    Raises:
        ConfigError: bad numbers; output already holds shards (without ``overwrite``).
    """
    from rsdiff.data.ingest_config import IngestConfig
    from rsdiff.data.synthetic import write_sample_dataset
    from rsdiff.ingest import run_ingest

    check_ranges(cfg)
    out = storage.absolute(str(cfg.output))
    if storage.exists(storage.join(out, "manifest.json")) and not cfg.overwrite:
        raise ConfigError(
            f"{storage.display(out)} already holds shards; pass overwrite=true to make them again"
        )
    with tempfile.TemporaryDirectory(prefix="rsdiff-sample-") as tmp:
        log.info("writing %d generated %d px scenes and ingesting them into %s", cfg.scenes, cfg.size, out)
        write_sample_dataset(Path(tmp), scenes=cfg.scenes, height=cfg.size, width=cfg.size)
        ingest = load_config(IngestConfig, preset("ingest", "sample"), [f"inputs=[{tmp}/images/*.tif]"])
        return run_ingest(
            build(IngestConfig, ingest, {"output": out, "overwrite": cfg.overwrite, "ray": cfg.ray})
        )
