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


def describe_os_error(exc: BaseException, output: str | None = None) -> str | None:
    """One line for an OS error a user can fix (full disk, no permission), else None (a bug).

    Looks through a Ray task error to the OS error that caused it. A full disk names the file
    being written and the file system holding it, or, when the error carries no path, the file
    system holding ``output`` (where the job writes).
    """
    import errno

    cause = getattr(exc, "cause", None)
    if isinstance(cause, OSError):
        exc = cause
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    code = errno.errorcode.get(exc.errno, "")
    if code in _DISK_FULL:
        if exc.filename:
            where = f" writing {exc.filename}{_filesystem_of(str(exc.filename))}"
        else:
            where = (
                f" writing under {output}{_filesystem_of(output)}" if output and "://" not in output else ""
            )
        return f"{_DISK_FULL[code]}{where}; free space there or point the output elsewhere"
    if code in _DENIED:
        what = exc.filename or "a file it needs"
        return f"{_DENIED[code]} on {what}; fix its permissions or pick another path"
    return None


def _filesystem_of(path: str) -> str:
    """`` (the file system mounted at /data, 1.2 GB free)`` for the device holding ``path`` (a
    temporary staging file names its folder, not the device that is full), or nothing."""
    import os
    import shutil

    try:
        mount = os.path.abspath(path)
        while not os.path.ismount(mount):
            mount = os.path.dirname(mount)
        free = shutil.disk_usage(mount).free
    except OSError:
        return ""
    return f" (the file system mounted at {mount}, {free / 1e9:.1f} GB free)"
