"""Recompute batch norms' running statistics exactly, from data ("precise BN").

The exponential moving average a batch norm keeps during training lags behind the weights
(Wu & Johnson 2021, "Rethinking batch in BatchNorm"): after the last steps, after pruning or
weight averaging, or on a new domain, the running statistics no longer describe what the
layer sees. :func:`recalibrate_bn` replaces them with the population statistics of the given
batches: the norms normalize with each batch's statistics (as in training; other layers such
as dropout stay in eval mode) while every norm's input is accumulated in float64 with Chan et
al.'s parallel formula, so that for batches of sizes ``n_b`` with means ``m_b`` and sums of
squared deviations ``M2_b``::

    N    = sum_b n_b
    mean = sum_b n_b m_b / N                                  (weighted by batch size)
    M2   = sum_b M2_b + sum_b n_b (m_b - mean)^2              (within + between batches)
    running_mean = mean,  running_var = M2 / (N - 1)          (unbiased, as torch stores it;
                                                               M2 / N for unbiased=False layers)

Masks: a norm called with a ``mask`` (normlab's ``forward(input, mask)``, True at valid
positions) contributes its valid positions only, so ``n_b`` counts valid positions and padding
never enters the statistics, as in the layer's own training step. The mask is read from each
norm's call, so a model that builds a mask per layer (downsampled after a strided conv, say)
recalibrates each norm with its own.

Non-finite batches: a batch in which any norm's input is NaN or infinite (at its valid
positions) is left out of every norm's statistics, so all norms are calibrated on the same
batches; the skipped batches are counted, warned about once (:class:`NonFiniteStatisticsWarning`)
and reported. If every batch is non-finite, that is an error.

Under ``torch.distributed`` the per-rank ``(n, mean, M2)`` are gathered and pooled
(:func:`normlab.functional.sync.gather_moments`, as the synchronized layers pool theirs), so
every rank gets the statistics of the union of its batches. Every mode and momentum is restored afterwards.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from ..functional.sync import gather_moments, world_size
from ..layers.base import NonFiniteStatisticsWarning
from ..layers.kinds import norm_kind
from ..stats import Moments
from .walk import check_model, find_modules

__all__ = ["RecalibrationReport", "RecalibrationResult", "call_mask", "mask_position_of", "recalibrate_bn",
           "recalibrated_norms"]

Forward = Callable[[nn.Module, Any], Any]


def _recalibrates(name: str, module: nn.Module) -> bool:
    """Which modules recalibrate_bn gives new statistics: trainable batch norms that track
    running statistics, as :func:`normlab.layers.kinds.norm_kind` recognizes them (torch's,
    normlab's, other libraries' norm-act subclasses whose formula checks out); frozen norms keep
    theirs. The one place this is decided."""
    kind = norm_kind(module)
    return (kind is not None and kind.family == "batch" and kind.unknown is None
            and getattr(module, "running_mean", None) is not None)


def recalibrated_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs :func:`recalibrate_bn` gives new statistics, in
    ``named_modules`` order.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3))
    >>> [name for name, _ in recalibrated_norms(net)]
    ['1']
    """
    return find_modules(model, _recalibrates)


def _unverified(model: nn.Module) -> list[str]:
    """Batch norms left alone because normlab cannot tell what they compute."""
    return [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
            if (kind := norm_kind(m)) is not None and kind.family == "batch" and kind.unknown]


class _Moments(Moments):
    """A layer's input moments in float64, merged batch by batch."""

    __slots__ = ()

    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Merge ``x`` ``(N, C, *)``, or only its positions where ``mask`` (the input's shape
        without dimension 1, size-1 dimensions broadcast; checked by the layer) is True."""
        if x.dim() < 2 or x.numel() == 0:
            return
        xd = x.detach().to(torch.float64)
        axes = [0, *range(2, x.dim())]
        if mask is None:
            var, mean = torch.var_mean(xd, dim=axes, correction=0)
            n = xd.numel() // xd.shape[1]
            self.merge(n, mean, var * n)
            return
        valid = mask.detach().to(x.device).unsqueeze(1).expand(x.shape[0], 1, *x.shape[2:])
        n = int(valid.sum())
        if n == 0:
            return
        # torch.where, not a product with the mask: the padding may hold NaN or inf.
        mean = torch.where(valid, xd, 0).sum(axes) / n
        centered = torch.where(valid, xd - mean.view(1, -1, *[1] * (x.dim() - 2)), 0)
        self.merge(n, mean, centered.square().sum(axes))

    def finite(self) -> Tensor:
        """A bool scalar tensor on the statistics' device (no host sync): every merged value was
        finite (a NaN or inf input makes the mean or M2 non-finite). Only after a merge."""
        return torch.isfinite(self.mean).all() & torch.isfinite(self.m2).all()


def mask_position_of(module: nn.Module) -> int | None:
    """The positional index of ``mask`` in ``module``'s forward (after ``self``), or None when
    its forward takes no mask (torch's batch norms)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):  # a forward inspect cannot read: no mask to look for
        return None
    return params.index("mask") if "mask" in params else None


def call_mask(args: tuple, kwargs: dict, position: int | None) -> Tensor | None:
    """The ``mask`` a norm was called with (by keyword, or at ``position`` from
    :func:`mask_position_of`), or None: how recalibration and test-time adaptation read it."""
    if position is None:
        return None
    if "mask" in kwargs:
        return kwargs["mask"]
    return args[position] if len(args) > position else None


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _mask_parameter(model: nn.Module) -> str | None:
    """The name of a parameter of ``model.forward`` that looks like a mask, if any."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in names if "mask" in name.lower()), None)


def run_batch(model: nn.Module, batch: Any, forward: Forward | None, where: str) -> Any:
    """Call ``model`` on one loader item: ``forward(model, batch)`` if given; else a tensor is
    the input and a tuple/list's first element is (``(x, y)`` from a DataLoader).

    The default call passes the first element only, so a tuple that also holds a bool tensor,
    for a model whose forward takes a mask, is refused: the mask would be dropped and the
    padding counted as data."""
    if forward is not None:
        return forward(model, batch)
    device = _model_device(model)
    if isinstance(batch, Tensor):
        return model(_to(batch, device))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        dropped = [i for i, b in enumerate(batch[1:], 1) if isinstance(b, Tensor) and b.dtype == torch.bool]
        name = _mask_parameter(model) if dropped else None
        if name is not None:
            raise TypeError(
                f"{where}: the loader item is a {type(batch).__name__} whose element {dropped[0]} is a bool "
                f"tensor, and the model's forward takes {name!r}, but the default call model(batch[0]) "
                f"would drop it and count the padding as data. Say how to call the model, e.g. "
                f"forward=lambda model, batch: model(batch[0], {name}=batch[{dropped[0]}]) (moving both to the "
                f"model's device if needed), or forward=lambda model, batch: model(batch[0]) if it is no mask."
            )
        return model(_to(batch[0], device))
    raise TypeError(
        f"{where}: cannot tell the model's input in a loader item of type {type(batch).__name__}; "
        f"the default takes a tensor or the first element of a tuple/list (x, y). Pass "
        f"forward=lambda model, batch: model(...) to say how to call the model."
    )


def check_num_batches(num_batches: object, where: str) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"{where}: num_batches must be a positive int or None (the whole loader), "
                        f"got {type(num_batches).__name__} {num_batches!r}.")
    if num_batches <= 0:
        raise ValueError(f"{where}: num_batches must be a positive int or None (the whole loader), got {num_batches}.")


def iterate(loader: Iterable, num_batches: int | None, where: str) -> Iterable:
    """The first ``num_batches`` items of ``loader`` (all when None); an error if it runs short."""
    count = 0
    for batch in loader:
        if num_batches is not None and count >= num_batches:
            return
        count += 1
        yield batch
    if num_batches is not None and count < num_batches:
        raise ValueError(
            f"{where}: the loader yielded only {count} batch(es), but num_batches={num_batches} were "
            f"asked for; pass num_batches={count} (or None for the whole loader) or a longer loader."
        )


@dataclass
class _Collected:
    """What :func:`_collect` gathered: per-layer moments of the kept batches; the counts are
    over all ranks, ``skipped_indices`` are positions in this process's loader."""

    moments: dict[str, _Moments]
    batches: int = 0
    skipped: int = 0
    skipped_indices: list[int] = field(default_factory=list)
    nonfinite_layers: dict[str, None] = field(default_factory=dict)  # an ordered set, first seen first


def _collect(
    model: nn.Module,
    layers: dict[str, nn.Module],
    loader: Iterable,
    num_batches: int | None,
    forward: Forward | None,
    where: str,
    skip_nonfinite: bool,
) -> _Collected:
    """Run the batches through ``model`` (no gradients) and accumulate every layer's input
    moments (valid positions only where the layer is called with a mask), all-reduced over
    torch.distributed ranks when it is initialized. With ``skip_nonfinite``, a batch in which
    any layer's input is not finite is left out of every layer's moments and counted."""
    result = _Collected({name: _Moments() for name in layers})
    # Each batch is staged first, so that a batch found non-finite at any layer (NaN usually
    # appears at one norm and spreads to the later ones) can be left out of all of them.
    staged = {name: _Moments() for name in layers}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, acc: _Moments, position: int | None) -> None:
        # A forward hook, not a pre-hook: it runs after the layer has checked input and mask.
        acc.add(args[0] if args else kwargs["input"], call_mask(args, kwargs, position))

    handles = [
        module.register_forward_hook(
            lambda m, a, k, o, acc=staged[name], pos=mask_position_of(module): hook(m, a, k, o, acc, pos),
            with_kwargs=True,
        )
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            for index, batch in enumerate(iterate(loader, num_batches, where)):
                run_batch(model, batch, forward, where)
                result.batches += 1
                if skip_nonfinite:
                    finite = {name: acc.finite() for name, acc in staged.items() if acc.count}
                    device = next(iter(finite.values())).device if finite else None
                    if finite and not bool(torch.stack([f.to(device) for f in finite.values()]).all()):
                        result.skipped += 1  # one host sync per batch above; per layer only here
                        result.skipped_indices.append(index)
                        result.nonfinite_layers.update((name, None) for name, ok in finite.items() if not bool(ok))
                        for acc in staged.values():
                            acc.reset()
                        continue
                for name, acc in staged.items():
                    result.moments[name].merge(acc.count, acc.mean, acc.m2)
                    acc.reset()
    finally:
        for handle in handles:
            handle.remove()
    _all_reduce(result, layers, where)
    return result


def collect_moments(
    model: nn.Module,
    layers: dict[str, nn.Module],
    loader: Iterable,
    num_batches: int | None,
    forward: Forward | None,
    where: str,
) -> dict[str, _Moments]:
    """Run the batches through ``model`` (no gradients) and accumulate every layer's input
    moments (valid positions only for a layer called with a mask), all-reduced over
    torch.distributed ranks when it is initialized. Non-finite batches are kept (a diagnosis
    should see them)."""
    return _collect(model, layers, loader, num_batches, forward, where, skip_nonfinite=False).moments


def _all_reduce(result: _Collected, layers: dict[str, nn.Module], where: str) -> None:
    """Replace each rank's moments and batch counts with those of all ranks together (one
    all_gather, :func:`normlab.functional.sync.gather_moments`, as the synchronized layers pool)."""
    if world_size() == 1:
        return
    moments = result.moments
    ref = next(iter(layers.values()))
    device = ref.running_mean.device if getattr(ref, "running_mean", None) is not None else _model_device(ref)
    pooled, (batches, skipped) = gather_moments(
        [(m.count, m.mean, m.m2) for m in moments.values()], [layers[name].num_features for name in moments],
        sums=(result.batches, result.skipped), device=device, name=where,
    )
    result.batches, result.skipped = int(round(batches)), int(round(skipped))
    for m, (total, mean, m2) in zip(moments.values(), pooled):
        m.reset()
        m.merge(int(round(float(total))), mean, m2)


@dataclass(frozen=True)
class RecalibrationReport:
    """What :func:`recalibrate_bn` did.

    Attributes:
        batches: loader items run through the model (summed over ranks under torch.distributed).
        skipped: of those, the batches left out because some norm's input was not finite.
        skipped_indices: positions, in this process's loader, of its skipped batches.
        values: per recalibrated norm, the values per channel its new statistics pool (valid
            positions only for a norm called with a mask).
        unreached: norms no kept batch reached; their statistics were left as they were.
    """

    batches: int
    skipped: int
    skipped_indices: tuple[int, ...] = ()
    values: dict[str, int] = field(default_factory=dict)
    unreached: tuple[str, ...] = ()

    @property
    def used(self) -> int:
        """The batches whose values entered the statistics."""
        return self.batches - self.skipped

    def __str__(self) -> str:
        head = f"recalibrated {len(self.values)} batch norm(s) from {self.used} of {self.batches} batch(es)"
        if self.skipped:
            head += f"; skipped {self.skipped} non-finite (indices {list(self.skipped_indices)})"
        lines = [head]
        lines += [f"  {name or '<model>'}: {count} values per channel" for name, count in self.values.items()]
        lines += [f"  {name or '<model>'}: not reached, left as it was" for name in self.unreached]
        return "\n".join(lines)


class RecalibrationResult(NamedTuple):
    """``(model, report)``: the recalibrated model and its :class:`RecalibrationReport`."""

    model: nn.Module
    report: RecalibrationReport


@overload
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int | None = None, *,
                   forward: Forward | None = None, inplace: bool = False,
                   return_report: Literal[False] = False) -> nn.Module: ...


@overload
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int | None = None, *,
                   forward: Forward | None = None, inplace: bool = False,
                   return_report: Literal[True]) -> RecalibrationResult: ...


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    *,
    forward: Forward | None = None,
    inplace: bool = False,
    return_report: bool = False,
) -> nn.Module | RecalibrationResult:
    """A copy of ``model`` whose batch norms hold the exact population statistics of the batches.

    Args:
        model: a model with batch norms (torch's or normlab's; frozen ones are left as they are).
        loader: an iterable of batches: tensors, ``(x, y, ...)`` tuples, or anything ``forward``
            takes. Inputs are moved to the model's device.
        num_batches: how many loader items to run (skipped non-finite ones included); None
            (default) uses the whole loader. A loader that runs out first is an error (the
            statistics are left unchanged).
        forward: ``forward(model, batch)`` runs the model on one batch (default: ``model(x)``).
            For padded data, pass the mask the way the model takes it, e.g.
            ``forward=lambda model, b: model(b[0], mask=b[1])``: each norm the model calls with
            a mask contributes its valid positions only. (The default call refuses a tuple
            holding a bool tensor when the model's forward takes a mask, rather than drop it.)
        inplace: recalibrate ``model`` itself instead of a deep copy.
        return_report: also return a :class:`RecalibrationReport` (batches used and skipped,
            values per norm), as ``RecalibrationResult(model, report)``.

    Returns:
        The model with new ``running_mean`` / ``running_var`` (``num_batches_tracked``, modes,
        momenta and ``on_nonfinite`` as they were), or ``(model, report)`` with
        ``return_report=True``. A norm that no kept batch reached keeps its statistics, with a
        warning.

    Warns:
        NonFiniteStatisticsWarning: some batches were non-finite and skipped (the count and
            their indices are in the message and the report).
        RuntimeWarning: a norm that no kept batch reached.

    Raises:
        ValueError: no batch norm with running statistics; ``num_batches`` larger than the
            loader; every batch non-finite; a norm that saw fewer than 2 values per channel.
        TypeError: a loader item the default call cannot take (pass ``forward``).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    >>> data = [torch.randn(10, 3) for _ in range(5)]
    >>> fresh = recalibrate_bn(net, data)
    >>> h = net[0](torch.cat(data)).double()
    >>> torch.allclose(fresh[1].running_var.double(), h.var(0), atol=1e-5), fresh.training
    (True, False)
    >>> fresh, report = recalibrate_bn(net, data, return_report=True)
    >>> print(report)
    recalibrated 1 batch norm(s) from 5 of 5 batch(es)
      1: 50 values per channel
    """
    where = "recalibrate_bn"
    check_model(model, where)
    check_num_batches(num_batches, where)
    target = model if inplace else copy.deepcopy(model)
    norms = dict(recalibrated_norms(target))
    unverified = _unverified(target)
    if unverified:
        warnings.warn(
            f"{where}: left {', '.join(unverified)} as they are: normlab cannot tell what they compute "
            f"(norm_kind's check of their eval formula failed), so new running statistics might not be "
            f"what they normalize with.", UserWarning, stacklevel=2)
    if not norms:
        raise ValueError(
            f"{where}: the model has no batch norm with running statistics (torch.nn.BatchNorm*d or "
            f"normlab's with track_running_stats=True), so there is nothing to recalibrate."
        )
    modes = {m: m.training for m in target.modules()}
    saved = {name: (m.momentum, getattr(m, "on_nonfinite", None),
                    {k: b.clone() for k, b in m.named_buffers(recurse=False)})
             for name, m in norms.items()}
    try:
        target.eval()  # dropout and the like as at inference; the norms use batch statistics
        for name, m in norms.items():
            m.train()
            m.momentum = 0.0  # their own update must not move what we restore below
            if saved[name][1] is not None:
                # Non-finite batches are this function's to skip and report, once; a layer's own
                # "raise" would abort the recalibration and its "warn" would repeat per batch.
                m.on_nonfinite = "skip"
        collected = _collect(target, norms, loader, num_batches, forward, where, skip_nonfinite=True)
    finally:
        for name, m in norms.items():
            momentum, policy, buffers = saved[name]
            m.momentum = momentum
            if policy is not None:
                m.on_nonfinite = policy
            for key, value in buffers.items():
                getattr(m, key).copy_(value)
        for m, mode in modes.items():
            m.training = mode
    moments = collected.moments
    if collected.batches and collected.skipped == collected.batches:
        layers = ", ".join(map(repr, collected.nonfinite_layers)) or "a norm on another rank"
        raise ValueError(
            f"{where}: every one of the {collected.batches} batch(es) was non-finite (NaN or inf in the "
            f"input of {layers}), so there is nothing to compute the statistics from; they were left "
            f"unchanged. Check the data for NaN/inf, or the model for an overflow before that norm "
            f"(torch.autograd.detect_anomaly, normlab.name_layers)."
        )
    if collected.skipped:
        shown = collected.skipped_indices[:10]
        more = ", ..." if len(collected.skipped_indices) > len(shown) else ""
        here = f"batch indices here: {', '.join(map(str, shown))}{more}" if shown else "all on other ranks"
        warnings.warn(
            f"{where}: skipped {collected.skipped} of {collected.batches} batch(es) whose input to "
            f"{', '.join(map(repr, collected.nonfinite_layers)) or 'a norm'} was not finite (NaN or inf); "
            f"they are left out of every norm's statistics ({here}).",
            NonFiniteStatisticsWarning, stacklevel=2,
        )
    unreached = [name for name, acc in moments.items() if acc.count == 0]
    too_few = [name for name, acc in moments.items() if acc.count == 1]
    if too_few:
        raise ValueError(
            f"{where}: {', '.join(map(repr, too_few))} saw a single value per channel in all the batches; "
            f"the unbiased variance needs at least 2. Use more or larger batches."
        )
    if unreached:
        kept = f" among the {collected.batches - collected.skipped} kept" if collected.skipped else ""
        warnings.warn(
            f"{where}: no batch{kept} reached {', '.join(map(repr, unreached))} (not called in the forward "
            f"for these inputs); their running statistics were left as they were.",
            RuntimeWarning, stacklevel=2,
        )
    with torch.no_grad():
        for name, m in norms.items():
            acc = moments[name]
            if acc.count < 2:
                continue
            divisor = acc.count - 1 if getattr(m, "unbiased", True) else acc.count
            m.running_mean.copy_(acc.mean.to(m.running_mean))
            m.running_var.copy_((acc.m2 / divisor).to(m.running_var))
    if not return_report:
        return target
    report = RecalibrationReport(
        batches=collected.batches, skipped=collected.skipped, skipped_indices=tuple(collected.skipped_indices),
        values={name: acc.count for name, acc in moments.items() if acc.count >= 2}, unreached=tuple(unreached),
    )
    return RecalibrationResult(target, report)
