"""Typed configs: YAML round-trip, key=value overrides, clear errors."""

import pytest

from patchdiffusion.config import (
    ConfigError, RunConfig, apply_overrides, load_config, parse_size, save_config, to_dict,
)


def test_yaml_round_trip(tmp_path):
    config = apply_overrides(RunConfig(), ["method=patching", "lr=3e-4", "model.net.channel_mult=[1,2]", "data.resolution=48x32"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)
    assert again.train.lr == 3e-4
    assert again.model.net.channel_mult == (1, 2)
    assert again.data.resolution == (32, 48)  # (height, width) from WxH
    assert type(again.model).__name__ == "PatchingConfig"


def test_short_keys_and_types():
    config = apply_overrides(RunConfig(), ["patch_size=4", "hflip=false", "steps=7", "batch_size=8"])
    assert config.model.net.patch_size == 4
    assert config.data.hflip is False
    assert config.train.steps == 7 and isinstance(config.train.steps, int)


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'"):
        apply_overrides(RunConfig(), ["learning_rat=1"])
    with pytest.raises(ConfigError, match="did you mean"):
        apply_overrides(RunConfig(), ["train.lrr=1"])


def test_short_key_picks_the_shallowest():
    config = apply_overrides(RunConfig(), ["resolution=48"])
    assert config.data.resolution == (48, 48)


def test_bad_values():
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(RunConfig(), ["train.steps=abc"])
    with pytest.raises(ConfigError, match="unknown method"):
        apply_overrides(RunConfig(), ["method=nope"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(RunConfig(), ["steps"])


def test_parse_size_is_height_width():
    assert parse_size("64") == (64, 64)
    assert parse_size("128x64") == (64, 128)  # WxH on the command line -> (height, width)
    assert parse_size([32, 48]) == (32, 48)  # a pair is (height, width), as config.yaml stores it
    for bad in ("abc", "0x4", "-8", "4x4x4", "2.5"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
