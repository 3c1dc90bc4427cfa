"""Configs: typed overrides, their errors, TOML files, and the JSON round trip."""

from __future__ import annotations

import pytest

from normlab.lab.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    arm_config,
    config_from_dict,
    config_to_dict,
    load_toml_overrides,
    parse_set,
    valid_keys,
)


def base() -> ExperimentConfig:
    return ExperimentConfig(experiment="demo", arms={"bn": {"model.norm": "batch"}}, params={"target": 0.9})


def test_overrides_are_parsed_and_typed():
    cfg = apply_overrides(base(), parse_set([
        "train.lr=0.25", "train.steps=10", "model.widths=[8, 4]", "data.name=digits",
        "model.init_std=none", "params.target=1", "train.device=cpu",
    ]))
    assert cfg.train.lr == 0.25 and cfg.train.steps == 10 and cfg.model.widths == [8, 4]
    assert cfg.data.name == "digits" and cfg.model.init_std is None
    assert cfg.params["target"] == 1.0 and isinstance(cfg.params["target"], float)
    assert base().train.lr != 0.25  # the original is untouched


def test_int_for_float_field_is_accepted_but_not_the_reverse():
    assert apply_overrides(base(), {"train.lr": "1"}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.steps must be int, got float 2.5"):
        apply_overrides(base(), {"train.steps": "2.5"})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("train.lrr", "0.1", r"unknown config key 'train.lrr'; valid keys are: .*train.lr,"),
        ("model.widths", "100", r"model.widths must be a list like \[100, 100\], got 100"),
        ("model.widths", "[1, 'a']", r"model.widths\[1\] must be int, got str 'a'"),
        ("train.steps", "true", r"train.steps must be int, got bool True"),
        ("train.lr", "fast", r"train.lr must be float, got str 'fast'"),
        ("params.nope", "1", r"unknown config key 'params.nope'.*params.target"),
    ],
)
def test_bad_overrides_are_rejected(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(base(), {key: value})


def test_parse_set_needs_key_value():
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE .* got 'train.lr'"):
        parse_set(["train.lr"])


def test_arm_config_applies_the_arm_and_rejects_unknown_arms():
    assert arm_config(base(), "bn").model.norm == "batch"
    with pytest.raises(ConfigError, match=r"unknown arm 'gn'; this experiment's arms are \['bn'\]"):
        arm_config(base(), "gn")


def test_json_round_trip():
    cfg = apply_overrides(base(), {"train.lr": 0.3, "model.widths": [5]})
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_config_from_dict_checks_types():
    data = config_to_dict(base())
    data["train"]["seeds"] = "three"
    with pytest.raises(ConfigError, match="train.seeds must be int"):
        config_from_dict(data)


def test_toml_file(tmp_path):
    path = tmp_path / "over.toml"
    path.write_text('[train]\nlr = 0.05\nsteps = 7\n[model]\nwidths = [3, 3]\n')
    cfg = apply_overrides(base(), load_toml_overrides(path))
    assert (cfg.train.lr, cfg.train.steps, cfg.model.widths) == (0.05, 7, [3, 3])


def test_toml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml_overrides(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml_overrides(bad)


def test_valid_keys_cover_every_section():
    keys = valid_keys(base())
    assert {"data.name", "model.norm", "train.lr", "params.target"} <= set(keys)
