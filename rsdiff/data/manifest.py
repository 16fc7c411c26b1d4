"""The dataset manifest written next to the shards: what they hold and how to normalise it.

``manifest.json`` is written last, atomically: its presence marks an ingest output as complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rsdiff import storage
from rsdiff.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
KIND = "rsdiff-manifest"


@dataclass
class Manifest:
    """Facts about an ingest output.

    ``shards`` maps a split (``train``/``val``/``test``) to shard file names relative to the manifest's
    folder; ``band_stats`` holds per-band ``mean``/``std``/``min``/``max``/``count`` over every
    valid pixel of the kept tiles of the ``train`` split (of every split when none is train), in
    source units: what models normalise with, fit on nothing they are scored on.
    """

    bands: list[str]
    dtype: str
    tile_size: int
    stride: int
    samples: dict[str, int]
    shards: dict[str, list[str]]
    scenes: dict[str, list[str]]
    band_stats: dict[str, list[float]]
    dropped: dict[str, int] = field(default_factory=dict)
    classes: list[dict[str, Any]] | None = None
    ignore_index: int = 255
    class_pixels: list[int] | None = None
    format: int = FORMAT_VERSION
    kind: str = KIND
    inputs: list[str] = field(default_factory=list)
    # scene id -> {"image": URI, "mask": URI or None}: where each scene came from (the label
    # efficiency report predicts and scores whole test scenes from these)
    scene_files: dict[str, dict[str, str | None]] = field(default_factory=dict)
    labels: dict[str, Any] | None = None  # the ingest's label config (mask template, classes, ...)
    # shard file name -> tiles it holds: lets a resumed pretraining stream replay its shuffle to the
    # position instead of re-reading the epoch (empty in manifests written before it was recorded)
    shard_samples: dict[str, int] = field(default_factory=dict)
    root: str = field(default="", compare=False)

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def shard_uris(self, split: str | None = None) -> list[str]:
        """Absolute URIs of the shards of ``split`` (all splits when None)."""
        splits = [split] if split else sorted(self.shards)
        return [storage.join(self.root, n) for s in splits for n in self.shards.get(s, [])]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, allow_nan=False)  # standard JSON: no NaN/Infinity


def write_manifest(out_uri: str, manifest: Manifest) -> str:
    """Write ``{out_uri}/manifest.json`` atomically; returns its URI."""
    uri = storage.join(out_uri, MANIFEST_NAME)
    storage.write_text(uri, manifest.to_json())
    return uri


def read_manifest(shards_uri: str) -> Manifest:
    """Read the manifest of an ingest output folder/prefix.

    Raises:
        DataError: no manifest there (ingest missing or incomplete) or an unreadable one.
    """
    from rsdiff.artifacts import read_sidecar

    data = read_sidecar(
        shards_uri, MANIFEST_NAME, kind=KIND, max_format=FORMAT_VERSION, error=DataError,
        what="ingest output", legacy_without_kind=True,
        missing_hint="run jobs/ingest.py with output=<that URI> first, or fix the shards URI",
    )  # fmt: skip
    data.pop("root", None)
    try:
        manifest = Manifest(**data)
    except TypeError as exc:
        where = storage.display(storage.join(shards_uri, MANIFEST_NAME))
        raise DataError(f"{where} is not an rsdiff manifest: {exc}") from None
    manifest.root = storage.absolute(shards_uri)
    return manifest
