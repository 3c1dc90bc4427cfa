"""Probes: values the trainer records at every evaluation, through removable forward hooks.

A probe's ``attach(model)`` installs its hooks and returns ``(read, remove)``; ``read()`` gives
``{name: value}`` for the last evaluation. Hooks record in eval mode only, so training steps
pay nothing but a flag check. The hooks themselves are normlab.surgery's diagnostics probes.
"""

from __future__ import annotations

from torch import nn

from ..surgery.diagnose import ActivationPercentiles
from .experiments.base import Probe

__all__ = ["percentile_probe"]


def percentile_probe(prefix: str, module_of, unit: int = 0, qs: tuple[float, ...] = (0.15, 0.5, 0.85)):
    """A :class:`Probe` recording percentiles of one unit's output of a module at evaluation,
    through :class:`normlab.surgery.ActivationPercentiles` (pooled over the evaluation's chunks).

    ``module_of(model)`` picks the module (e.g. the input to the last hidden sigmoid); the
    values are ``{prefix}_p15``, ``{prefix}_p50``, ``{prefix}_p85`` over the test set.
    """

    def attach(model: nn.Module):
        target = module_of(model)
        probe = ActivationPercentiles(model, lambda name, module: module is target, qs, unit=unit,
                                      training=False, pool=True)

        def read() -> dict[str, float]:
            (row,) = probe.table().values()
            probe.clear()
            return {} if row.numel() == 0 else {f"{prefix}_p{round(q * 100)}": float(v) for q, v in zip(qs, row[0])}

        return read, probe.remove

    return Probe(prefix, attach)
