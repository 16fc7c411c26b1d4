"""``jobs/demo.py``: the whole chain on one machine, from scenes to an evaluated land-cover map.

ingest -> pretrain (tiny preset) -> extract -> sweep (a few trials) -> predict (the held-out test
scenes) -> evaluate, with a local Ray, local storage under ``workdir`` and one MLflow experiment
that holds each stage's runs plus a ``demo`` run summarising them. With ``data`` (a folder of
image/mask pairs such as dubai-aerial) it uses that; without it generates six small 4-band
uint16 GeoTIFF scenes with index masks (synthetic and easy: a sanity check, not a benchmark).
Scenes are split train/val/test; the sweep selects on val only, and the final metrics are those of
the test scenes, which nothing before the final evaluation reads. Re-running resumes: finished
stages are reused (pretraining resumes from its checkpoint, the sweep continues from its trial
records); ``fresh=true`` starts over.
"""

from __future__ import annotations

from rsdiff.demo.config import DemoConfig, DemoResult
from rsdiff.demo.data import discover_colour_classes
from rsdiff.demo.run import run_demo

__all__ = ["DemoConfig", "DemoResult", "discover_colour_classes", "run_demo"]
