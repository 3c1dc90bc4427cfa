"""The lab's experiments, one module each; importing a module registers its experiment
(:mod:`normlab.lab.experiments.registry`, the one registry)."""

from __future__ import annotations

from .registry import EXPERIMENTS, all_experiments, experiment_modules, get_experiment

__all__ = ["EXPERIMENTS", "all_experiments", "experiment_modules", "get_experiment"]
