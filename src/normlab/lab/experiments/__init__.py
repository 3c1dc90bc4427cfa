"""The lab's experiments, one module each; importing a module registers its experiment.

Every module of this package except ``base`` and ``common`` is an experiment: adding a file adds
an experiment, with no list to keep in step.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import EXPERIMENTS, Experiment

NOT_EXPERIMENTS = ("base", "common")


def experiment_modules() -> list[str]:
    """The experiment modules of this package, sorted by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_EXPERIMENTS)


def all_experiments() -> dict[str, Experiment]:
    """Every experiment by name (imports the experiment modules once)."""
    for module in experiment_modules():
        importlib.import_module(f"{__name__}.{module}")
    return dict(EXPERIMENTS)
