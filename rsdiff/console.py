"""What a job prints: rsdiff's own lines first.

Ray and MLflow narrate their internals at INFO on the console: Ray Data's execution plan and its
progress log (every 10 s, a dozen lines each), Ray Train's resource requests, worker-group start
and per-checkpoint notices, Tune's status tables, MLflow's schema migration of a new store, Ray's
token-auth notice for a local cluster. rsdiff prints what a user needs of these itself (a bar per
stage, a step line with an ETA, a ranked trial table), so their INFO records stay in Ray's session
log files (``/tmp/ray/session_latest/logs``) and only their warnings and errors reach the console.

Each switch here is one of the libraries' public settings (a logger level, ``DataContext``,
``RunConfig(verbose=...)``, Ray Train's ``LoggingConfig``) except where noted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

# Loggers whose INFO records are chatter on a job's console (warnings and errors still show).
QUIET_LOGGERS = (
    "botocore", "boto3", "urllib3", "s3transfer",
    "ray.tune",  # "Wrote the latest version of all result files ..." after every sweep
    "mlflow.store.db.utils", "alembic",  # "Creating initial MLflow database tables..."
)  # fmt: skip

# Ray Train's console level for its own ``ray.train`` records in the controller and the ranks
# (resource requests, "Checkpoint successfully created", "Reporting training result", "Moving
# model to device"); its system log files keep every level.
TRAIN_LOG_LEVEL = "WARNING"

# Tune's own output: 0 = no status tables, trial config boxes or TensorBoard hint (the sweep
# prints its ranked trials itself). Tune's newer output engine prints its experiment box, results
# path and TensorBoard hint even at 0, so a sweep runs Tune under its classic engine
# (``RAY_AIR_NEW_OUTPUT=0``, Tune's documented switch), silent at 0: see :func:`silent_tune`.
TUNE_VERBOSITY = 0

AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Data warns on the console, on every run, that a map stage reserving CPUs and GPUs both is
# "experimental". Extraction's GPU actors reserve both on purpose (each decodes and normalises its
# tiles on the CPU, and Ray Data would reserve one CPU for a GPU stage anyway), so the line says
# nothing a user can act on; Ray Data's session log file keeps it.
GPU_STAGE_NOTICE = "Specifying both num_cpus and num_gpus for map tasks is experimental"


class _WithoutNotice(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_library_loggers() -> None:
    """Raise :data:`QUIET_LOGGERS` to WARNING (a job calls this once, after configuring logging)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def train_logging_config() -> Any:
    """Ray Train's ``LoggingConfig`` at :data:`TRAIN_LOG_LEVEL` (for ``RunConfig(logging_config=)``)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=TRAIN_LOG_LEVEL)


def quiet_ray_data() -> None:
    """No Ray Data progress on the console (extract shows rsdiff's own bar), its console handler
    at WARNING and without :data:`GPU_STAGE_NOTICE`; ``ray-data.log`` in the session's log folder
    keeps every record.

    Ray Data configures its loggers when ``ray.data`` is imported, so this runs after that. The
    one-time "Progress bars disabled" warning it would print for the setting made here is marked
    as already said (``ray.util.debug.log_once``, by its key in Ray's source: if the key moves,
    that one line shows again, nothing else changes).
    """
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)  # the console (its session file handler is not a stream)
            if not any(isinstance(f, _WithoutNotice) for f in handler.filters):
                handler.addFilter(_WithoutNotice(GPU_STAGE_NOTICE))


@contextlib.contextmanager
def no_token_auth_notice() -> Iterator[None]:
    """Around ``ray.init`` of a local cluster: Ray enables token authentication for it (kept) and
    warns that it did, on every start; that warning is not shown. Its warning that a cluster runs
    *without* authentication is a different path and is never hidden."""
    logger = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def silent_tune() -> Iterator[None]:
    """Around ``Tuner.fit()``: Tune's classic output engine, which prints nothing at
    :data:`TUNE_VERBOSITY` (a user's own ``RAY_AIR_NEW_OUTPUT`` is respected)."""
    import os

    if "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def quiet_train_rank() -> None:
    """In a Ray Train rank, first thing: its "Reporting training result N: TrainingReport(...)"
    line per checkpoint comes from a logger named after its source file, outside ``ray.train``, so
    :func:`train_logging_config` misses it; that logger goes to WARNING too. (A private module
    path: if it moves, the line shows again, nothing else changes.)"""
    with contextlib.suppress(Exception):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
