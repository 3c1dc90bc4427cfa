"""Batch renorm's r_max/d_max schedule scaled to a job's length, for ``wu-he2018-batch-size``
(:mod:`normlab.lab.experiments.wu_he_batch_size`; a private helper module: the registry skips
modules whose name starts with _).
"""

from __future__ import annotations

from typing import Any

from ...layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_schedule
from ..config import ConfigError
from .base import Probe

__all__ = ["renorm_probe", "renorm_schedule_for"]


def renorm_schedule_for(steps: int, params: dict[str, Any]) -> dict[str, Any]:
    """Ioffe's r_max/d_max schedule scaled to a job of ``steps`` steps (see the module docstring):
    ``LinearRamp`` s from ``r_max = 1, d_max = 0`` up to step ``warmup x steps``, reaching
    ``params.renorm_r_max`` at ``r_max_at x steps`` and ``params.renorm_d_max`` at ``d_max_at x steps``.

    >>> s = renorm_schedule_for(1000, {})
    >>> s["r_max"](50), s["r_max"](400), s["d_max"](250)
    (1.0, 3.0, 5.0)
    """
    frac = {k: float(params.get(f"renorm_{k}", d)) for k, d in
            (("warmup", 0.05), ("r_max_at", 0.4), ("d_max_at", 0.25))}
    if not 0 <= frac["warmup"] <= min(frac["r_max_at"], frac["d_max_at"]):
        raise ConfigError(f"wu-he2018-batch-size: params.renorm_warmup must lie in [0, min(renorm_r_max_at, "
                          f"renorm_d_max_at)] (fractions of a job's steps), got {frac}.")
    warmup = round(frac["warmup"] * steps)
    return renorm_schedule(float(params.get("renorm_r_max", 3.0)), float(params.get("renorm_d_max", 5.0)),
                           warmup_steps=warmup, r_max_at=max(warmup, round(frac["r_max_at"] * steps)),
                           d_max_at=max(warmup, round(frac["d_max_at"] * steps)))


def renorm_probe(schedule: dict[str, Any]) -> Probe:
    """A :class:`Probe` that gives every batch-renorm layer of the model ``schedule``'s r_max and
    d_max when it attaches (before training, and again when a job resumes from a checkpoint, whose
    state dict holds no schedule), and records the limits in force at each evaluation
    (``renorm_r_max``, ``renorm_d_max``, read from the first such layer). Removing it restores the
    layers' own schedules."""
    def attach(model):
        layers = [m for m in model.modules() if isinstance(m, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d))]
        before = [(m.r_max, m.d_max) for m in layers]
        for m in layers:
            m.r_max, m.d_max = schedule["r_max"], schedule["d_max"]

        def read() -> dict[str, float]:
            if not layers:
                return {}
            r, d = layers[0].limits()
            return {"renorm_r_max": float(r), "renorm_d_max": float(d)}

        def remove() -> None:
            for m, (r, d) in zip(layers, before):
                m.r_max, m.d_max = r, d

        return read, remove

    return Probe("renorm", attach)
