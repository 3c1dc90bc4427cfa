"""Typed experiment configurations: defaults in code, overrides from TOML files and ``--set``.

A config is four dataclasses (data, model, training, and the experiment around them). An
experiment's *arms* are named sets of overrides applied on top of the base config (e.g.
``{"batch": {"model.norm": "batch"}}``). Overrides are dotted keys (``train.lr``), type-checked
against the field they set; an unknown key is rejected with the list of valid ones. The resolved
config is saved as ``config.json`` in every run folder and is enough to rebuild the report.

Precedence, lowest first: the experiment's config, the user's overrides (``--config`` file,
flags, ``--set``), a grid point's values, an arm's overrides. So a user's value for a key that
every arm sets, or that is a grid axis, would reach no job while ``config.json`` recorded it:
:func:`check_user_overrides` rejects such keys (``ConfigError`` naming the arms and what each
sets, or the grid axis and its values, and how to get what was likely meant). A key that only
some arms set reaches the others, which is how a baseline arm is changed; that is allowed with a
:class:`OverrideWarning` naming the arms that keep their own value.

>>> from normlab.lab.config import ExperimentConfig, apply_overrides
>>> cfg = apply_overrides(ExperimentConfig(experiment="demo"), {"train.lr": "0.5", "model.widths": "[50, 50]"})
>>> cfg.train.lr, cfg.model.widths
(0.5, [50, 50])
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ExperimentConfig",
    "ConfigError",
    "OverrideWarning",
    "apply_overrides",
    "arm_config",
    "check_grid",
    "check_user_overrides",
    "check_values",
    "grid_points",
    "point_config",
    "config_from_dict",
    "config_to_dict",
    "load_toml_overrides",
    "parse_set",
    "valid_keys",
]


class ConfigError(ValueError):
    """A bad override or config file: the message says which key, what was given and what is valid."""


class OverrideWarning(UserWarning):
    """A user's override reaches only some arms: the others set the key themselves."""


@dataclass
class DataConfig:
    name: str = "mnist-5k"  # a data set of normlab.lab.data.dataset_names(); embedded ones need no files
    data_dir: str | None = None  # folder holding the standard files of mnist / fashion-mnist / cifar10
    test_fraction: float = 0.2  # share of an embedded data set held out for testing
    split_seed: int = 0  # fixes the train/test split of embedded sets, the same for every run seed
    limit: int | None = None  # keep only the first `limit` training samples (None: all)
    # Random shifts/rotations of every training batch, seeded by (seed, step) (normlab.lab.augment):
    # "none", "shift", "rotate" or "shift+rotate"; the largest shift as a fraction of the image
    # side, and the largest rotation in degrees.
    augment: str = "none"
    augment_shift: float = 0.1
    augment_degrees: float = 15.0


@dataclass
class ModelConfig:
    kind: str = "mlp"  # "mlp" (flattens its input), "cnn" (conv blocks, then global pooling) or "lstm" (reads rows)
    widths: list[int] = field(default_factory=lambda: [100, 100, 100])  # hidden widths / conv channels
    activation: str = "sigmoid"  # sigmoid | tanh | relu | leaky_relu | elu | silu | gelu
    norm: str = "none"  # a normlab.get_norm name, or "none"; arms usually set this
    placement: str = "before"  # norm "before" the activation (Ioffe & Szegedy) or "after" it
    dropout: float = 0.0  # dropout probability after each hidden block
    dropout_position: str = "block"  # where dropout goes: "block" (end of every block), "before_norm" (right before every norm), "head" (once, before the output layer)
    init_std: float | None = None  # std of a Gaussian weight init with zero biases; None: torch's default
    init_gain: float | None = None  # Gaussian init with std = gain / sqrt(fan_in), zero biases (He: 2**0.5); overrides init_std
    # kind "lstm" only (checked by models.check_model_config): how an image (C, H, W) becomes a
    # sequence: "rows" (H steps of C*W features, row by row) or "permuted" (its pixels in a fixed
    # order drawn from permute_seed, then cut into H steps), as in sequential / permuted MNIST.
    sequence: str = "rows"
    permute_seed: int = 0  # the seed of the "permuted" order (one order for every arm and run seed)
    # Santurkar et al.'s "noisy BN": after each norm, a shift U(-s, s) and scale U(1, 1+s) per unit,
    # drawn anew at every training step (normlab.lab.noise.StepNoise); 0: none. Needs a norm.
    norm_noise: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 3000  # optimizer steps per arm and seed
    batch_size: int = 60  # examples per step (Ioffe & Szegedy's MNIST experiment used 60)
    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.5  # learning rate
    momentum: float = 0.0  # SGD momentum (0: plain SGD)
    weight_decay: float = 0.0  # L2 penalty through the optimizer
    # which parameters train; the rest stay frozen at their initial values (job.TRAINABLE):
    # "all", "norm" (the norms' weights and biases), "output" (the last layer), "norm+output"
    trainable: str = "all"
    seeds: int = 3  # seeds first_seed .. first_seed+seeds-1; arms share a seed's initial weights and batches
    first_seed: int = 0  # the first seed (another set of seeds checks that a verdict holds)
    eval_every: int = 50  # evaluate on the test split every this many steps (and at step 0)
    checkpoint_every: int = 500  # steps between checkpoints (a run resumes from the last one)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    sync_bn: bool = False  # under torchrun, convert batch norms to SyncBatchNorm (statistics over the global batch)
    # At each evaluation also measure loss and accuracy on the training split (eval mode, no
    # augmentation; its first 10,000 samples at most): rows get train_acc, train_eval_loss, train_test_gap.
    eval_train: bool = False


@dataclass
class ExperimentConfig:
    experiment: str  # the experiment's registry name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm name -> dotted overrides
    # Grid axes: dotted key -> values; every arm trains at every point of their product (and every seed).
    grid: dict[str, list[Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # experiment-specific knobs (e.g. target accuracy)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def valid_keys(config: ExperimentConfig) -> list[str]:
    """Every dotted key an override may set, for this config (``params.*`` depend on the experiment)."""
    keys = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"params.{k}" for k in config.params]
    return sorted(keys)


def parse_set(items: list[str]) -> dict[str, str]:
    """``["train.lr=0.1", ...]`` -> ``{"train.lr": "0.1"}``; values are typed later."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. --set train.lr=0.1), got {item!r}.")
        out[key.strip()] = value.strip()
    return out


def _parse_text(text: str, hint: Any) -> Any:
    """A command-line value as TOML would read it, given the field's type.

    Text for a str field stays as typed (``--set model.norm=none`` is the string "none");
    ``none``/``null`` is None for a field that allows None; anything else is a TOML value.
    """
    args = typing.get_args(hint)
    allows_none = type(None) in args or hint is Any
    if text.lower() in ("none", "null") and allows_none:
        return None
    if hint is str or str in args:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _field_type(config: ExperimentConfig, section: str, name: str) -> Any:
    if section == "params":
        default = config.params[name]
        return Any if default is None else type(default)
    return typing.get_type_hints(_SECTIONS[section])[name]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints pass for floats; raise ConfigError."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list like [100, 100], got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/dict, got {value!r}.")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}.")
    return value


def apply_overrides(config: ExperimentConfig, overrides: dict[str, Any], *, parse: bool = True) -> ExperimentConfig:
    """A copy of ``config`` with dotted ``overrides`` applied.

    With ``parse`` (command-line text), string values are read as TOML values where the field is
    not a string; without it (values from JSON or TOML files) they are taken as they are.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or a value of the wrong type.
    """
    config = copy.deepcopy(config)
    keys = valid_keys(config)
    for key, raw in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}; valid keys are: {', '.join(keys)}.")
        section, name = key.split(".", 1)
        hint = _field_type(config, section, name)
        value = _parse_text(raw, hint) if parse and isinstance(raw, str) else raw
        value = _coerce(value, hint, key)
        if section == "params":
            config.params[name] = value
        else:
            setattr(getattr(config, section), name, value)
    return config


def arm_config(config: ExperimentConfig, arm: str, point: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config one arm trains with at one grid point: the base config, then the point's
    values, then the arm's overrides; the result has no grid left."""
    if arm not in config.arms:
        raise ConfigError(f"unknown arm {arm!r}; this experiment's arms are {list(config.arms)}.")
    config = point_config(config, point or {})
    return apply_overrides(config, config.arms[arm])


def _value(config: ExperimentConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return config.params.get(name) if section == "params" else getattr(getattr(config, section), name, None)


def _toml(value: Any) -> str:
    """A value as TOML writes it, for the examples in messages (JSON is TOML for these types)."""
    return "VALUE" if value is None else json.dumps(value)  # TOML has no null: the user fills it in


def _short(values: list[Any], limit: int = 6) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def check_user_overrides(config: ExperimentConfig, given: Mapping[str, str] | Iterable[str],
                         derived: Mapping[str, str] | None = None) -> None:
    """Reject user overrides that no job would train with; warn about those only some arms take.

    A job's config is the user's config, then its grid point, then its arm's overrides
    (:func:`arm_config`), so the user's value of a key is ignored wherever a later step sets it:

    * a grid axis: every job sets it from the grid -> ``ConfigError``;
    * a key every arm sets -> ``ConfigError``, naming each arm and what it sets;
    * a key some arms set -> allowed (it changes the other arms, e.g. a baseline), with an
      :class:`OverrideWarning` naming the arms that keep their own value;
    * a key the experiment derives from others in every job (``derived``, its
      :attr:`~normlab.lab.experiments.base.Experiment.derived`) -> ``ConfigError`` naming the rule.

    Call it on the final config (after the user's overrides, ``--config`` arms and grid), with
    the keys the user gave.

    Args:
        config: the resolved config, arms and grid included.
        given: the user's keys, each mapped to how it was given for the message (e.g.
            ``{"model.norm": "--set model.norm=group"}``), or just the keys.
        derived: keys the experiment sets in every job by a rule, mapped to the rule in words.

    Raises:
        ConfigError: a key that is a grid axis, that every arm sets, or that the experiment derives.

    >>> arms = {"none": {"model.norm": "none"}, "bn": {"model.norm": "batch"}}
    >>> cfg = ExperimentConfig(experiment="demo", arms=arms)
    >>> given = {"train.lr": "--set train.lr=0.1"}
    >>> check_user_overrides(apply_overrides(cfg, {"train.lr": "0.1"}), given)  # no arm sets train.lr: fine
    >>> given = {"model.norm": "--set model.norm=group"}
    >>> try:
    ...     check_user_overrides(apply_overrides(cfg, {"model.norm": "group"}), given)
    ... except ConfigError as err:
    ...     print(str(err)[:122])
    --set model.norm=group would be ignored: every arm of experiment 'demo' sets model.norm itself (none: 'none', bn: 'batch')
    """
    origins = dict(given) if isinstance(given, Mapping) else {key: f"the override {key}" for key in given}
    for key, origin in origins.items():
        value = _value(config, key)
        if derived and key in derived:
            raise ConfigError(
                f"{origin} would be ignored: experiment {config.experiment!r} derives {key} in every job "
                f"({derived[key]}), so no job would train with {value!r}; change what it is derived from instead."
            )
        if key in config.grid:
            values = list(config.grid[key])
            raise ConfigError(
                f"{origin} would be ignored: {key} is a grid axis of experiment {config.experiment!r} "
                f"(values {_short(values)}), and every job trains at one of the grid's values, so none would "
                f"use {value!r} while config.json recorded it. To train at values of your choice, give the "
                f"grid in a file, normlab run {config.experiment} --config FILE.toml with "
                f"[grid] \"{key}\" = [{_toml(value)}] (it replaces the experiment's grid); or override a key that "
                f"is no grid axis (the grid sets: {', '.join(config.grid)})."
            )
        setters = {arm: body[key] for arm, body in config.arms.items() if key in body}
        if not setters:
            continue
        sets = ", ".join(f"{arm}: {v!r}" for arm, v in setters.items())
        if len(setters) == len(config.arms):
            arm_keys = sorted({k for body in config.arms.values() for k in body})
            raise ConfigError(
                f"{origin} would be ignored: every arm of experiment {config.experiment!r} sets {key} itself "
                f"({sets}), so no job would train with {value!r} while config.json recorded it. To compare "
                f"other values, define the arms in a file, normlab run {config.experiment} --config FILE.toml "
                f"with [arms.mine] \"{key}\" = {_toml(value)} (it replaces the experiment's arms), or pick an "
                f"experiment whose arms set what you want (normlab list); or override a key the arms leave "
                f"alone (they set: {', '.join(arm_keys)})."
            )
        others = [arm for arm in config.arms if arm not in setters]
        warnings.warn(
            f"{origin} reaches only arm(s) {', '.join(others)} of experiment {config.experiment!r}; "
            f"the others set {key} themselves ({sets}) and keep their own value.",
            OverrideWarning, stacklevel=2,
        )


def check_grid(config: ExperimentConfig) -> None:
    """Every grid axis is a valid dotted key with a non-empty list of values of the key's type.

    Raises:
        ConfigError: naming the axis, what it holds and what is valid.
    """
    keys = valid_keys(config)
    for key, values in config.grid.items():
        if key not in keys:
            raise ConfigError(f"unknown grid axis {key!r}; a grid axis is a config key, one of: {', '.join(keys)}.")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid axis {key!r} must be a non-empty list of values, got {values!r}.")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"grid axis {key!r} repeats a value: {values!r}; list each value once.")
        for value in values:
            apply_overrides(config, {key: value}, parse=False)


def check_values(config: ExperimentConfig) -> None:
    """The ranges the training options and numeric params must lie in (their types are checked
    by :func:`apply_overrides`); the trainer calls it on every job's config before the run
    folder is written.

    Raises:
        ConfigError: naming the key, the rule, the value received and an example of a valid one.

    >>> check_values(apply_overrides(ExperimentConfig(experiment="demo"), {"train.lr": "0.1"}))
    >>> check_values(apply_overrides(ExperimentConfig(experiment="demo"), {"train.lr": "-1"}))
    Traceback (most recent call last):
    ...
    normlab.lab.config.ConfigError: train.lr must be a finite number > 0, got -1.0 (e.g. --set train.lr=0.1).
    """
    t = config.train
    rules = [
        ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a finite number > 0", "0.1"),
        ("train.momentum", t.momentum, 0 <= t.momentum < 1, "in [0, 1) (0: plain SGD)", "0.9"),
        ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0,
         "a finite number >= 0", "0.0001"),
    ]
    for key, value, ok, rule, example in rules:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value!r} (e.g. --set {key}={example}).")
    for name, value in config.params.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"params.{name} must be finite, got {value!r}; "
                              f"the experiment {config.experiment!r} measures its outcome with it.")


def grid_points(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The points of the grid, in order (the first axis varies slowest); ``[{}]`` without a grid.

    >>> cfg = ExperimentConfig(experiment="demo", grid={"train.lr": [0.1, 1.0], "model.activation": ["relu"]})
    >>> grid_points(cfg)
    [{'train.lr': 0.1, 'model.activation': 'relu'}, {'train.lr': 1.0, 'model.activation': 'relu'}]
    """
    check_grid(config)
    points: list[dict[str, Any]] = [{}]
    for key, values in config.grid.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def point_config(config: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """``config`` with one grid point's values applied and no grid left (what a job trains)."""
    config = apply_overrides(config, point, parse=False)
    config.grid = {}
    return config


def load_toml_overrides(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of overrides: tables ``[train]``, ``[model]``, ... or dotted keys.

    ``[arms.NAME]`` tables (each arm's overrides) come back under ``"__arms__"`` and a ``[grid]``
    table (axis = list of values) under ``"__grid__"``; keys nested in tables become dotted keys
    (``[arms.bn] model.norm = "batch"`` is ``{"bn": {"model.norm": "batch"}}``).

    Raises:
        ConfigError: the file is missing, is a folder or unreadable, is not TOML, or its
            ``arms``/``grid`` are not tables of the right shape.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {str(path)!r} is a folder; give a TOML file ([train] lr = 0.1 ...).")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"config file {str(path)!r} cannot be read as text ({reason}); give a TOML file.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}.") from None
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section in ("arms", "grid"):
            flat[f"__{section}__"] = _arms_table(body, path) if section == "arms" else _grid_table(body, path)
        elif isinstance(body, dict):
            flat.update(_dotted(body, section))
        else:
            flat[section] = body
    return flat


def _dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys: ``{"model": {"norm": "x"}}`` -> ``{"model.norm": "x"}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_dotted(value, name) if isinstance(value, dict) else {name: value})
    return out


def _arms_table(body: Any, path: Path) -> dict[str, dict[str, Any]]:
    example = '[arms.mine] "model.norm" = "batch"'
    if not isinstance(body, dict):
        raise ConfigError(f"config file {str(path)!r}: arms must be a table of arms, each a table of config keys "
                          f"(e.g. {example}), got {type(body).__name__} {body!r}.")
    for name, arm in body.items():
        if not isinstance(arm, dict):
            raise ConfigError(f"config file {str(path)!r}: arm {name!r} must be a table of config keys "
                              f"(e.g. [arms.{name}] \"model.norm\" = \"batch\"), got {type(arm).__name__} {arm!r}.")
    return {name: _dotted(arm) for name, arm in body.items()}


def _grid_table(body: Any, path: Path) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"config file {str(path)!r}: grid must be a table of axes, each a config key with a list "
                          f"of values (e.g. [grid] \"train.lr\" = [0.1, 1.0]), got {type(body).__name__} {body!r}.")
    return _dotted(body)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """A JSON-ready dict of the whole config."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from :func:`config_to_dict` output (e.g. a run's ``config.json``), checking types."""
    if "experiment" not in data:
        raise ConfigError("a config needs an 'experiment' key naming the experiment.")
    base = ExperimentConfig(
        experiment=data["experiment"],
        arms=dict(data.get("arms", {})),
        params=dict(data.get("params", {})),
        grid={key: list(values) for key, values in data.get("grid", {}).items()},
    )
    flat = {f"{s}.{k}": v for s in _SECTIONS for k, v in data.get(s, {}).items()}
    return apply_overrides(base, flat, parse=False)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write ``config.json`` atomically."""
    from .runfiles import atomic_write_text

    atomic_write_text(Path(path), json.dumps(config_to_dict(config), indent=2) + "\n")
