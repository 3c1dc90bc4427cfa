"""Santurkar et al.'s "noisy batch norm": a norm's output perturbed by noise whose distribution
changes at every training step.

Santurkar, Tsipras, Ilyas & Madry (2018, "How does batch normalization help optimization?",
Sec. 2.1) inject, after each batch norm, noise "sampled from a non-zero mean and non-unit
variance distribution" that changes at every time step, so that the input distribution of the
next layer shifts all the time: internal covariate shift put back on purpose. Our reading, with
strength ``s`` (:class:`StepNoise`), at every forward pass in training mode (one per step):

.. math::

    \\mu_j \\sim U(-s, s), \\qquad \\sigma_j \\sim U(1, 1 + s), \\qquad
    y_{n,j\\ldots} = \\sigma_j \\, x_{n,j\\ldots} + \\mu_j

one draw per unit ``j`` (feature of a ``(N, C)`` input, channel of ``(N, C, ...)``), the same for
every example and position of that step. So every step the unit's distribution gets a new mean
and a new scale (a time-varying, non-zero-mean, non-unit-variance perturbation per activation);
its gradient is scaled by the same ``sigma``. In eval mode the module is the identity, as the
paper's noise is a training-time intervention.

Draws come from torch's global generator, so a job seeded with ``torch.manual_seed`` is
reproducible, and its checkpoint (which saves that generator's state) resumes the same draws.

>>> import torch
>>> noise = StepNoise(0.5)
>>> x = torch.randn(8, 3)
>>> torch.equal(noise.eval()(x), x)
True
>>> y = noise.train()(x)
>>> ((y - x).abs().sum() > 0).item()
True
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StepNoise"]


class StepNoise(nn.Module):
    """Per-unit affine noise redrawn at every training forward pass (see the module docstring).

    Args:
        strength: ``s`` > 0: shifts drawn from ``U(-s, s)`` and scales from ``U(1, 1 + s)``.

    Shapes: ``(N, C)`` or ``(N, C, *)`` in, the same out. No parameters, no buffers.

    Raises:
        ValueError: ``strength`` not a positive finite number; an input with fewer than 2 dims.
    """

    def __init__(self, strength: float) -> None:
        super().__init__()
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength < float("inf"):
            raise ValueError(f"StepNoise: strength must be a positive finite number (the half-width of the shift "
                             f"U(-s, s) and the scale U(1, 1 + s)), got {strength!r}.")
        self.strength = float(strength)

    def extra_repr(self) -> str:
        return f"strength={self.strength:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"StepNoise expects (N, C) or (N, C, ...) input, got shape {tuple(x.shape)}.")
        if not self.training:
            return x
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        s = self.strength
        shift = (torch.rand(shape, device=x.device, dtype=x.dtype) * 2 - 1) * s
        scale = 1 + torch.rand(shape, device=x.device, dtype=x.dtype) * s
        return x * scale + shift
