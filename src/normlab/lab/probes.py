"""Probes: values the trainer records at every evaluation, through removable forward hooks.

A probe's ``attach(model)`` installs its hooks and returns ``(read, remove)``; ``read()`` gives
``{name: value}`` for the last evaluation. Hooks record in eval mode only, so training steps
pay nothing but a flag check.
"""

from __future__ import annotations

import torch
from torch import nn

from .experiments.base import Probe

__all__ = ["percentile_probe"]


def percentile_probe(prefix: str, module_of, unit: int = 0, qs: tuple[float, ...] = (0.15, 0.5, 0.85)):
    """A :class:`Probe` recording percentiles of one unit's output of a module at evaluation.

    ``module_of(model)`` picks the module (e.g. the input to the last hidden sigmoid); the
    values are ``{prefix}_p15``, ``{prefix}_p50``, ``{prefix}_p85`` over the test set.
    """
    def attach(model: nn.Module):
        seen: list[torch.Tensor] = []

        def hook(module, inputs, output):
            if not module.training:  # record at evaluation only; training steps pay nothing else
                seen.append(output.detach().reshape(output.shape[0], -1)[:, unit].float().cpu())

        handle = module_of(model).register_forward_hook(hook)

        def read() -> dict[str, float]:
            values = torch.cat(seen) if seen else torch.empty(0)
            seen.clear()
            if values.numel() == 0:
                return {}
            quantiles = torch.quantile(values, torch.tensor(qs))
            return {f"{prefix}_p{round(q * 100)}": float(v) for q, v in zip(qs, quantiles)}

        return read, handle.remove

    return Probe(prefix, attach)

