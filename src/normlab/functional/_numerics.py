"""The numerics every normlab function shares, each in one place.

* dtypes: statistics in :func:`normlab.stats.statistics_dtype` (float32 for 16-bit data), and
  :func:`cast`, which skips the no-op conversion;
* channel views and counts: per-channel views, values per channel, channel-innermost layouts,
  memory formats, the ``(values per channel, C)`` matrix view;
* the argument checks, each with one message that names the caller (a function's name, or the
  layer's label that a layer passes in): input rank, per-channel shapes, masks, and the rule that
  batch statistics need more than one value per channel (:func:`check_batch_count`);
* the finite-statistics flag (:func:`finite_flag`) and the one running-statistics update guarded
  by it (:func:`guarded_update`);
* the precision condition (:data:`PRECISE_CONDITION`, :func:`precise`, :func:`ill_conditioned`):
  how many standard deviations the mean farthest from zero lies from it, which decides whether
  ``x * a + b`` forms keep their precision;
* the probes for tracing (``torch.compile``, ``torch.export``) and ``torch.func`` transforms,
  imported from :mod:`normlab._tracing`, their one home (the layers ask them too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import checks as _checks
from .. import stats as _stats
from .._tracing import compiling, traced, transformed  # noqa: F401  (the one home: normlab._tracing)

# The ``updated`` flag of the eager CPU fast paths, where the answer is known on the host; shared,
# so treat result flags as read-only.
TRUE = torch.ones((), dtype=torch.bool)
# Below this many values per channel torch's naive channel-innermost sum is as accurate as the
# blocked one (error ~ rows * eps at worst), and the blocked path's extra calls would cost more
# than they save.
STABLE_MIN_ROWS = 256
# Above this condition number |mean| / std the kernels' y = x*a + (beta - mean*a) loses more than
# ~5 bits to cancellation (error ~ eps * |mean| / std); normalize subtract-first then.
PRECISE_CONDITION = 32.0
NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# dtypes, views, counts
# --------------------------------------------------------------------------------------------


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Checking first is cheaper than Tensor.to's own no-op path, on every call of every layer.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def match_input(param: Tensor | None, input: Tensor) -> Tensor | None:
    """A parameter in the dtype torch's layer/group/RMS-norm kernels take with ``input``: float32
    for 16-bit input (they then accumulate in float32), the input's dtype otherwise."""
    if param is None or param.dtype == input.dtype:
        return param
    return param.to(_stats.statistics_dtype(input.dtype))


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel ``(C,)`` tensor shaped to broadcast over ``x`` (``(N, C, *)``)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension of ``x`` but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def channel_innermost(x: Tensor) -> bool:
    """Whether ``x`` is a CPU tensor whose channels are innermost in memory (2-D input,
    channels_last): torch's CPU batch-norm kernels reduce these with a plain running sum whose
    error grows with the batch; NCHW-contiguous input is fine."""
    return x.is_cpu and x.shape[1] > 1 and x.stride(1) == 1


def blocked(x: Tensor, stable_stats: bool) -> bool:
    """Whether ``x``'s statistics and gradient sums take the blocked path (``stable_stats``,
    channel-innermost CPU input with enough values per channel for it to matter)."""
    return stable_stats and channel_innermost(x) and values_per_channel(x) >= STABLE_MIN_ROWS


def memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def rows(t: Tensor) -> Tensor:
    """``t`` (``(N, C, *)``) as a ``(values per channel, C)`` matrix: a view for channel-innermost
    layouts, a copy otherwise."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The (empty) output for an empty batch, still connected to weight and bias, so they get
    zero gradients as with torch and DDP sees every parameter used."""
    out = input.clone()
    if weight is not None:
        out = out * channel_view(weight, input).to(input.dtype)
    if bias is not None:
        out = out + channel_view(bias, input).to(input.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Finite statistics, the guarded update, the precision condition
# --------------------------------------------------------------------------------------------


def finite_flag(a: Tensor, b: Tensor) -> Tensor:
    """A bool scalar tensor on ``a``'s device: True when every value of ``a`` and ``b`` (same
    shape) is finite. No host synchronization, no data-dependent branch: callers select with
    ``torch.where(flag, new, old)`` and count with ``count + flag``, which CUDA graphs and
    ``torch.compile(fullgraph=True)`` take as they are. A sum that overflows to inf reads as not
    finite; such a batch would poison the running statistics anyway.

    >>> import torch
    >>> bool(finite_flag(torch.ones(2), torch.tensor([1.0, float("nan")])))
    False
    """
    total = torch.sum(a + b)
    if compiling():
        # Not ``total * 0 == 0``: Inductor folds a product with the integer 0 to the constant 0
        # (joint-graph constant folding, blind to NaN and inf), which made every batch "finite"
        # in compiled code. isfinite keeps its meaning under every backend.
        return torch.isfinite(total)
    # Eager: a sum times zero is zero exactly when the sum is finite (NaN and inf give NaN). Two
    # small ops, against isfinite's four kernels on accelerators (==, abs, !=, &).
    return total.mul_(0) == 0


def guarded_update(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    n: int | Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    unbiased: bool,
    known_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One running-statistics update from a batch's mean, biased variance and count ``n`` (an
    int, or a tensor such as a count pooled across processes: then Bessel's correction stays on
    the device), kept at the old values when the batch statistics are not finite, without a host
    synchronization: ``(new_mean, new_var, new_num_batches_tracked, updated)``. ``known_finite``:
    the caller checked them finite on the host (``updated`` is then :data:`TRUE`)."""
    count = num_batches_tracked if num_batches_tracked is not None else 0
    updated = TRUE if known_finite else finite_flag(batch_mean, batch_var)
    var = batch_var
    if isinstance(n, Tensor) and unbiased:
        var, unbiased = batch_var * (n / (n - 1).clamp_min(1)), False
    new_mean, new_var = _stats.update_running_stats(running_mean, running_var, batch_mean, var, n, momentum,
                                                    count, unbiased)
    if updated is TRUE:
        return new_mean, new_var, None if num_batches_tracked is None else num_batches_tracked + 1, TRUE
    # torch.where keeps the last good statistics without asking the host which branch to take.
    new_mean = torch.where(updated, new_mean, running_mean)
    new_var = torch.where(updated, new_var, running_var)
    return new_mean, new_var, None if num_batches_tracked is None else num_batches_tracked + updated, updated


def precise(mean: Tensor, invstd: Tensor) -> bool:
    """The precision condition on the host: ``max_c |mean_c| * invstd_c <= PRECISE_CONDITION``,
    the mean farthest from zero within so many standard deviations of it. False also where a
    statistic is not finite (NaN compares False), so one read says both that the statistics are
    finite and that the kernels' ``x * a + b`` keeps its precision. NumPy computes it on these
    few CPU values in a fraction of torch's per-call cost.

    >>> import torch
    >>> precise(torch.tensor([1.0, -6.0]), torch.tensor([1.0, 0.5])), precise(torch.tensor([float("nan")]), torch.ones(1))
    (True, False)
    """
    m = mean.detach() if mean.requires_grad else mean
    s = invstd.detach() if invstd.requires_grad else invstd
    if m.dtype not in NUMPY_DTYPES or s.dtype not in NUMPY_DTYPES:
        m, s = m.double(), s.double()
    return float(np.abs(m.numpy() * s.numpy()).max(initial=0.0)) <= PRECISE_CONDITION


def ill_conditioned(mean: Tensor, var: Tensor, eps: float) -> bool:
    """The precision condition from the variance, ``|mean| / sqrt(var + eps) > PRECISE_CONDITION``
    for some channel: whether to normalize subtract-first. Checked in eager CPU code only:
    elsewhere the answer would cost a host synchronization (CUDA) or a data-dependent branch
    (compile, vmap). False for non-finite statistics (the finite flag handles those)."""
    if not mean.is_cpu or compiling():
        return False
    try:  # |mean| / sqrt(var + eps) > K  <=>  mean^2 - K^2 var > K^2 eps, in few small ops
        limit = PRECISE_CONDITION**2
        return float(mean.square().sub_(var, alpha=limit).max()) > limit * eps
    except RuntimeError:  # under torch.func transforms: no data-dependent control flow
        return False


# --------------------------------------------------------------------------------------------
# Argument checks, one message each
# --------------------------------------------------------------------------------------------


def check_input(input: Tensor, name: str) -> None:
    """Batch statistics need a floating-point tensor ``(N, C)`` or ``(N, C, *)``."""
    _checks.check_tensor(input, name)
    if input.dim() < 2:
        raise ValueError(
            f"{name}: input must be (N, C) or (N, C, *), got a {input.dim()}-D tensor of shape "
            f"{tuple(input.shape)}; add a batch dimension with x.unsqueeze(0)."
        )


def check_batch_args(input: Tensor, name: str, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, eps: float) -> None:
    """What every batch norm checks first: a floating-point input and its rank, eps, one value per
    channel in each per-channel tensor, floating-point running statistics, both or neither."""
    check_input(input, name)
    _checks.check_eps(eps, name)
    _checks.check_float_stats(name, running_mean=running_mean, running_var=running_var)
    check_per_channel(input, input.shape[1], name, running_mean=running_mean, running_var=running_var,
                      weight=weight, bias=bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: give both running_mean and running_var, or neither.")


def check_per_channel(x: Tensor, channels: int, name: str, **tensors: Tensor | None) -> None:
    for key, t in tensors.items():
        if t is not None and t.shape != (channels,):
            raise ValueError(
                f"{name}: {key} must have shape ({channels},), one value per channel of the "
                f"input {tuple(x.shape)} (dimension 1), got {tuple(t.shape)}."
            )


def check_update(momentum: float | None, num_batches_tracked: Tensor | None, name: str) -> None:
    """The momentum of a running-statistics update, checked where an update happens."""
    _stats.check_momentum(momentum, owner=name)
    if momentum is None and num_batches_tracked is None:
        raise ValueError(
            f"{name}: momentum=None (cumulative average) needs num_batches_tracked, the count "
            f"of batches already averaged; pass torch.tensor(0) for a fresh layer."
        )


def check_single_sample(single_sample: object, name: str) -> None:
    if single_sample not in ("error", "running"):
        raise ValueError(f"{name}: single_sample must be one of ['error', 'running'], got {single_sample!r}.")


def mask_view(input: Tensor, mask: object, name: str) -> Tensor:
    """Check ``mask`` against ``input`` and return it as ``(N, 1, *)``, to broadcast over channels."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else f"a {type(mask).__name__}"
        raise TypeError(
            f"{name}: mask must be a bool tensor, True at valid positions, got {got}; convert with "
            f"mask.bool(), or build it from lengths: torch.arange(L) < lengths[:, None]."
        )
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if mask.dim() != len(expected) or any(m not in (1, e) for m, e in zip(mask.shape, expected)):
        raise ValueError(
            f"{name}: mask must have the input's shape without the channel dimension, {expected} "
            f"(size-1 dimensions broadcast), got {tuple(mask.shape)} for input {tuple(input.shape)}; "
            f"e.g. (N, L) for (N, C, L) input, (N,) for (N, C), (N, 1) to mask whole samples of (N, C, L)."
        )
    if mask.device != input.device:
        raise ValueError(
            f"{name}: mask is on {mask.device} and the input on {input.device}; move it with "
            f"mask.to(x.device)."
        )
    return mask.unsqueeze(1)


def mask_count(input: Tensor, view: Tensor) -> int:
    """Valid positions per channel: the mask's True entries times the sizes it broadcasts over.
    On the host (one synchronization on accelerators): it decides the rule below and the divisor
    ``n - 1`` of the unbiased variance."""
    repeat = math.prod(size for dim, size in enumerate(input.shape) if dim != 1 and view.shape[dim] == 1)
    return int(view.sum()) * repeat


def check_batch_count(count: int | float, input: Tensor, name: str, mask: Tensor | None = None,
                      where: str = "") -> None:
    """Batch statistics need more than one value per channel (``count``: values per channel, or
    valid positions under ``mask``): the rule's one message, naming the caller."""
    if count >= 2:
        return
    got = f"input of shape {tuple(input.shape)}"
    if mask is not None:
        got += f" with {int(count)} valid position(s) per channel under its mask of shape {tuple(mask.shape)}"
    raise ValueError(
        f"{name}: training needs more than one value per channel to compute batch statistics, got "
        f"{got}{where}. Fixes: drop the last partial batch (DataLoader(..., drop_last=True)); use a "
        f"larger batch; use a batch-independent norm (normlab.GroupNorm, LayerNorm); or normalize such "
        f"batches with the running statistics, leaving them unchanged (a normlab layer built with "
        f"single_sample='running', or the functional's single_sample='running'; eval mode)."
    )
