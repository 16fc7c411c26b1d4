"""Structured configs: presets, dotlist overrides, and one clear error per bad key/value."""

import re
from pathlib import Path

import pytest

from rsdiff.config import build, flatten, load_config, load_section, preset, redact, to_container
from rsdiff.data.classmap import MaskKind, UnknownPolicy
from rsdiff.data.ingest_config import IngestConfig
from rsdiff.data.labels import ClassConfig, LabelConfig
from rsdiff.errors import ConfigError
from rsdiff.ray_config import RayConfig

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DUBAI_PRESET = REPO / "configs" / "ingest" / "dubai.yaml"


def test_preset_and_overrides_merge_over_defaults():
    cfg = load_config(
        IngestConfig, DUBAI_PRESET, ["inputs=[a/*.jpg]", "tile_size=128", "labels.unknown=error"]
    )
    assert cfg.tile_size == 128
    assert list(cfg.inputs) == ["a/*.jpg"]
    assert cfg.labels.unknown.value == "error"
    assert [c.name for c in cfg.labels.classes][:2] == ["building", "land"]
    assert cfg.shard_max_mb == 256  # from the preset
    assert cfg.split_seed == 0  # schema default


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["inputs=[x]", "tile_sise=128"], "unknown config key 'tile_sise'"),
        (["inputs=[x]", "labels.colour_map=1"], "unknown config key 'labels.colour_map'"),
        (["inputs=[x]", "tile_size=big"], "bad value for config key 'tile_size'"),
        (["inputs=[x]", "labels.unknown=skip"], "bad value for config key 'labels.unknown'"),
        (["tile_size=64"], "['inputs'] must be set"),
        (["inputs"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, None, overrides)
    assert needle in str(err.value)


def test_unknown_key_lists_valid_neighbours():
    with pytest.raises(ConfigError, match=r"valid keys at that level:.*mask_template"):
        load_config(IngestConfig, None, ["inputs=[x]", "labels.mask=1"])


def test_missing_and_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(IngestConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a\n  tile_size: : 3")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(IngestConfig, bad)


def test_unparseable_override_is_named_on_one_line_with_the_quoting_fix():
    bad = "inputs=[scenes/s_0[1-4].tif]"  # YAML reads the glob's brackets as a nested list
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, None, ["tile_size=64", bad])
    message = str(err.value)
    assert message.startswith(f"cannot parse override {bad}:") and "\n" not in message
    assert "quote" in message and "tile_size" not in message
    cfg = load_config(IngestConfig, None, ["tile_size=64", "inputs=['scenes/s_0[1-4].tif']"])
    assert list(cfg.inputs) == ["scenes/s_0[1-4].tif"]


def test_configs_are_real_dataclass_instances():
    cfg = load_config(IngestConfig, DUBAI_PRESET, ["inputs=[a/*.jpg]"])
    assert type(cfg) is IngestConfig and type(cfg.labels) is LabelConfig and type(cfg.ray) is RayConfig
    assert type(cfg.labels.classes[0]) is ClassConfig and type(cfg.inputs) is list
    assert cfg.labels.kind is MaskKind.colour


def test_build_merges_typed_layers_and_checks_them_like_overrides():
    base = load_config(IngestConfig, DUBAI_PRESET, ["inputs=[a/*.jpg]"])
    cfg = build(IngestConfig, base, {"tile_size": 32, "labels": {"unknown": "error"}})
    assert cfg.tile_size == 32 and cfg.labels.unknown is UnknownPolicy.error
    assert cfg.labels.classes == base.labels.classes and base.tile_size != 32  # base untouched
    with pytest.raises(ConfigError, match="unknown config key 'tile_sise'"):
        build(IngestConfig, base, {"tile_sise": 32})
    with pytest.raises(ConfigError, match="bad value for config key 'tile_size'"):
        build(IngestConfig, base, {"tile_size": "big"})


def test_presets_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = preset("pretrain", "tiny")
    assert tiny.read_text() == (REPO / "configs" / "pretrain" / "tiny.yaml").read_text()
    assert preset("pretrain", "configs/pretrain/adm256.yaml").name == "adm256.yaml"
    assert preset("demo", "ingest/dubai").name == "dubai.yaml"
    with pytest.raises(
        ConfigError, match=r"neither a file nor a preset of sweep; its presets: \['tiny', 'tiny-grid'\]"
    ):
        preset("sweep", "huge")


def test_secrets_are_redacted_and_flattened():
    data = {"s3": {"aws_secret_access_key": "abc", "endpoint": "http://x"}, "mlflow_token": "t", "lr": 1e-3}
    red = redact(data)
    assert red["s3"]["aws_secret_access_key"] == "***" and red["mlflow_token"] == "***"
    assert flatten(red) == {
        "s3.aws_secret_access_key": "***",
        "s3.endpoint": "http://x",
        "mlflow_token": "***",
        "lr": 1e-3,
    }
    assert to_container(load_config(IngestConfig, None, ["inputs=[x]"]))["labels"]["kind"] == "colour"


def test_a_section_of_a_preset_loads_as_its_own_schema(tmp_path):
    labels = load_section(LabelConfig, DUBAI_PRESET, "labels")
    assert type(labels) is LabelConfig and labels.kind is MaskKind.colour
    assert [c.name for c in labels.classes][:2] == ["building", "land"]
    with pytest.raises(ConfigError, match="has no `ray` section"):
        load_section(RayConfig, DUBAI_PRESET, "ray")
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {kind: colour, colours: 3}")
    with pytest.raises(ConfigError, match="unknown config key 'colours'"):
        load_section(LabelConfig, bad, "labels")


def test_build_takes_a_preset_whose_required_keys_a_later_layer_sets():
    from rsdiff.features.config import ExtractConfig

    cfg = build(ExtractConfig, preset("extract", "tiny"), {"checkpoint": "runs/ckpt", "timesteps": [5]})
    assert type(cfg) is ExtractConfig and cfg.checkpoint == "runs/ckpt" and cfg.timesteps == [5]
    with pytest.raises(ConfigError, match=r"\['checkpoint'\] must be set"):
        build(ExtractConfig, preset("extract", "tiny"))


def _bounded_keys(schema: type, prefix: str = "") -> list[tuple[str, dict]]:
    """``(dotted key, bounds)`` of every range-declared field of ``schema`` and its sections."""
    import dataclasses
    import typing

    found = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if "range" in f.metadata:
            found.append((f"{prefix}{f.name}", f.metadata["range"]))
        if dataclasses.is_dataclass(hints[f.name]):
            found += _bounded_keys(hints[f.name], f"{prefix}{f.name}.")
    return found


def _required(schema: type) -> dict:
    """A placeholder for every key ``schema`` requires (``x``, or ``[x]`` for a list)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    return {k: ["x"] if OmegaConf.is_list(node._get_node(k)) else "x" for k in OmegaConf.missing_keys(node)}


def _just_outside(bounds: dict) -> float:
    if bounds["gt"] is not None:
        return bounds["gt"]
    if bounds["ge"] is not None:
        return bounds["ge"] - 1
    return (bounds["lt"] if bounds["lt"] is not None else bounds["le"]) + 1


@pytest.mark.parametrize(
    "schema",
    ["rsdiff.train.config:PretrainConfig", "rsdiff.data.ingest_config:IngestConfig",
     "rsdiff.features.config:ExtractConfig", "rsdiff.sweep.config:SweepConfig",
     "rsdiff.prediction.config:PredictConfig", "rsdiff.suggest.config:SuggestConfig",
     "rsdiff.label_efficiency:LabelEfficiencyConfig", "rsdiff.sample:SampleConfig"],
)  # fmt: skip
def test_every_declared_range_is_checked_by_one_walker_naming_the_key(schema):
    """Ranges live with the fields they guard; one walker checks them all, sections included (the
    scratch UNet's, a sweep's head, the table cache), in the same words for every stage."""
    import importlib

    from rsdiff.config import check_ranges

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    keys = _bounded_keys(cls)
    assert keys
    for key, bounds in keys:
        cfg = build(cls, _required(cls))
        *path, leaf = key.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        bad = _just_outside(bounds)
        setattr(section, leaf, [bad] if isinstance(getattr(section, leaf), list) else bad)
        shown = f"{key}[0]={bad}" if isinstance(getattr(section, leaf), list) else f"{key}={bad}"
        with pytest.raises(ConfigError, match=re.escape(f"{shown} is out of range")):
            check_ranges(cfg)


def test_the_scratch_unet_and_feature_heads_read_their_numbers_like_every_stage():
    from rsdiff.heads.config import HeadConfig
    from rsdiff.label_efficiency import LabelEfficiencyConfig, _check

    with pytest.raises(ConfigError, match=r"unet\.base_channels=0 is out of range"):
        _check(build(LabelEfficiencyConfig, {"features": "x", "unet": {"base_channels": 0}}))
    from rsdiff.config import check_ranges

    with pytest.raises(ConfigError, match=r"head\.depth=0 is out of range"):
        check_ranges(build(HeadConfig, {"depth": 0}), "head.")
