"""YAML presets of the jobs, shipped with the package as ``rsdiff.configs`` (see ``rsdiff.config.preset``)."""
