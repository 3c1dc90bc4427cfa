"""The loss landscape along the gradient (Santurkar et al. 2018, Sec. 3.1, Fig. 4).

At the weights ``w`` of a training state, with the gradient ``g = grad L(w)`` on one batch,
the loss and its gradient are measured at ``w - eta g`` for each step size ``eta`` of a declared
set (multiples of the learning rate):

* **variation of the loss**: ``max_eta L(w - eta g) - min_eta L(w - eta g)``: how much the loss
  changes along the step the optimizer is about to take (small: a flat, predictable landscape);
* **gradient predictiveness** (reported as the change of the gradient, smaller = more
  predictive): ``max_eta || grad L(w - eta g) - g ||_2``;
* **effective beta-smoothness**: ``max_eta || grad L(w - eta g) - g ||_2 / || eta g ||_2``,
  the largest change of the gradient per unit of distance moved along it (a local Lipschitz
  constant of the gradient in that direction).

Only parameters that train (``requires_grad``) move. The model is copied and put in training
mode (batch norm uses the batch's statistics, as during the step); its random draws (dropout,
:class:`~normlab.lab.noise.StepNoise`) are fixed by ``seed`` and the same at every ``eta``, so
the landscape is that of one function, and torch's global random stream is left as it was.

>>> import torch
>>> net = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
>>> out = landscape_along_gradient(net, x, y, (0.1, 0.2))
>>> sorted(out)
['beta_smoothness', 'grad_change', 'grad_norm', 'loss', 'loss_variation']
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["landscape_along_gradient"]


def _loss_and_grad(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable, seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)  # the same random draws (noise, dropout) at every point
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).double()


def landscape_along_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: Sequence[float], *,
                             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                             seed: int = 0) -> dict[str, float]:
    """Santurkar et al.'s loss-landscape measures at ``model``'s weights (see the module docstring).

    Args:
        model: left untouched (a deep copy is measured, in training mode).
        x, y: the batch (use a fixed one so that arms and steps compare).
        etas: the step sizes, each > 0 (e.g. multiples of the learning rate).
        loss_fn: ``loss_fn(output, y)``, a scalar (default cross-entropy).
        seed: seeds the copy's random draws (the same at every step size).

    Returns:
        ``{"loss": L(w), "grad_norm": ||g||, "loss_variation", "grad_change", "beta_smoothness"}``
        as floats (``beta_smoothness`` is NaN when ``g`` is zero).

    Raises:
        ValueError: no step size, a step size that is not a positive finite number, or a model
            with no parameter that trains.
    """
    etas = [float(e) for e in etas]
    if not etas or any(not (math.isfinite(e) and e > 0) for e in etas):
        raise ValueError(f"landscape_along_gradient: etas must be a non-empty list of positive finite step sizes "
                         f"(e.g. multiples of the learning rate), got {etas!r}.")
    probe = copy.deepcopy(model).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    if not params:
        raise ValueError("landscape_along_gradient: the model has no parameter with requires_grad; nothing moves "
                         "along the gradient. Measure a model with trainable parameters.")
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        start = [p.detach().clone() for p in params]
        loss0, g = _loss_and_grad(probe, params, x, y, loss_fn, seed)
        g_norm = float(g.norm())
        losses, changes, per_distance = [], [], []
        for eta in etas:
            with torch.no_grad():
                offset = 0
                for p, p0 in zip(params, start):
                    n = p.numel()
                    p.copy_(p0 - eta * g[offset: offset + n].view_as(p).to(p.dtype))
                    offset += n
            loss, grad = _loss_and_grad(probe, params, x, y, loss_fn, seed)
            change = float((grad - g).norm())
            losses.append(loss)
            changes.append(change)
            per_distance.append(change / (eta * g_norm) if g_norm > 0 else math.nan)
    return {
        "loss": loss0,
        "grad_norm": g_norm,
        "loss_variation": max(losses) - min(losses),
        "grad_change": max(changes),
        "beta_smoothness": max(per_distance),
    }
