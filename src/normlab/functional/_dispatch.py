"""Which kernel computes a training-mode batch norm: torch's native kernels, or normlab's compiled
CPU kernels (:mod:`normlab.kernels`) for channel-innermost input, and the autograd functions
that normalize with statistics computed outside.

* :func:`kernel_updates_stats`: the common case in one call of torch's training kernel, which
  updates copies of the running statistics with torch's own momentum rule (torch's numbers to the
  bit); None where another path must serve.
* :func:`batch_stats_forward`: the output and the batch statistics, accurate for every layout:
  torch's kernel where it is accurate, the blocked statistics (:func:`channel_mean_var`, one pass
  of the compiled kernel or blocks of torch operations) for channel-innermost CPU input, and a
  subtract-first pass for ill-conditioned channels.
* :class:`_BatchNormGivenStats`, :class:`_NormalizeWithStats`: normalize with given statistics,
  backward through them as batch norm's (the gradient includes the statistics' dependence on x).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import kernels as _kernels
from ..stats import statistics_dtype
from ._numerics import (
    STABLE_MIN_ROWS,
    TRUE,
    blocked,
    cast,
    channel_innermost,
    channel_view,
    finite_flag,
    ill_conditioned,
    memory_format,
    precise,
    rows,
    traced,
    transformed,
    values_per_channel,
)

# Values per block in channel_mean_var (4 MiB of float32): large enough that the per-block calls
# cost little, small enough to stay in cache between the block's passes.
BLOCK_ELEMENTS = 1 << 20
# Rows in the sample whose mean shifts the data before the one-pass sums: enough that the
# shift lands within a fraction of a standard deviation of the mean, few enough to cost nothing.
SHIFT_SAMPLE_ROWS = 64


def kernels_for(matrix: Tensor, *others: Tensor | None):
    """The compiled channel-innermost kernels when they can take ``matrix`` (a contiguous CPU
    matrix, eager mode, no torch.func transform of it or of ``others``), else None."""
    if (not matrix.is_cpu or not matrix.is_contiguous() or traced(matrix, *others)
            or matrix.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        return None
    return _kernels.channels_last()


# --------------------------------------------------------------------------------------------
# Accurate statistics and gradient sums of channel-innermost input
# --------------------------------------------------------------------------------------------


def channel_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (``(N, C, *)``), accurate for any layout.

    With normlab's compiled kernel (:mod:`normlab.kernels`): one pass over ``x`` that sums
    ``d = x - shift`` and ``d^2`` in blocks of rows (block sums in float64), the shift being the
    mean of a sample of rows; ``mean = shift + E[d]``, ``var = E[d^2] - E[d]^2`` (a second pass
    where the shift was more than a standard deviation off). Without it, torch operations:
    ``mean = sum(x) / n`` with torch's cascaded sum, then block by block (no full-size
    temporary) the deviations ``d = x - mean`` give ``var = (sum(d^2) - sum(d)^2 / n) / n`` and
    the corrected mean ``mean + sum(d) / n`` (the corrected two-pass algorithm). Either way the
    variance is clamped at 0, a constant channel gets its value as the mean and a variance of
    0, and statistics are float32 for 16-bit input (float64 for float64 input).

    >>> import torch
    >>> x = torch.randn(1000, 4) + 1e4
    >>> mean, var = channel_mean_var(x)
    >>> bool(torch.allclose(var, x.double().var(0, unbiased=False).float(), rtol=1e-4))
    True
    """
    mean, var, _ = channel_moments(x)
    return mean, var


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`channel_mean_var` and the mean's rounding remainder: ``(mean, var, low)`` with
    ``mean + low`` the mean to about twice the statistics' precision (None under torch.func
    transforms). Subtracting ``mean`` from values near it and then ``low`` keeps a large offset's
    rounding out of the normalized values."""
    channels = x.shape[1]
    acc = statistics_dtype(x.dtype)
    rows2d = rows(x)
    n = rows2d.shape[0]
    kernels = kernels_for(rows2d) if n else None
    if kernels is not None:
        # One pass of sums of d = x - shift, the shift being the mean of a sample of rows:
        # mean = shift + E[d], var = E[d^2] - E[d]^2, as accurate as two passes while the shift is
        # within a standard deviation of the mean; the kernel passes again where it is not.
        mean, var, low = kernels.mean_var(rows2d, SHIFT_SAMPLE_ROWS)
        return mean, var, low
    mean = rows2d.sum(0, dtype=acc) / n
    block_rows = max(1, BLOCK_ELEMENTS // channels)
    if transformed(x):  # torch.func transforms cannot write into plain buffers: no out= here
        dev_sum, dev_sq = 0, 0
        for block in rows2d.split(block_rows):
            d = block.to(acc) - mean
            dev_sum, dev_sq = dev_sum + d.sum(0), dev_sq + torch.square(d).sum(0)
        var = ((dev_sq - dev_sum * dev_sum / n) / n).clamp_min(0)
        return mean + dev_sum / n, var, None
    # One cache-sized buffer reused for every block: no allocation (and no page faults) per block.
    buffer = torch.empty(min(block_rows, n), channels, dtype=acc, device=x.device)
    partial = torch.empty(channels, dtype=acc, device=x.device)
    dev_sum = torch.zeros(channels, dtype=acc, device=x.device)
    dev_sq = torch.zeros(channels, dtype=acc, device=x.device)
    for block in rows2d.split(block_rows):
        d = buffer[: block.shape[0]]
        torch.sub(block, mean, out=d)
        dev_sum.add_(torch.sum(d, 0, out=partial))
        dev_sq.add_(torch.sum(d.square_(), 0, out=partial))
    var = ((dev_sq - dev_sum * dev_sum / n) / n).clamp_min_(0)
    exact = mean.double() + dev_sum.double() / n
    mean = exact.to(acc)
    return mean, var, (exact - mean.double()).to(acc)


def channel_grad_sums(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of channel-innermost tensors, with
    torch's cascaded sum and the blocked, buffered scheme of :func:`channel_mean_var`."""
    channels, acc = x.shape[1], mean.dtype
    rows_dy, rows_x = rows(dy), rows(x)
    kernels = kernels_for(rows_x, rows_dy, mean) if rows_dy.dtype == rows_x.dtype else None
    if kernels is not None:
        sums = kernels.grad_sums(rows_dy.contiguous(), rows_x, mean).to(acc)
        return sums[0], sums[1]
    sum_dy = rows_dy.sum(0, dtype=acc)
    block_rows = max(1, BLOCK_ELEMENTS // channels)
    if transformed(dy, x, mean):
        dot = 0
        for xb, dyb in zip(rows_x.split(block_rows), rows_dy.split(block_rows)):
            dot = dot + ((xb.to(acc) - mean) * dyb).sum(0)
        return sum_dy, dot
    buffer = torch.empty(min(block_rows, rows_x.shape[0]), channels, dtype=acc, device=x.device)
    partial = torch.empty(channels, dtype=acc, device=x.device)
    dot = torch.zeros(channels, dtype=acc, device=x.device)
    for xb, dyb in zip(rows_x.split(block_rows), rows_dy.split(block_rows)):
        d = buffer[: xb.shape[0]]
        torch.sub(xb, mean, out=d)
        dot.add_(torch.sum(d.mul_(dyb), 0, out=partial))
    return sum_dy, dot


def _kernel_backward(
    kernels, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Training-mode batch-norm gradients of channel-innermost CPU input by the compiled kernels:
    one pass for ``sum(dy)`` and ``sum(dy * (x - mean))``, one for
    ``dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))``."""
    gx, sum_dy, dot = kernels.backward(rows(dy).contiguous(), rows(x), mean, invstd, weight, bool(needs[0]))
    if needs[0]:
        gx = gx.reshape(x.movedim(1, -1).shape).movedim(-1, 1)  # x's strides, x's layout
    gw = (dot * invstd.double()).to(weight.dtype) if needs[1] else None
    gb = sum_dy.to(weight.dtype if weight is not None else x.dtype) if needs[2] else None
    return (gx if needs[0] else None), gw, gb


# --------------------------------------------------------------------------------------------
# Normalizing with given statistics
# --------------------------------------------------------------------------------------------


def normalize_subtract_first(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    mean_low: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with ``x - mean`` formed first, which is
    exact for values near the mean, then torch's inference kernel; differentiable in x, weight
    and bias. 16-bit input is shifted in float32. ``mean_low``, where given, is what the mean
    lost to rounding (the exact mean is ``mean + mean_low``): the kernel subtracts it from the
    shifted values, where it is not lost again."""
    shifted = x.to(mean.dtype) - channel_view(mean, x)
    low = torch.zeros_like(mean) if mean_low is None else mean_low
    out = torch.batch_norm(shifted, weight, bias, low, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return out.to(x.dtype)


def normalize_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> Tensor:
    """Batch norm with given statistics as constants (eval mode): torch's inference kernel, or
    subtract-first for ill-conditioned statistics."""
    if ill_conditioned(mean, var, eps):
        return normalize_subtract_first(x, mean, var, weight, bias, eps)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


try:  # what torch's Function.apply does to its arguments outside transforms
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - other torch versions: torch's own apply serves
    _unwrap_dead_wrappers = None


class _BatchNormGivenStats(torch.autograd.Function):
    """Training-mode batch norm with batch statistics computed outside (no gradient through them).

    Forward normalizes with torch's inference kernel, or subtract-first when the statistics are
    ill-conditioned; backward is torch's own training-mode backward given the mean and 1/std, so
    the gradient includes the statistics' dependence on x exactly as torch's does.
    """

    generate_vmap_rule = True

    @classmethod
    def apply(cls, *args):
        # torch's Function.apply binds the arguments to forward's signature on every call
        # (inspect.signature, ~30 us: a tenth of a small batch norm). Every call here passes all
        # eight positionally, so outside torch.func transforms go straight to the C++ apply.
        if len(args) == 8 and _unwrap_dead_wrappers is not None and not torch._C._are_functorch_transforms_active():
            return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))
        return super().apply(*args)

    @staticmethod
    def forward(x, weight, bias, mean, var, eps, subtract_first, mean_low):
        if subtract_first:
            return normalize_subtract_first(x, mean, var, weight, bias, eps, mean_low)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, mean, var, eps = inputs[:6]
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format(x))
        if torch.is_grad_enabled():  # create_graph=True: torch's backward has a double backward
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]),
            )
            return gx, gw, gb, None, None, None, None, None
        kernels = kernels_for(rows(x), grad_out, weight, mean) if grad_out.dtype == x.dtype else None
        if kernels is not None:
            return (*_kernel_backward(kernels, grad_out, x, weight, mean, invstd, ctx.needs_input_grad[:3]),
                    None, None, None, None, None)
        gx, _, _ = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [ctx.needs_input_grad[0], False, False],
        )
        gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # torch's kernel sums channel-innermost gradients naively; these sums are blocked.
            sum_dy, sum_dy_centered = channel_grad_sums(grad_out, x, mean)
            gw = (sum_dy_centered * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
            gb = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None, None


class _NormalizeWithStats(torch.autograd.Function):
    """Training-mode batch norm with the batch statistics given, on torch's kernels.

    Forward: torch's inference kernel, ``(x - mean) / sqrt(var + eps) * weight + bias`` in one
    pass. Backward: torch's training-mode backward given the mean and 1 / sigma, so dx includes
    the statistics' dependence on x as batch norm's does, and the kernel's own parameter sums.
    For the float32/float64 input whose statistics torch's kernels compute accurately
    (:func:`fast_kernel_ok`); :class:`_BatchNormGivenStats` serves the others.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format(x))
        # Under create_graph=True this op is recorded: torch's backward has a double backward.
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]),
        )
        return gx, gw, gb, None, None, None


def fast_kernel_ok(x: Tensor, stable_stats: bool, n: int, *others: Tensor | None) -> bool:
    """Whether torch's plain kernels serve: float32/float64 eager input whose statistics they
    compute accurately (not the blocked statistics of channel-innermost CPU input), with plain
    eager ``others`` (the parameters and running statistics: a weight under torch.func.grad is
    wrapped where the input is not)."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and not traced(x, *others)
        and not (stable_stats and channel_innermost(x) and n >= STABLE_MIN_ROWS)
    )


# --------------------------------------------------------------------------------------------
# Training-mode forwards
# --------------------------------------------------------------------------------------------


def _inplace_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    # Fallback for torch versions without the functional op: the same kernel, writing into copies.
    mean, var = running_mean.clone(), running_var.clone()
    out = torch.batch_norm(x, weight, bias, mean, var, training, momentum, eps, torch.backends.cudnn.enabled)
    return out, None, None, mean, var


_functional_batch_norm = getattr(torch.ops.aten, "_native_batch_norm_legit_functional", _inplace_batch_norm)


def _native_training_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    n = values_per_channel(x)
    zeros = torch.zeros(x.shape[1], dtype=statistics_dtype(x.dtype), device=x.device)
    # With momentum 1 the kernel's "new running statistics" are the batch mean and unbiased
    # variance. The functional form returns them instead of writing into its arguments, which
    # is what lets vmap batch this call.
    out, _, _, mean, var = _functional_batch_norm(x, weight, bias, zeros, zeros, True, 1.0, eps)
    return out, mean, var * ((n - 1) / n)


def batch_stats_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, stable_stats: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: ``(output, batch_mean, biased batch_var)``.

    torch's kernel does the work where it is accurate. Channel-innermost CPU layouts get
    :func:`channel_mean_var` statistics instead, and ill-conditioned channels (a large mean
    next to a small spread, e.g. a constant channel) are normalized subtract-first.
    """
    if blocked(x, stable_stats):
        mean, var, low = channel_moments(x.detach())
        out = _BatchNormGivenStats.apply(x, weight, bias, mean, var, eps, ill_conditioned(mean, var, eps), low)
        return out, mean, var
    out, mean, var = _native_training_forward(x, weight, bias, eps)
    if ill_conditioned(mean, var, eps):
        # Batch norm does not change when a constant is subtracted per channel (nor do its
        # gradients), so run the kernel again on x - mean, where it loses nothing (rare: a
        # constant channel, or a large offset next to a small spread).
        shift = mean.detach()
        out, mean, var = _native_training_forward(x.to(shift.dtype) - channel_view(shift, x), weight, bias, eps)
        out, mean = out.to(x.dtype), mean + shift
    return out, mean, var


def accurate_mean_var(x: Tensor, eps: float, stable_stats: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel batch mean, biased variance and the mean's rounding remainder (or None; see
    :func:`channel_moments`) of a detached ``x``, as accurate as :func:`batch_stats_forward`'s:
    blocked statistics for channel-innermost CPU input, torch's kernel otherwise, computed again
    after a shift for ill-conditioned channels."""
    if blocked(x, stable_stats):
        return channel_moments(x)
    _, mean, var = _native_training_forward(x, None, None, eps)
    if ill_conditioned(mean, var, eps):
        shift = mean
        _, mean, var = _native_training_forward(x.to(shift.dtype) - channel_view(shift, x), None, None, eps)
        mean = mean + shift
    return mean, var, None


def kernel_updates_stats(x, weight, bias, running_mean, running_var, momentum, eps, stable_stats):
    """The common case in one kernel call: torch's training kernel updates copies of the running
    statistics with torch's own momentum rule, so the numbers are torch's to the bit.

    Returns ``(output, batch_mean, invstd, new_mean, new_var, updated)``, or None where another
    path must serve: under torch.func transforms of any argument (the kernel writes into its
    arguments, and its statistics are read on the host), for the blocked statistics of
    channel-innermost input, for ill-conditioned channels, and (on the CPU) for a batch with
    non-finite statistics.
    """
    if transformed(x, weight, bias, running_mean, running_var) or blocked(x, stable_stats):
        return None
    acc = statistics_dtype(x.dtype)
    mean = running_mean.clone() if running_mean.dtype == acc else running_mean.to(acc)
    var = running_var.clone() if running_var.dtype == acc else running_var.to(acc)
    out, save_mean, save_invstd = torch.native_batch_norm(x, weight, bias, mean, var, True, momentum, eps)
    mean, var = cast(mean, running_mean.dtype), cast(var, running_var.dtype)
    if x.is_cpu and not traced(x):
        # One number answers both questions on the CPU: the largest |mean| / std is finite
        # exactly when the statistics are, and says whether the kernel lost precision.
        if not precise(save_mean, save_invstd):
            return None
        return out, save_mean, save_invstd, mean, var, TRUE
    updated = finite_flag(save_mean, save_invstd)
    return (out, save_mean, save_invstd, torch.where(updated, mean, running_mean),
            torch.where(updated, var, running_var), updated)
