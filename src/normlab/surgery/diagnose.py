"""Diagnostics for normalization layers: stale or broken statistics, train/eval gaps, probes.

* :func:`check_stats` finds running statistics that are NaN, infinite, zero or negative in
  variance, or were never updated (still at their initial 0 / 1 with a zero batch count).
* :func:`batch_vs_running_gap` measures, per batch norm, how far the statistics of its input
  on given data are from the running statistics it normalizes with at inference.
* :func:`train_eval_gap` compares loss and accuracy with the norms in training mode (batch
  statistics) and in eval mode (running statistics) on the same batches.
* :class:`ActivationPercentiles` and :class:`GradNorms` are removable probes: forward hooks
  recording percentiles of layer outputs, and per-layer gradient norms of each backward pass.

Every function leaves the model as it found it: modes, buffers and parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import NormLayer
from ..layers.kinds import is_batchnorm, norm_kind
from .recalibrate import check_num_batches, collect_moments, iterate, run_batch
from .walk import Match, check_model, find_modules

__all__ = [
    "ActivationPercentiles",
    "GradNorms",
    "Problem",
    "StatsGap",
    "TrainEvalGap",
    "batch_vs_running_gap",
    "check_stats",
    "is_norm",
    "stats_problems",
    "train_eval_gap",
]


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (normlab's, torch's batch/group/instance/layer/RMS,
    other libraries' as :func:`normlab.layers.kinds.norm_kind` recognizes them)."""
    return isinstance(module, NormLayer) or norm_kind(module) is not None


# --------------------------------------------------------------------------------------------
# check_stats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem with a layer's running statistics.

    Attributes:
        layer: the qualified name.
        kind: ``"nan"``, ``"inf"``, ``"zero_variance"``, ``"negative_variance"`` or ``"never_updated"``.
        detail: what was found, in words.
    """

    layer: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.kind}: {self.detail}"


def _channels_where(mask: Tensor) -> str:
    """Which channels a mask marks; per-step statistics ``(T, C)`` (a recurrent batch norm's)
    name ``step:channel``."""
    if mask.dim() > 1:
        idx = [":".join(map(str, pos)) for pos in mask.nonzero().tolist()]
        unit = "step:channel entries"
    else:
        idx, unit = [str(i) for i in mask.nonzero().flatten().tolist()], "channels"
    shown = ", ".join(idx[:5]) + (", ..." if len(idx) > 5 else "")
    return f"{len(idx)} of {mask.numel()} {unit} ({shown})"


def stats_problems(layer: str, running_mean: Tensor | None, running_var: Tensor | None,
                   num_batches_tracked: Tensor | None = None) -> list[Problem]:
    """The problems of one layer's running statistics (used by :func:`check_stats` and the CLI).

    >>> import torch
    >>> [p.kind for p in stats_problems("bn", torch.zeros(3), torch.tensor([1.0, 0.0, float("nan")]))]
    ['nan', 'zero_variance']
    """
    problems: list[Problem] = []
    if running_mean is None or running_var is None:
        return problems
    rm, rv = running_mean.detach().float(), running_var.detach().float()
    for name, t in (("running_mean", rm), ("running_var", rv)):
        if torch.isnan(t).any():
            problems.append(Problem(layer, "nan", f"{name} is NaN in {_channels_where(torch.isnan(t))}"))
        if torch.isinf(t).any():
            problems.append(Problem(layer, "inf", f"{name} is infinite in {_channels_where(torch.isinf(t))}"))
    if (rv == 0).any():
        problems.append(Problem(
            layer, "zero_variance",
            f"running_var is 0 in {_channels_where(rv == 0)}: dead or constant channels, normalized by sqrt(eps) alone",
        ))
    if (rv < 0).any():
        problems.append(Problem(layer, "negative_variance", f"running_var is negative in {_channels_where(rv < 0)}"))
    # A recurrent batch norm counts per step: the statistics were updated if any step counted.
    count = None if num_batches_tracked is None else int(num_batches_tracked.max()) if num_batches_tracked.numel() else 0
    if (count is None or count == 0) and bool((rm == 0).all()) and bool((rv == 1).all()):
        problems.append(Problem(
            layer, "never_updated",
            "running statistics are still at their initial values (mean 0, var 1) and no batch was counted: "
            "the layer was never trained, or its state was not loaded; recalibrate_bn computes them from data",
        ))
    return problems


def check_stats(model: nn.Module) -> list[Problem]:
    """Every problem with the running statistics of ``model``'s norms (an empty list when healthy).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> [str(p).split(":")[:2] for p in check_stats(net)]
    [['1', ' never_updated']]
    """
    check_model(model, "check_stats")
    problems: list[Problem] = []
    for name, module in model.named_modules():
        rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(rm, Tensor) and isinstance(rv, Tensor):
            problems += stats_problems(name or "<model>", rm, rv, getattr(module, "num_batches_tracked", None))
    return problems


# --------------------------------------------------------------------------------------------
# Gaps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsGap:
    """How the statistics of a batch norm's input on some data differ from its running statistics.

    With ``m``, ``v`` the data's per-channel mean and variance (the divisor the layer stores) and
    ``rm``, ``rv`` the running ones: ``shift = |m - rm| / sqrt(rv + eps)`` (the mean's error in
    units of the normalizing std) and ``ratio = v / rv``.

    Attributes:
        layer: qualified name.
        values: values per channel seen (N times the spatial size, over all batches).
        max_shift, mean_shift: the largest and the average ``shift`` over channels.
        min_var_ratio, max_var_ratio: the extremes of ``ratio`` over channels (1 is a match).
    """

    layer: str
    values: int
    max_shift: float
    mean_shift: float
    min_var_ratio: float
    max_var_ratio: float

    def __str__(self) -> str:
        return (f"{self.layer}: mean shift {self.mean_shift:.3g} (max {self.max_shift:.3g}) stds, "
                f"variance ratio {self.min_var_ratio:.3g}..{self.max_var_ratio:.3g} over {self.values} values")


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, mode in modes.items():
        m.training = mode


def batch_vs_running_gap(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> list[StatsGap]:
    """Per batch norm, the gap between its input's statistics on the batches and its running ones.

    The model runs in eval mode (no gradients), so each norm sees its input as at inference;
    the input statistics are pooled over all batches exactly (as :func:`recalibrate_bn` does).
    Large shifts or ratios far from 1 mean the running statistics are stale for this data.

    Args:
        model: the model (modes restored afterwards; nothing is updated).
        loader: batches (tensors or ``(x, y)`` tuples, or anything ``forward`` takes).
        num_batches: how many (None: all); a loader that runs short is an error.
        forward: ``forward(model, batch)`` (default ``model(x)``).

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2)).eval()
    >>> gap = batch_vs_running_gap(net, [torch.randn(500, 2) * 3 + 1])[0]
    >>> round(gap.mean_shift), round(gap.max_var_ratio)
    (1, 10)
    """
    where = "batch_vs_running_gap"
    check_model(model, where)
    check_num_batches(num_batches, where)
    norms = dict(find_modules(model, lambda n, m: is_batchnorm(m) and m.running_mean is not None))
    if not norms:
        raise ValueError(f"{where}: the model has no batch norm with running statistics to compare against.")
    modes = _modes(model)
    try:
        model.eval()
        moments = collect_moments(model, norms, loader, num_batches, forward, where)
    finally:
        _restore_modes(modes)
    gaps = []
    for name, m in norms.items():
        acc = moments[name]
        if acc.count < 2:
            continue
        divisor = acc.count - 1 if getattr(m, "unbiased", True) else acc.count
        rm, rv = m.running_mean.double(), m.running_var.double()
        shift = (acc.mean - rm).abs() / torch.sqrt(rv + m.eps)
        ratio = (acc.m2 / divisor) / rv
        gaps.append(StatsGap(name or "<model>", acc.count, float(shift.max()), float(shift.mean()),
                             float(ratio.min()), float(ratio.max())))
    return gaps


@dataclass(frozen=True)
class TrainEvalGap:
    """Loss and accuracy on the same batches with norms in training vs eval mode.

    ``accuracy`` values are None when the outputs are not class scores ``(N, K)`` with integer
    targets ``(N,)``. ``loss_gap = eval_loss - train_loss``.
    """

    train_loss: float
    eval_loss: float
    train_accuracy: float | None
    eval_accuracy: float | None
    samples: int

    @property
    def loss_gap(self) -> float:
        return self.eval_loss - self.train_loss

    def __str__(self) -> str:
        acc = ""
        if self.train_accuracy is not None:
            acc = f", accuracy {self.train_accuracy:.4f} (train mode) vs {self.eval_accuracy:.4f} (eval mode)"
        return (f"loss {self.train_loss:.4g} (train mode) vs {self.eval_loss:.4g} (eval mode){acc}, "
                f"{self.samples} samples")


def train_eval_gap(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    norms_only: bool = True,
) -> TrainEvalGap:
    """Loss (and accuracy) of ``model`` with its norms in training mode vs eval mode.

    Each batch ``(x, y, ...)`` runs twice without gradients: once in eval mode, once with the
    normalization layers in training mode (batch statistics; with ``norms_only=False`` the whole
    model, dropout included). Running statistics, other buffers and modes are restored after
    every training-mode pass, so batches do not leak into each other and the model is unchanged.

    Args:
        model: a classifier or any model ``loss_fn`` scores.
        loader: ``(x, y, ...)`` batches.
        loss_fn: ``loss_fn(output, y)`` returning the batch mean (default cross-entropy).
        num_batches: how many (None: all).
        forward: ``forward(model, batch)`` returning the output (default ``model(x)``).
        norms_only: switch only the norms to training mode (the gap batch norm causes).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    >>> gap = train_eval_gap(net, data)
    >>> gap.samples, gap.eval_loss > 0
    (48, True)
    """
    where = "train_eval_gap"
    check_model(model, where)
    check_num_batches(num_batches, where)
    modes = _modes(model)
    saved = [(b, b.clone()) for b in model.buffers()]
    norms = [m for m in model.modules() if is_norm(m)]
    totals = {"train": [0.0, 0, 0], "eval": [0.0, 0, 0]}  # loss sum, correct, samples
    with_accuracy = True
    try:
        with torch.no_grad():
            for batch in iterate(loader, num_batches, where):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError(f"{where}: each batch must be (x, y, ...) with targets y, got {type(batch).__name__}.")
                target = batch[1]
                for mode in ("eval", "train"):
                    model.eval()
                    if mode == "train":
                        for m in (norms if norms_only else [model]):
                            m.train()
                    out = run_batch(model, batch, forward, where)
                    if mode == "train":
                        for buf, value in saved:
                            buf.copy_(value)
                    y = target.to(out.device) if isinstance(target, Tensor) else target
                    n = len(y)
                    totals[mode][0] += float(loss_fn(out, y)) * n
                    totals[mode][2] += n
                    classes = isinstance(y, Tensor) and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()
                    with_accuracy = with_accuracy and classes
                    if classes:
                        totals[mode][1] += int((out.argmax(1) == y).sum())
    finally:
        for buf, value in saved:
            buf.copy_(value)
        _restore_modes(modes)
    samples = totals["eval"][2]
    if samples == 0:
        raise ValueError(f"{where}: the loader gave no batches.")

    def accuracy(mode: str) -> float | None:
        return totals[mode][1] / samples if with_accuracy else None

    return TrainEvalGap(totals["train"][0] / samples, totals["eval"][0] / samples,
                        accuracy("train"), accuracy("eval"), samples)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def _probe_layers(model: nn.Module, layers: Match | None, default, where: str, label: str) -> dict[str, nn.Module]:
    found = dict(find_modules(model, (lambda n, m: default(m)) if layers is None else layers))
    if not found:
        rule = f"the default ({label})" if layers is None else repr(layers)
        raise ValueError(f"{where}: no layer of the model matches {rule}; pass layers= (names, a class or a predicate).")
    return {name or "<model>": m for name, m in found.items()}


class _Probe:
    _handles: list

    def remove(self) -> None:
        """Remove every hook; the recorded values stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ActivationPercentiles(_Probe):
    """Record percentiles of chosen layers' outputs at every forward call (a removable probe).

    Args:
        model: the model (hooks are added to it until :meth:`remove`).
        layers: which modules: qualified names, a class, or a predicate; default every
            normalization layer.
        q: the quantiles in [0, 1] (default 1st, 50th, 99th percentile).
        unit: record one unit only: ``output.reshape(N, -1)[:, unit]`` (Ioffe & Szegedy's Figure 1
            follows one sigmoid input); default every value.
        training: record only in this mode (True, False), or both (None, default).
        max_values: outputs with more values are subsampled evenly to this many.
        pool: keep the values themselves and give the percentiles of all calls together (one
            row; e.g. a test set evaluated in chunks), instead of one row per call.

    ``values[name]`` is a list with one ``(len(q),)`` tensor per call (with ``pool``, the values);
    :meth:`table` stacks them.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> with ActivationPercentiles(net, q=(0.5,)) as probe:
    ...     _ = net(torch.randn(64, 3))
    >>> probe.table()["1"].shape, len(net[1]._forward_hooks)
    (torch.Size([1, 1]), 0)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Match | None = None,
        q: tuple[float, ...] = (0.01, 0.5, 0.99),
        *,
        unit: int | None = None,
        training: bool | None = None,
        max_values: int = 1 << 20,
        pool: bool = False,
    ) -> None:
        if not q or any(not 0.0 <= float(v) <= 1.0 for v in q):
            raise ValueError(f"ActivationPercentiles: q must be quantiles in [0, 1], got {q!r}.")
        self.q = torch.tensor([float(v) for v in q], dtype=torch.float64)
        self.unit, self.training, self.max_values, self.pool = unit, training, max_values, pool
        self.layers = _probe_layers(model, layers, is_norm, "ActivationPercentiles", "normalization layers")
        self.values: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.training is not None and module.training != self.training:
                return
            if not isinstance(output, Tensor) or output.numel() == 0:
                return
            flat = output.detach()
            flat = flat.reshape(flat.shape[0], -1)[:, self.unit] if self.unit is not None else flat.reshape(-1)
            if flat.numel() > self.max_values:
                flat = flat[:: math.ceil(flat.numel() / self.max_values)]
            if self.pool:
                self.values[name].append(flat.to(torch.float64).cpu())
            else:
                self.values[name].append(torch.quantile(flat.to(torch.float64), self.q.to(flat.device)).cpu())

        return hook

    def table(self) -> dict[str, Tensor]:
        """``{name: (calls, len(q)) tensor}`` of everything recorded (with ``pool``: ``(1, len(q))``
        over all the values, or ``(0, len(q))`` before any)."""
        if self.pool:
            return {name: torch.quantile(torch.cat(v), self.q)[None] if v else torch.empty(0, len(self.q), dtype=torch.float64)
                    for name, v in self.values.items()}
        return {name: torch.stack(v) if v else torch.empty(0, len(self.q), dtype=torch.float64)
                for name, v in self.values.items()}

    def clear(self) -> None:
        for v in self.values.values():
            v.clear()


class GradNorms(_Probe):
    """Record per-layer gradient norms at every backward pass (a removable probe).

    ``of="parameters"`` (default): the 2-norm of the gradient of each layer's own parameters
    together (``sqrt(sum ||g_p||^2)``); ``of="outputs"``: the 2-norm of the gradient with respect
    to each layer's output. ``history`` has one ``{layer: norm}`` dict per backward pass.

    Args:
        model: the model.
        layers: qualified names, a class or a predicate; default every module with parameters of
            its own that require gradients (``"parameters"``) or every normalization layer
            (``"outputs"``).
        of: ``"parameters"`` or ``"outputs"``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    >>> probe = GradNorms(net)
    >>> net(torch.randn(8, 3)).sum().backward()
    >>> probe.remove()
    >>> sorted(probe.history[0]), len(probe.history)
    (['0', '1', '2'], 1)
    """

    def __init__(self, model: nn.Module, layers: Match | None = None, *, of: str = "parameters") -> None:
        if of not in ("parameters", "outputs"):
            raise ValueError(f"GradNorms: of must be 'parameters' or 'outputs', got {of!r}.")
        self.of = of
        if of == "parameters":
            default, label = (lambda m: any(p.requires_grad for p in m.parameters(recurse=False))), "modules with parameters"
        else:
            default, label = is_norm, "normalization layers"
        self.layers = _probe_layers(model, layers, default, "GradNorms", label)
        self.history: list[dict[str, float]] = []
        self._squares: dict[str, float] = {}
        self._queued = False
        self._handles = []
        for name, m in self.layers.items():
            if of == "parameters":
                for p in m.parameters(recurse=False):
                    if p.requires_grad:
                        self._handles.append(p.register_hook(self._add(name)))
            else:
                self._handles.append(m.register_full_backward_hook(
                    lambda mod, gin, gout, name=name: self._add(name)(gout[0]) if gout[0] is not None else None
                ))

    def _add(self, name: str):
        def hook(grad: Tensor):
            self._squares[name] = self._squares.get(name, 0.0) + float(grad.detach().double().square().sum())
            if not self._queued:
                # One record per backward pass: flush when the autograd engine finishes this one.
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
                self._queued = True

        return hook

    def _flush(self) -> None:
        self.history.append({name: math.sqrt(v) for name, v in self._squares.items()})
        self._squares, self._queued = {}, False

    def latest(self) -> dict[str, float]:
        """The norms of the last backward pass (empty before the first)."""
        return dict(self.history[-1]) if self.history else {}
