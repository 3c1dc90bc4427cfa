"""What the inference-stats experiment measures on a model (:mod:`normlab.lab.experiments.inference_stats`,
claims C8 and C12): an example's dependence on its batch-mates, and batch norms' running
statistics at several momenta kept beside the model's own (:class:`ShadowEMA`), for the accuracy
with each against recalibrated statistics. The experiment's docstring says what each counts.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import batch as _nl_batch
from ..layers.kinds import norm_kind
from ..surgery.recalibrate import recalibrated_norms

__all__ = ["PLAIN_EMA", "SHADOWS", "ShadowEMA", "accuracy", "batch_mate_dependence", "mate_batches", "momentum_key",
           "norms_in_training_mode", "recalibration_batches", "with_running_stats"]


# The EMAs of a run's batch norms at several momenta, by model: the probe that keeps them and
# the measurement that reads them see the same model object.
SHADOWS: "weakref.WeakKeyDictionary[nn.Module, ShadowEMA]" = weakref.WeakKeyDictionary()

# Batch norms whose running statistics follow torch's plain EMA of each training batch's mean
# and variance (ghost, renorm, fused-activation and synchronized variants update differently).
PLAIN_EMA = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
              _nl_batch.BatchNorm1d, _nl_batch.BatchNorm2d, _nl_batch.BatchNorm3d}


def momentum_key(momentum: float) -> str:
    """The suffix of a momentum's values: ``0.01`` -> ``"m0.01"``."""
    return f"m{momentum:g}"


def with_running_stats(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The batch norms :func:`~normlab.surgery.recalibrate_bn` gives new statistics."""
    return recalibrated_norms(model)


class ShadowEMA:
    """EMAs of every plain batch norm's batch statistics at several momenta, kept by forward
    pre-hooks that fire in training mode on the original modules only (a deep copy carries the
    hooks along; its calls, e.g. recalibration's, must not count)."""

    def __init__(self, model: nn.Module, momenta: Sequence[float]):
        self.norms = [(name, m) for name, m in model.named_modules()
                      if type(m) in PLAIN_EMA and m.track_running_stats and m.momentum is not None]
        # A norm's own momentum is tracked too: its EMA must equal the running statistics (a check).
        self.momenta = sorted(set(momenta) | {float(m.momentum) for _, m in self.norms})
        # Resumed after training steps: the EMAs at other momenta cannot be rebuilt.
        self.valid = not any(int(m.num_batches_tracked) > 0 for _, m in self.norms)
        self.updates = 0
        self.stats: dict[str, dict[float, tuple[Tensor, Tensor]]] = {}
        for name, m in self.norms:
            init = (torch.zeros_like(m.running_mean), torch.ones_like(m.running_var))
            self.stats[name] = {mom: (init[0].clone(), init[1].clone()) for mom in self.momenta}
        self.handles = [m.register_forward_pre_hook(self._hook(name, m)) for name, m in self.norms]

    def _hook(self, name: str, original: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:
            if module is not original or not module.training or not args:
                return
            x = args[0]
            if x.dim() < 2 or x.numel() <= x.shape[1]:
                return  # the layer itself refuses or skips such a batch
            with torch.no_grad():
                xd = x.detach()
                axes = [0, *range(2, xd.dim())]
                unbiased = getattr(module, "unbiased", True)
                var, mean = torch.var_mean(xd, dim=axes, correction=1 if unbiased else 0)
                if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                    return  # normlab's batch norm leaves its running statistics alone then; so do we
                for mom, (ema_mean, ema_var) in self.stats[name].items():
                    ema_mean.mul_(1 - mom).add_(mean.to(ema_mean.dtype), alpha=mom)
                    ema_var.mul_(1 - mom).add_(var.to(ema_var.dtype), alpha=mom)
            if name == self.norms[0][0]:
                self.updates += 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def check(self, model: nn.Module) -> float:
        """The largest difference between a norm's running statistics and the EMA at its own
        momentum, relative to the statistics' largest magnitude (float32 rounding: ~1e-6)."""
        worst = 0.0
        modules = dict(model.named_modules())
        for name, _ in self.norms:
            m = modules[name]
            ema_mean, ema_var = self.stats[name][float(m.momentum)]
            for ema, run in ((ema_mean, m.running_mean), (ema_var, m.running_var)):
                scale = float(run.abs().max()) or 1.0
                worst = max(worst, float((ema.double() - run.double()).abs().max()) / scale)
        return worst

    def load(self, model: nn.Module, momentum: float) -> None:
        """Put the EMAs at ``momentum`` into ``model``'s running statistics (a copy of the original)."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, _ in self.norms:
                ema_mean, ema_var = self.stats[name][momentum]
                modules[name].running_mean.copy_(ema_mean)
                modules[name].running_var.copy_(ema_var)


def norms_in_training_mode(model: nn.Module) -> nn.Module:
    """``model`` in eval mode except its normalization layers (:func:`~normlab.layers.kinds.norm_kind`),
    which are put in training mode (so dropout and the like add no change of their own). In place;
    returns ``model``.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    >>> [m.training for m in norms_in_training_mode(net)]
    [False, True, False]
    """
    model.eval()
    for m in model.modules():
        if norm_kind(m) is not None:
            m.train()
    return model


@torch.no_grad()
def batch_mate_dependence(model: nn.Module, probes: Tensor, mates_a: Tensor, mates_b: Tensor) -> float:
    """How much the outputs of ``probes`` change when their batch-mates change.

    Runs ``cat(probes, mates_a)`` and ``cat(probes, mates_b)`` through ``model`` (in whatever
    mode it is) and returns ``max |f(x_i; A) - f(x_i; B)| / RMS f(x_i; A)`` over the probe
    examples ``i`` and output units (in float64 from the model's outputs); 0 when the outputs
    agree exactly, ``inf`` when they differ and the RMS is 0, NaN when an output is not finite.

    Args:
        model: maps ``(N, *)`` to ``(N, K)``.
        probes: ``(P, *)``, P >= 1.
        mates_a, mates_b: ``(M, *)`` each, the same M >= 1 (the batches are equally large).

    Raises:
        ValueError: no probe, or batch-mates of different counts or none.

    >>> _ = torch.manual_seed(0)
    >>> bn = nn.BatchNorm1d(3)
    >>> x = torch.randn(12, 3)
    >>> batch_mate_dependence(bn.eval(), x[:2], x[2:7], x[7:]) == 0.0
    True
    >>> batch_mate_dependence(bn.train(), x[:2], x[2:7], x[7:]) > 1e-3
    True
    """
    if probes.shape[0] < 1:
        raise ValueError(f"batch_mate_dependence needs at least one probe example, got shape {tuple(probes.shape)}.")
    if mates_a.shape[0] != mates_b.shape[0] or mates_a.shape[0] < 1:
        raise ValueError(f"batch_mate_dependence needs two equally large, non-empty sets of batch-mates (so both "
                         f"batches have one size), got {mates_a.shape[0]} and {mates_b.shape[0]}.")
    p = probes.shape[0]
    out_a = model(torch.cat([probes, mates_a]))[:p].double()
    out_b = model(torch.cat([probes, mates_b]))[:p].double()
    diff = float((out_a - out_b).abs().max())
    rms = float(out_a.square().mean().sqrt())
    if not (math.isfinite(diff) and math.isfinite(rms)):
        return math.nan  # a broken (diverged) network: nothing to measure
    if diff == 0.0:
        return 0.0
    return diff / rms if rms > 0 else math.inf


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    correct = 0
    for start in range(0, len(y), 2000):  # the trainer's chunks: the same numbers as its test_acc
        correct += int((model(x[start:start + 2000]).argmax(1) == y[start:start + 2000]).sum())
    return correct / len(y)


def mate_batches(data: Any, batch: int, params: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The probe examples and the two sets of batch-mates (see the module docstring)."""
    n = len(data.y_test)
    p = min(int(params["probe_examples"]), max(1, batch // 2))
    m = batch - p
    pool = n - p
    if m < 1 or pool < m:
        raise ValueError(f"inference-stats: the batch-mate measurement needs 2 <= train.batch_size <= {n} (a batch "
                         f"is drawn from the test split, {n} examples), got batch size {batch}.")
    g = torch.Generator().manual_seed(int(params["mates_seed"]))
    perm = torch.randperm(pool, generator=g) + p
    first = perm[:m]
    # Disjoint mates when the split holds enough examples, else a second independent draw.
    second = perm[m:2 * m] if 2 * m <= pool else (torch.randperm(pool, generator=g) + p)[:m]
    x = data.x_test
    return x[:p], x[first], x[second]


def recalibration_batches(data: Any, batch: int, params: dict[str, Any]) -> list[Tensor]:
    """``recal_examples`` training examples (at least one batch) in batches of the training batch
    size, drawn with a fixed generator (whole permutations, repeated if the split is smaller)."""
    n = len(data.y_train)
    count = max(1, int(params["recal_examples"]) // batch)
    g = torch.Generator().manual_seed(int(params["recal_seed"]))
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-count * batch // n))])
    return [data.x_train[order[i * batch:(i + 1) * batch]] for i in range(count)]
