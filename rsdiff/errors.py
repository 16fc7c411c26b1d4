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
