"""What every job script shares: argv -> config, logging, and one clear line per failure.

Exit status: 0 success, 2 a user error (bad config, data, URI, full disk, unwritable store),
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM. Either signal stops the job at once
and says what was kept; the stage code has already marked its MLflow run KILLED.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from rsdiff import interrupts
from rsdiff.config import example_override, load_config, preset, preset_names, preview_yaml, sections
from rsdiff.console import quiet_library_loggers
from rsdiff.errors import RsdiffError, Terminated, describe_os_error

# What a stopped job leaves behind (nothing half-written ever looks complete).
KEPT = {
    "ingest": "no manifest.json was written and the shards written so far were deleted; re-run to start over",
    "pretrain": "every complete checkpoint is kept in run.storage/run.name; re-run the command to resume",
    "extract": "no table.json was written, so the output does not look complete; re-run to start over",
    "sweep": "finished trials are kept; re-run the same command to continue the sweep",
    "predict": "maps finished so far are kept, but no predictions.json; re-run with overwrite=true",
    "evaluate": "no metrics.json was written",
    "label_efficiency": "no results.json was written; the finished runs are kept in journal.json, and a "
    "re-run with the same settings resumes after them",
    "suggest": "no suggestions.json was written, so the output does not look complete; re-run to start over",
    "make_sample": "no manifest.json was written, so the output does not look complete; re-run to start over",
    "demo": "each finished stage's outputs are kept in workdir; re-run the same command to go on",
}


_received: list[int] = []  # SIGTERM seen (Ray's blocking calls re-raise it as a plain KeyboardInterrupt)


def _raise_terminated(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise Terminated(signum)


def _epilog(name: str, schema: type) -> str:
    """The config sections, required keys and shipped presets, for ``--help``."""
    required, nested, plain = [], [], []
    for key, what in sections(schema):
        if what.endswith("required"):
            required.append(f"  {key:<18} {what.rsplit(',', 1)[0]}")
        elif key.endswith(".*"):
            nested.append(f"  {key:<18} {_plain_rst(what)}")
        else:
            plain.append(key)
    names = preset_names(name)
    lines = ["required keys:", *(required or ["  (none)"]), "config sections:", *nested]
    lines += [
        "other keys:",
        *textwrap.wrap(", ".join(plain), 96, initial_indent="  ", subsequent_indent="  "),
    ]
    lines += [
        "presets (--config NAME): " + (", ".join(names) if names else "none shipped; pass a YAML file"),
        f"all keys with their values: python jobs/{name}.py --print-config",
    ]
    return "\n".join(lines)


def _dashed_override(argv: list[str]) -> str | None:
    """What to write instead of an override given the argparse way (``--optim.lr 1e-3``), or None."""
    flags = ("-h", "--help", "--config", "--print-config")
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--" or token.split("=", 1)[0] in flags:
            continue
        key, _, value = token[2:].partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        return (
            f"{token} is not an option: overrides are key=value with no dashes, e.g. {key}={value or '...'}"
        )
    return None


def _output_of(cfg: Any) -> str | None:
    """Where a job writes (``output``, ``workdir`` or ``run.storage``), to name its disk when full."""
    for value in (getattr(cfg, "output", None), getattr(cfg, "workdir", None),
                  getattr(getattr(cfg, "run", None), "storage", None)):  # fmt: skip
        if isinstance(value, str) and value:
            return value
    return None


def _plain_rst(text: str) -> str:
    """A docstring line without reST markup (``x`` and :class:`X` read as x and X)."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def run_job(
    name: str, doc: str, schema: type, run: Callable[[Any], Any], argv: list[str] | None = None
) -> int:
    """Parse ``[--config PRESET] [--print-config] [key=value ...]``, build the config and call ``run(cfg)``.

    ``schema`` must import without torch or Ray (``--help`` answers before either loads); ``run``
    imports the stage. Returns the process exit code (see the module docstring).
    """
    parser = argparse.ArgumentParser(
        prog=f"jobs/{name}.py",
        description=doc,
        epilog=_epilog(name, schema),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="a YAML file, or the name of a preset shipped with rsdiff (listed below)"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (required keys not yet given show as ???) and exit",
    )
    example = example_override(schema)
    parser.add_argument("overrides", nargs="*", help=f"dotlist overrides such as {example}")
    argv = sys.argv[1:] if argv is None else argv
    if (dashed := _dashed_override(argv)) is not None:
        print(f"rsdiff {name}: error: {dashed}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.print_config:
        try:
            path = preset(name, args.config) if args.config is not None else None
            print(preview_yaml(schema, path, args.overrides), end="")
        except RsdiffError as exc:
            print(f"rsdiff {name}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_loggers()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    uninstall = interrupts.install()  # a Ctrl-C Python drops (Ray forking) still stops the job
    cfg = None
    try:
        path = preset(name, args.config) if args.config is not None else None
        cfg = load_config(schema, path, args.overrides)
        run(cfg)
    except RsdiffError as exc:
        print(f"rsdiff {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through Terminated
        signum = exc.signum if isinstance(exc, Terminated) else _received[-1] if _received else signal.SIGINT
        kept = getattr(exc, "kept", None) or KEPT[name]  # a stage may say exactly what it kept
        print(f"rsdiff {name}: stopped by {signal.Signals(signum).name}; {kept}", file=sys.stderr)
        return 128 + int(signum)
    except OSError as exc:
        message = describe_os_error(exc, _output_of(cfg))
        if message is None:
            raise
        print(f"rsdiff {name}: error: {message}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        uninstall()
    return 0
