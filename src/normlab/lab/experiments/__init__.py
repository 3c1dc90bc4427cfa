"""The lab's experiments, one module each; importing a module registers its experiment."""

from __future__ import annotations

import importlib

from .base import EXPERIMENTS, Experiment

MODULES = ("ioffe2015_mnist",)


def all_experiments() -> dict[str, Experiment]:
    """Every experiment by name (imports the experiment modules once)."""
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return dict(EXPERIMENTS)
