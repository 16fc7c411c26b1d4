"""Structured configs: presets, dotlist overrides, and one clear error per bad key/value."""

from pathlib import Path

import pytest

from rsdiff.config import flatten, load_config, redact, to_container
from rsdiff.errors import ConfigError
from rsdiff.ingest import IngestConfig

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


def test_config_is_read_only():
    cfg = load_config(IngestConfig, None, ["inputs=[x]"])
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.tile_size = 3


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
