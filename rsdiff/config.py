"""Structured configs: dataclass schemas + YAML presets + CLI dotlist overrides.

Each job declares a dataclass schema (``IngestConfig``, ``PretrainConfig``, ...). A run's config
is ``schema defaults <- YAML preset <- dotlist overrides``, merged and checked by OmegaConf (a
misspelt key or a wrong type is an error that names the key) and returned as a real instance of the
schema: library code reads typed attributes, never string keys. :func:`build` does the same for a
config stored as JSON (head artifacts, checkpoint sidecars) or composed in code (the demo).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rsdiff.errors import ConfigError
from rsdiff.redaction import REDACTED, redact_uri

T = TypeVar("T")

# Keys whose values never leave the process (MLflow params, logs, checkpoints).
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key|session_key)", re.IGNORECASE)


def _override_error(overrides: list[str], exc: Exception) -> ConfigError:
    """One line naming the override YAML cannot read, with the usual fix (quoting)."""
    bad = overrides
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError):
            bad = [item]
            break
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return ConfigError(
        f"cannot parse override {bad[0] if len(bad) == 1 else bad}: {problem}; values are YAML, so quote "
        "one that holds [ ] { } , : or # (e.g. inputs=['scenes/s_0[1-4].tif'] or name='a: b')"
    )


def _quote_template(item: str) -> str:
    """``key={dir}/x.png`` is not YAML (a ``{`` opens a mapping): pass such values as plain strings."""
    import yaml

    key, _, value = item.partition("=")
    if not value.startswith("{"):
        return item
    try:
        yaml.safe_load(value)
        return item
    except yaml.YAMLError:
        return f"{key}='{value.replace(chr(39), chr(39) * 2)}'"


PRESETS = "rsdiff.configs"  # the repository's configs/ folder, shipped inside the package


def preset(job: str, given: str | Path) -> Path:
    """The YAML file ``given`` names for ``job``: an existing file as is, else a preset shipped with
    rsdiff, by name (``tiny``), by ``<job>/<name>`` or by its repository path
    (``configs/pretrain/tiny.yaml``), so presets work from any folder and from a non-editable
    install.

    Raises:
        ConfigError: neither a file nor a preset; the message lists the job's presets.
    """
    from importlib.resources import files

    p = Path(given)
    if p.is_file():
        return p
    parts = list(p.with_suffix("").parts if p.suffix in (".yaml", ".yml") else p.parts)
    if parts[:1] == ["configs"]:
        parts = parts[1:]
    if len(parts) == 1:
        parts = [job, parts[0]]
    root = files(PRESETS)
    if len(parts) == 2 and root.joinpath(parts[0], f"{parts[1]}.yaml").is_file():
        return Path(str(root.joinpath(parts[0], f"{parts[1]}.yaml")))
    names = preset_names(job)
    raise ConfigError(
        f"config {str(given)!r} is neither a file nor a preset of {job}; its presets: {names} "
        f"(e.g. --config {names[0] if names else 'PATH.yaml'})"
    )


def load_config(schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build a config object of type ``schema``.

    Args:
        schema: the job's dataclass schema.
        path: optional YAML file merged over the schema's defaults (see :func:`preset` to find a
            shipped preset by name).
        overrides: dotlist entries such as ``tile_size=256`` or ``data.batch_size=8``.

    Returns:
        An instance of ``schema`` (nested dataclasses, enums as enum members, lists as lists).

    Raises:
        ConfigError: unknown key, wrong type, invalid enum value, unreadable YAML, malformed override.
    """
    return _merge(schema, *_layers(path, overrides, schema))


def _layers(path: str | Path | None, overrides: Iterable[str], schema: type) -> tuple[list[Any], str]:
    """The YAML file (if any) and the overrides as OmegaConf layers, and where they came from (for
    error messages)."""
    layers: list[Any] = [] if path is None else [_read_yaml(path)]
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. {example_override(schema)})"
            )
    overrides = [_quote_template(o) for o in overrides]
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(overrides))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise _override_error(overrides, exc) from exc
    where = (
        " + ".join(([str(path)] if path is not None else []) + (["overrides"] if overrides else []))
        or "defaults"
    )
    return layers, where


def preview_yaml(schema: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> str:
    """What :func:`load_config` would build, as YAML with secrets redacted, even while required keys
    are unset: those show as ``???`` (``--print-config`` before the required keys are given).

    Raises:
        ConfigError: as :func:`load_config`, except for unset required keys.
    """
    node = _merged_node(schema, *_layers(path, overrides, schema))
    plain = OmegaConf.to_container(node, resolve=False, enum_to_str=True, throw_on_missing=False)
    plain = _rename_keys(plain, {v: k for k, v in KEYWORD_KEYS.items()})
    return OmegaConf.to_yaml(OmegaConf.create(redact(plain)))


def preset_names(job: str) -> list[str]:
    """Names of the presets shipped for ``job`` (``--config NAME``), sorted."""
    from importlib.resources import files

    folder = files(PRESETS).joinpath(job)
    found = folder.iterdir() if folder.is_dir() else []
    return sorted(f.name[:-5] for f in found if f.name.endswith(".yaml"))


def sections(schema: type) -> list[tuple[str, str]]:
    """``(key, what it is)`` for each top-level field of a job schema: a nested config's first
    docstring line, or a plain field's type and default (for ``--help``)."""
    out = []
    for f in dataclasses.fields(schema):
        key = {v: k for k, v in KEYWORD_KEYS.items()}.get(f.name, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            doc = " ".join((type(default).__doc__ or type(default).__name__).strip().split("\n\n")[0].split())
            out.append((f"{key}.*", doc))
        else:
            shown = "required" if default == "???" else f"default {_show(default)}"
            out.append((key, f"{_type_name(f.type)}, {shown}"))
    return out


def _show(value: Any) -> str:
    return "null" if value is None else str(value.value if hasattr(value, "value") else value)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _read_yaml(path: str | Path) -> Any:
    """The YAML file ``path`` as an OmegaConf node; one clear error when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file or a preset name")
    try:
        return OmegaConf.load(p)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc


def load_section(schema: type[T], path: str | Path, key: str) -> T:
    """The ``key`` section of the YAML file ``path`` as an instance of ``schema`` (e.g. the
    ``labels`` of an ingest preset), checked like :func:`load_config`.

    Raises:
        ConfigError: unreadable file, no such section, or a bad key or value in it.
    """
    data = _read_yaml(path)
    if not isinstance(data, DictConfig) or key not in data:
        raise ConfigError(f"config file {str(path)!r} has no `{key}` section")
    return _merge(schema, [data[key]], f"{path}: {key}")


def build(schema: type[T], *layers: Any) -> T:
    """An instance of ``schema`` from its defaults with ``layers`` merged over them in order.

    A layer is a mapping (e.g. a config read back from JSON, or ``{"seed": 3}``), a dataclass
    instance, or the :class:`~pathlib.Path` of a YAML file (a preset, see :func:`preset`). Keys a
    layer leaves unset may be set by a later one; the same checks as :func:`load_config` apply to
    the result: an unknown key, a wrong type or a key left unset raises :class:`ConfigError`.
    """
    return _merge(schema, [_as_layer(x) for x in layers], "given values")


def _as_layer(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return OmegaConf.structured(obj)
    return _read_yaml(obj) if isinstance(obj, Path) else obj


# Config keys that are Python keywords: a dataclass field cannot be named ``from``, so the schema
# says ``from_`` and configs, overrides and everything written back say ``from`` (``init.from=...``).
KEYWORD_KEYS = {"from": "from_"}


def _rename_keys(obj: Any, names: Mapping[str, str]) -> Any:
    if isinstance(obj, Mapping):
        return {names.get(k, k) if isinstance(k, str) else k: _rename_keys(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename_keys(v, names) for v in obj]
    return obj


def _has_key(obj: Any, keys: Iterable[str]) -> bool:
    if isinstance(obj, Mapping):
        return any(k in keys or _has_key(v, keys) for k, v in obj.items())
    return isinstance(obj, list) and any(_has_key(v, keys) for v in obj)


def _keyword_layer(layer: Any) -> Any:
    """``layer`` with keyword keys (``from``) renamed to the schema's field names (``from_``)."""
    if isinstance(layer, DictConfig):
        plain = OmegaConf.to_container(layer, resolve=False)
        return OmegaConf.create(_rename_keys(plain, KEYWORD_KEYS)) if _has_key(plain, KEYWORD_KEYS) else layer
    if isinstance(layer, Mapping) and _has_key(layer, KEYWORD_KEYS):
        return _rename_keys(layer, KEYWORD_KEYS)
    return layer


def _merge(schema: type[T], layers: list[Any], where: str) -> T:
    merged = _merged_node(schema, layers, where)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"config key(s) {missing} must be set (in the YAML preset or as key=value overrides)"
        )
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


@functools.cache
def _schema_node(schema: type) -> DictConfig:
    """``schema``'s defaults as a structured node, built once per schema (building one reads the
    dataclasses' type hints: about 20 ms, five times a copy). Never mutated: ``OmegaConf.merge``
    copies its first argument."""
    return OmegaConf.structured(schema)


def _merged_node(schema: type, layers: list[Any], where: str) -> DictConfig:
    """``layers`` merged over ``schema``'s defaults and checked (keys, types), required keys may
    still be ``???``."""
    base = _schema_node(schema)
    layers = [_keyword_layer(x) for x in layers]
    try:
        merged = OmegaConf.merge(base, *layers)
        OmegaConf.resolve(merged)
    except ConfigKeyError as exc:
        valid = _valid_keys(base, str(exc.full_key))
        raise ConfigError(
            f"unknown config key {exc.full_key!r} (in {where}); {_did_you_mean(str(exc.full_key), valid)}"
            f"valid keys at that level: {valid}"
        ) from exc
    except ValidationError as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for config key {exc.full_key!r} (in {where}): {msg}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config ({where}): {str(exc).splitlines()[0]}") from exc
    return merged


# Names other tools use for a key rsdiff calls otherwise (what a "did you mean" offers).
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "batchsize": "batch_size",
            "bs": "batch_size", "steps": "max_steps", "num_steps": "max_steps", "workers": "num_workers",
            "t": "timesteps", "timestep": "timesteps", "block": "blocks", "layers": "blocks"}  # fmt: skip


def _did_you_mean(full_key: str, valid: list[str]) -> str:
    """``did you mean 'x.y'? `` for the valid key nearest the unknown one, or nothing."""
    import difflib

    parent, _, leaf = full_key.rpartition(".")
    alias = _ALIASES.get(leaf.lower())
    near = [alias] if alias in valid else difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    return f"did you mean {'.'.join([*([parent] if parent else []), near[0]])!r}? " if near else ""


def example_override(schema: type) -> str:
    """An override ``schema`` accepts, for help and error texts: its shallowest numeric setting
    with its default (``tile_size=256``, ``data.batch_size=8``)."""
    level = [("", schema)]
    while level:
        sections = []
        for prefix, cls in level:
            for f in dataclasses.fields(cls):
                value = f.default
                if isinstance(value, int | float) and not isinstance(value, bool) and f.name != "seed":
                    return f"{prefix}{f.name}={value}"
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
                    f.default_factory
                ):
                    sections.append((f"{prefix}{f.name}.", f.default_factory))
        level = sections
    return "seed=0"


def _valid_keys(base: DictConfig, full_key: str) -> list[str]:
    """The keys that exist next to ``full_key`` in the schema (for error messages)."""
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(base, parent) if parent else base
    back = {v: k for k, v in KEYWORD_KEYS.items()}
    return sorted(back.get(str(k), str(k)) for k in node) if isinstance(node, DictConfig) else []


def to_container(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-ready dict copy of a config dataclass (enums as their values)."""
    if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig):
        return dict(cfg)
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    plain = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return _rename_keys(plain, {v: k for k, v in KEYWORD_KEYS.items()})  # type: ignore[return-value]


# ``scheme://user:password@host`` -> ``scheme://user:***@host`` (a password inside a URI).
def is_secret_key(key: str) -> bool:
    """Whether a config key's value is a secret (password, token, access key, ...)."""
    return bool(_SECRET_KEY.search(key))


def redact(obj: Any) -> Any:
    """Copy of a nested dict/list with values under secret-looking keys replaced by ``***`` and
    the userinfo of URIs (``http://user:pw@host``) masked (:func:`rsdiff.redaction.redact_uri`)."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_uri(obj)
    return obj


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists become their string form)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML with secrets redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(to_container(cfg))))


def require(
    key: str,
    value: float | int | None,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    """Raise :class:`ConfigError` naming ``key``, its value and the valid range unless ``value`` is a
    finite number within the bounds (``gt`` > , ``ge`` >= , ``lt`` < , ``le`` <=)."""
    import math

    lo = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else "(-inf"
    hi = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else "inf)"
    ok = isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)  # type: ignore[operator]
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)  # type: ignore[operator]
    if not ok:
        raise ConfigError(f"{key}={value} is out of range: it must be a number in {lo}, {hi}")


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A config field with its valid range declared beside it (``factory`` for a list default,
    whose every number must lie in the range). :func:`check_ranges` checks them all, so every stage
    validates the same section the same way and says it in the same words."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    return dataclasses.field(default=default, default_factory=factory, metadata={"range": bounds})


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Check every :func:`bounded` field of the dataclass ``cfg`` and of the sections inside it
    (unset optional values are not checked), naming each by its dotted key.

    Raises:
        ConfigError: the first value out of its range, as ``key=value is out of range: ...``.
    """
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        bounds = f.metadata.get("range")
        if bounds is not None and value is not None:
            if isinstance(value, list | tuple):
                for i, item in enumerate(value):
                    require(f"{key}[{i}]", item, **bounds)
            else:
                require(key, value, **bounds)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
