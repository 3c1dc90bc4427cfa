"""The one registry of the lab's experiments: every module of this package except ``base``,
``common``, ``registry`` and those whose name starts with ``_`` (an experiment's private helpers)
is an experiment, registered when imported; adding a file adds an experiment, with no list to
keep in step.

>>> from normlab.lab.experiments.registry import all_experiments, get_experiment
>>> "ioffe2015-mnist" in all_experiments()
True
>>> get_experiment("ioffe2015-mnist").claims
('C1', 'C3')
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Experiment

__all__ = ["EXPERIMENTS", "all_experiments", "experiment_modules", "get_experiment", "register"]

NOT_EXPERIMENTS = ("base", "common", "registry")
EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add an experiment to the registry under its name (each experiment module calls it once)."""
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def experiment_modules() -> list[str]:
    """The experiment modules of this package, sorted by name."""
    folder = str(Path(__file__).parent)
    return sorted(m.name for m in pkgutil.iter_modules([folder])
                  if m.name not in NOT_EXPERIMENTS and not m.name.startswith("_"))


def all_experiments() -> dict[str, Experiment]:
    """Every experiment by name (imports the experiment modules, once)."""
    for module in experiment_modules():
        importlib.import_module(f"{__package__}.{module}")
    return dict(EXPERIMENTS)


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a ``ValueError`` lists the valid names otherwise."""
    if name not in EXPERIMENTS:
        all_experiments()
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid experiments are {sorted(EXPERIMENTS)} (normlab list).")
    return EXPERIMENTS[name]
