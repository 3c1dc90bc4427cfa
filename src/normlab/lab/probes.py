"""Probes: values the trainer records at every evaluation, through removable forward hooks.

A probe's ``attach(model)`` installs its hooks and returns ``(read, remove)``; ``read()`` gives
``{name: value}`` for the last evaluation. Hooks record in eval mode only, so training steps
pay nothing but a flag check. The hooks themselves are normlab.surgery's diagnostics probes.
:func:`grad_norm_probe` reads the weight gradients the last training step left in ``.grad``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..surgery.diagnose import ActivationPercentiles
from .experiments.base import Probe

__all__ = ["grad_norm_probe", "percentile_probe"]


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


def _hidden_weights(model: nn.Module) -> list[nn.Parameter]:
    return [block.layer.weight for block in model.blocks]


def grad_norm_probe(prefix: str, weights_of=_hidden_weights):
    """A :class:`Probe` recording the 2-norm of each hidden layer's weight gradient.

    ``weights_of(model)`` lists the weights, first layer first (default: the weight of each
    hidden block's Linear/Conv layer, ``model.blocks[i].layer.weight``). Values:

    * ``{prefix}_{i}`` for i = 1..depth (1 = the first layer): ``||dL/dW_i||_2`` of the most recent
      training step. The trainer evaluates right after an optimizer step and evaluation computes
      no gradients, so ``.grad`` then holds that step's gradients (one batch). None at step 0.
    * ``{prefix}_init_{i}``: the same for the very first training step, i.e. the gradient at the
      initial weights, kept by tensor hooks that fire at the first backward and are removed at
      the next evaluation. They appear once, in the first row after the first step, so that a
      job resumed from a checkpoint (whose earlier rows, kept in the checkpoint, hold them) ends
      with the rows of an uninterrupted one. (A job stopped between step 0 and its first
      evaluation after it resumes without them.)

    Under data parallelism the ``init`` values are the local batch slice's gradient (the hooks
    fire before the all-reduce); the others are the averaged gradient.

    >>> from normlab.lab.config import ModelConfig
    >>> from normlab.lab.models import build_model
    >>> net = build_model(ModelConfig(widths=[8, 8]), (1, 4, 4), 3)
    >>> read, remove = grad_norm_probe("g").attach(net)
    >>> read()  # the step-0 evaluation: no gradient yet
    {}
    >>> torch.nn.functional.cross_entropy(net(torch.randn(5, 1, 4, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    >>> sorted(read())
    ['g_1', 'g_2', 'g_init_1', 'g_init_2']
    >>> remove()
    """

    def attach(model: nn.Module):
        weights = list(weights_of(model))
        first: dict[int, float] = {}
        handles = []
        state = {"fresh": None}  # True: the first read came before any backward (a job from step 0)

        def keep_first(i: int):
            def hook(grad: torch.Tensor) -> None:
                if i not in first:
                    first[i] = float(grad.detach().double().norm())

            return hook

        for i, w in enumerate(weights, 1):
            handles.append(w.register_hook(keep_first(i)))

        def remove() -> None:
            for handle in handles:
                handle.remove()
            handles.clear()

        def read() -> dict[str, float]:
            if state["fresh"] is None:
                state["fresh"] = not first
            if len(first) == len(weights):
                remove()  # the first backward is recorded: training pays nothing more
            grads = [(i, w.grad) for i, w in enumerate(weights, 1) if w.grad is not None]
            values: dict[str, float] = {}
            if grads:  # one host sync for all layers
                norms = torch.stack([g.detach().double().norm() for _, g in grads]).tolist()
                values = {f"{prefix}_{i}": v for (i, _), v in zip(grads, norms)}
            if state["fresh"] and len(first) == len(weights):
                values.update({f"{prefix}_init_{i}": first[i] for i in sorted(first)})
                state["fresh"] = False  # once: a resumed job's rows then equal an uninterrupted one's
            return values

        return read, remove

    return Probe(prefix, attach)
