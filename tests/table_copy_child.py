"""The child of the node-local copy race in ``test_table_cache.py``: a module of its own, so that a
spawned child imports the feature table alone (0.3 s), not the test module with torch (2.7 s)."""

from __future__ import annotations

import multiprocessing

import numpy as np

from rsdiff.features.cache import TableCacheConfig
from rsdiff.features.table import FeatureTable


def copy_in_child(root: str, cache_dir: str, out: multiprocessing.Queue) -> None:
    """Open the table at ``root`` through the node cache in ``cache_dir``; put (entry, train sum)."""
    table = FeatureTable.open(root).cached(TableCacheConfig(cache_dir=cache_dir))
    out.put((str(table.local.entry), float(table.load("train")[0].astype(np.float64).sum())))
