"""What every job script shares: argv -> config, logging, and one clear line per user error."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from rsdiff.config import load_config, to_yaml
from rsdiff.errors import RsdiffError


def run_job(
    name: str, doc: str, schema: type, run: Callable[[Any], Any], argv: list[str] | None = None
) -> int:
    """Parse ``[--config PRESET.yaml] [key=value ...]``, build the config and call ``run(cfg)``.

    Returns the process exit code: 0 on success, 2 on a user error (bad config, data, URI).
    """
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=doc)
    parser.add_argument("--config", help="YAML preset (configs/...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides such as tile_size=128")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        run(cfg)
    except RsdiffError as exc:
        print(f"rsdiff {name}: error: {exc}", file=sys.stderr)
        return 2
    return 0
