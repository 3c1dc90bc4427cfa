"""A small, fast run of ioffe2015-mnist for the trainer and executor tests (synthetic data, 40 steps)."""

from __future__ import annotations

from normlab.lab.config import apply_overrides
from normlab.lab.experiments import all_experiments

EXPERIMENT = all_experiments()["ioffe2015-mnist"]
SMALL = {
    "data.name": "synthetic", "model.widths": [16, 16], "train.steps": 40, "train.seeds": 2,
    "train.eval_every": 5, "train.checkpoint_every": 10, "train.device": "cpu",
}


def small_config(**extra):
    return apply_overrides(EXPERIMENT.quick_config(), {**SMALL, **extra}, parse=False)
