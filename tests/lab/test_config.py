"""Configs: typed overrides, their errors, TOML files, and the JSON round trip."""

from __future__ import annotations

import re
import warnings

import pytest

from normlab.lab.config import (
    ConfigError,
    ExperimentConfig,
    OverrideWarning,
    apply_overrides,
    arm_config,
    check_user_overrides,
    config_from_dict,
    config_to_dict,
    grid_points,
    load_toml_overrides,
    parse_set,
    valid_keys,
)
from normlab.lab.experiments.registry import get_experiment


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


# --------------------------------------------------------------------------------------------
# Issue 11, item 8: a user override that every arm (or the grid) sets would be ignored
# --------------------------------------------------------------------------------------------


def user_set(experiment: str, item: str) -> tuple[ExperimentConfig, dict[str, str]]:
    """The experiment's config with ``--set item`` applied, and the keys given, as the CLI passes them."""
    sets = parse_set([item])
    config = apply_overrides(get_experiment(experiment).default_config(), sets)
    return config, {key: f"--set {key}={value}" for key, value in sets.items()}


def jobs_values(config: ExperimentConfig, key: str) -> set:
    """What every job (arm x grid point) trains with for ``key``: the oracle of 'ignored'."""
    section, name = key.split(".", 1)
    return {getattr(getattr(arm_config(config, arm, point), section), name)
            for point in grid_points(config) for arm in config.arms}


def test_set_key_that_every_arm_overrides_is_rejected():
    config, given = user_set("ioffe2015-mnist", "model.norm=group")
    assert "group" not in jobs_values(config, "model.norm")  # the premise: no job would see it
    with pytest.raises(ConfigError, match=(
        r"^--set model.norm=group would be ignored: every arm of experiment 'ioffe2015-mnist' sets model.norm "
        r"itself \(none: 'none', batch: 'batch'\), so no job would train with 'group' while config.json "
        r"recorded it\. To compare other values, define the arms in a file, normlab run ioffe2015-mnist "
        r"--config FILE.toml with \[arms.mine\] \"model.norm\" = \"group\" .*or override a key the arms "
        r"leave alone \(they set: model.norm\)\.$")):
        check_user_overrides(config, given)


def test_set_key_that_every_arm_overrides_fix_in_the_message_works(tmp_path):
    """The TOML the message suggests, given as --config, trains an arm with the value."""
    config, given = user_set("ioffe2015-mnist", "model.norm=group")
    with pytest.raises(ConfigError) as err:
        check_user_overrides(config, given)
    snippet = re.search(r"with (\[arms\.mine\] .*?) \(it replaces", str(err.value)).group(1)
    path = tmp_path / "arms.toml"
    path.write_text(snippet.replace("] ", "]\n", 1) + "\n")
    base = get_experiment("ioffe2015-mnist").default_config()
    base.arms = load_toml_overrides(path)["__arms__"]
    assert jobs_values(base, "model.norm") == {"group"}
    check_user_overrides(base, {})  # nothing given: nothing to reject


def test_set_key_that_is_a_grid_axis_is_rejected():
    config, given = user_set("lr-sensitivity", "train.lr=0.05")
    assert 0.05 not in jobs_values(config, "train.lr")
    with pytest.raises(ConfigError, match=(
        r"^--set train.lr=0.05 would be ignored: train.lr is a grid axis of experiment 'lr-sensitivity' "
        r"\(values \[0.0001, .*, \.\.\.\]\), and every job trains at one of the grid's values, so none would "
        r"use 0.05 .*--config FILE.toml with \[grid\] \"train.lr\" = \[0.05\] .*\(the grid sets: train.lr\)\.$")):
        check_user_overrides(config, given)


def test_set_key_that_some_arms_override_warns_and_reaches_the_others():
    config, given = user_set("placement", "model.placement=after")
    with pytest.warns(OverrideWarning, match=(
            r"--set model.placement=after reaches only arm\(s\) none of experiment 'placement'; the others set "
            r"model.placement themselves \(before: 'before', after: 'after'\) and keep their own value")):
        check_user_overrides(config, given)
    assert arm_config(config, "none", {"model.activation": "relu"}).model.placement == "after"
    assert arm_config(config, "before", {"model.activation": "relu"}).model.placement == "before"


def test_set_key_no_arm_or_axis_sets_passes_silently():
    config, given = user_set("ioffe2015-mnist", "train.lr=0.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_user_overrides(config, given)
    assert jobs_values(config, "train.lr") == {0.3}


def test_check_user_overrides_takes_plain_keys_and_params():
    config = ExperimentConfig(experiment="demo", arms={"a": {"params.target": 0.5}}, params={"target": 0.9})
    with pytest.raises(ConfigError, match=r"^the override params.target would be ignored: every arm of experiment "
                                          r"'demo' sets params.target itself \(a: 0.5\)"):
        check_user_overrides(config, ["params.target"])


def test_set_key_the_experiment_derives_is_rejected():
    cfg = ExperimentConfig(experiment="demo", arms={"a": {}, "b": {}})
    derived = {"train.lr": "lr = 0.1 * batch_size / 32 (Wu & He's rule)"}
    with pytest.raises(ConfigError, match=r"--set train.lr=0.5 would be ignored: experiment 'demo' derives train.lr "
                                          r"in every job \(lr = 0.1 \* batch_size / 32 \(Wu & He's rule\)\)"):
        check_user_overrides(apply_overrides(cfg, {"train.lr": "0.5"}), {"train.lr": "--set train.lr=0.5"}, derived)
    check_user_overrides(apply_overrides(cfg, {"train.steps": "5"}), {"train.steps": "--set train.steps=5"}, derived)
