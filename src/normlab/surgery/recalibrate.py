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

Under ``torch.distributed`` the per-rank ``(n, n m, M2)`` are all-reduced, so every rank gets
the statistics of the union of its batches. Every mode and momentum is restored afterwards.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..stats import Moments, combine_moments
from .walk import find_modules

__all__ = ["recalibrate_bn"]

Forward = Callable[[nn.Module, Any], Any]


class _Moments(Moments):
    """A layer's input moments in float64, merged batch by batch."""

    __slots__ = ()

    def add(self, x: Tensor) -> None:
        if x.dim() < 2 or x.numel() == 0:
            return
        xd = x.detach().to(torch.float64)
        var, mean = torch.var_mean(xd, dim=[0, *range(2, x.dim())], correction=0)
        n = xd.numel() // xd.shape[1]
        self.merge(n, mean, var * n)


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


def run_batch(model: nn.Module, batch: Any, forward: Forward | None, where: str) -> Any:
    """Call ``model`` on one loader item: ``forward(model, batch)`` if given; else a tensor is
    the input and a tuple/list's first element is (``(x, y)`` from a DataLoader)."""
    if forward is not None:
        return forward(model, batch)
    device = _model_device(model)
    if isinstance(batch, Tensor):
        return model(_to(batch, device))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
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


def collect_moments(
    model: nn.Module,
    layers: dict[str, nn.Module],
    loader: Iterable,
    num_batches: int | None,
    forward: Forward | None,
    where: str,
) -> dict[str, _Moments]:
    """Run the batches through ``model`` (no gradients) and accumulate every layer's input
    moments, all-reduced over torch.distributed ranks when it is initialized."""
    moments = {name: _Moments() for name in layers}
    handles = [
        module.register_forward_pre_hook(lambda m, args, acc=moments[name]: acc.add(args[0]))
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            for batch in iterate(loader, num_batches, where):
                run_batch(model, batch, forward, where)
    finally:
        for handle in handles:
            handle.remove()
    _all_reduce(moments, layers)
    return moments


def _all_reduce(moments: dict[str, _Moments], layers: dict[str, nn.Module]) -> None:
    """Replace each rank's moments with those of all ranks together (one all_gather)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    ref = next(iter(layers.values()))
    device = ref.running_mean.device if getattr(ref, "running_mean", None) is not None else _model_device(ref)
    sizes = [layers[name].num_features for name in moments]
    parts = []
    for m, size in zip(moments.values(), sizes):
        zeros = torch.zeros(size, dtype=torch.float64, device=device)
        parts += [torch.tensor([float(m.count)], dtype=torch.float64, device=device),
                  zeros if m.count == 0 else m.mean.to(device), zeros if m.count == 0 else m.m2.to(device)]
    packed = torch.cat(parts)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    table = torch.stack(gathered)
    offset = 0
    for (name, m), size in zip(moments.items(), sizes):
        counts = table[:, offset]
        means = table[:, offset + 1 : offset + 1 + size]
        m2s = table[:, offset + 1 + size : offset + 1 + 2 * size]
        offset += 1 + 2 * size
        total, mean, m2 = combine_moments(counts, means, m2s)
        m.reset()
        m.merge(int(round(float(total))), mean, m2)


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    *,
    forward: Forward | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose batch norms hold the exact population statistics of the batches.

    Args:
        model: a model with batch norms (torch's or normlab's; frozen ones are left as they are).
        loader: an iterable of batches: tensors, ``(x, y, ...)`` tuples, or anything ``forward``
            takes. Inputs are moved to the model's device.
        num_batches: how many batches to use; None (default) uses the whole loader. A loader
            that runs out first is an error (the statistics are left unchanged).
        forward: ``forward(model, batch)`` runs the model on one batch (default: ``model(x)``).
        inplace: recalibrate ``model`` itself instead of a deep copy.

    Returns:
        The model with new ``running_mean`` / ``running_var`` (``num_batches_tracked``, modes and
        momenta as they were). A norm that no batch reached keeps its statistics, with a warning.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    >>> data = [torch.randn(10, 3) for _ in range(5)]
    >>> fresh = recalibrate_bn(net, data)
    >>> h = net[0](torch.cat(data)).double()
    >>> torch.allclose(fresh[1].running_var.double(), h.var(0), atol=1e-5), fresh.training
    (True, False)
    """
    where = "recalibrate_bn"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}.")
    check_num_batches(num_batches, where)
    target = model if inplace else copy.deepcopy(model)
    norms = dict(find_modules(
        target, lambda name, m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ))
    if not norms:
        raise ValueError(
            f"{where}: the model has no batch norm with running statistics (torch.nn.BatchNorm*d or "
            f"normlab's with track_running_stats=True), so there is nothing to recalibrate."
        )
    modes = {m: m.training for m in target.modules()}
    saved = {name: (m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
             for name, m in norms.items()}
    try:
        target.eval()  # dropout and the like as at inference; the norms use batch statistics
        for m in norms.values():
            m.train()
            m.momentum = 0.0  # their own update must not move what we restore below
        moments = collect_moments(target, norms, loader, num_batches, forward, where)
    finally:
        for name, m in norms.items():
            m.momentum = saved[name][0]
            for key, value in saved[name][1].items():
                getattr(m, key).copy_(value)
        for m, mode in modes.items():
            m.training = mode
    unreached = [name for name, acc in moments.items() if acc.count == 0]
    too_few = [name for name, acc in moments.items() if acc.count == 1]
    if too_few:
        raise ValueError(
            f"{where}: {', '.join(map(repr, too_few))} saw a single value per channel in all the batches; "
            f"the unbiased variance needs at least 2. Use more or larger batches."
        )
    if unreached:
        warnings.warn(
            f"{where}: no batch reached {', '.join(map(repr, unreached))} (not called in the forward "
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
    return target
