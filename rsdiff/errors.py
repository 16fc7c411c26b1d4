"""User-facing errors.

Every entry point validates early and raises a subclass of :class:`RsdiffError` whose message
names the bad thing and how to fix it. Job scripts print that message and exit non-zero; any
other exception is a bug in rsdiff.
"""


class RsdiffError(Exception):
    """Base class: a problem with the user's input, config or environment."""


class ConfigError(RsdiffError):
    """An unknown key, a wrong type or an invalid value in a config."""


class StorageError(RsdiffError):
    """A URI that cannot be read or written: missing bucket/key, denied access, unreachable store."""


class DataError(RsdiffError):
    """Bad input data: unreadable raster, mismatched mask, empty scene, corrupt shard, ..."""


class CheckpointError(RsdiffError):
    """A checkpoint URI that is missing or does not hold an rsdiff checkpoint."""


class ClusterError(RsdiffError):
    """The Ray cluster cannot run the job as configured: no node (type) can hold a worker, workers
    not placed in time, or storage the worker nodes cannot all see."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received: stop like Ctrl-C does (the job scripts install the handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


_DISK_FULL = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded"}
_DENIED = {
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EROFS": "read-only file system",
}


def describe_os_error(exc: BaseException) -> str | None:
    """One line for an OS error a user can fix (full disk, no permission), else None (a bug).

    Looks through a Ray task error to the OS error that caused it.
    """
    import errno

    cause = getattr(exc, "cause", None)
    if isinstance(cause, OSError):
        exc = cause
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    code = errno.errorcode.get(exc.errno, "")
    where = f" writing {exc.filename}" if exc.filename else ""
    if code in _DISK_FULL:
        return f"{_DISK_FULL[code]}{where}; free space there or point the output elsewhere"
    if code in _DENIED:
        what = exc.filename or "a file it needs"
        return f"{_DENIED[code]} on {what}; fix its permissions or pick another path"
    return None
