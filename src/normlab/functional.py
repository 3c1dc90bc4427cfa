"""Pure normalization functions for torch: statistics in, statistics out.

This module mirrors :mod:`normlab.reference` (the float64 NumPy oracle) name for name. Every
function is pure: it never modifies its arguments, and a function that updates running
statistics returns the new ones. That makes them usable under ``torch.func.functional_call``,
``torch.func.vmap`` and ``torch.compile``. Where the semantics coincide with a native torch
kernel (``torch.batch_norm``, ``F.layer_norm``, ``F.group_norm``, ``F.instance_norm``,
``F.rms_norm``) the kernel does the work; normlab adds numerics, checks and purity around it:

* statistics of float16/bfloat16 input are accumulated in float32, the output keeps the input's
  dtype, and running statistics keep their own (float32) dtype;
* a batch whose statistics are not finite leaves the running statistics as they were (the
  returned ``updated`` flag, a bool tensor, says so), with a select on the device: no host
  synchronization and no data-dependent branch, so the guard holds in eager code, under
  ``torch.compile`` (``fullgraph=True`` included) and in CUDA graphs;
* on the CPU, where torch's kernel sums channel-innermost data (2-D input, channels_last)
  naively and loses precision with large batches or offsets, the batch statistics and the
  gradient's sums are accumulated blockwise (:func:`channel_mean_var`), by normlab's compiled
  kernel (:mod:`normlab.kernels`) in one pass, or by torch operations where it is unavailable.

Example::

    >>> import torch
    >>> from normlab import functional as NF
    >>> x = torch.randn(8, 3, 4, 4)
    >>> out = NF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True,
    ...                    num_batches_tracked=torch.tensor(0))
    >>> out.output.shape, out.running_mean.shape, int(out.num_batches_tracked)
    (torch.Size([8, 3, 4, 4]), torch.Size([3]), 1)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels as _kernels
from . import stats as _stats
from .stats import update_running_stats

__all__ = [
    "BatchNormResult",
    "BatchStats",
    "batch_norm_with_stats",
    "batch_renorm",
    "ghost_batch_norm",
    "ghost_batch_sizes",
    "InstanceNormResult",
    "batch_norm",
    "channel_mean_var",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "update_running_stats",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The ``updated`` flag of the CPU fast path, where the answer is known on the host; shared, so
# treat result flags as read-only.
_TRUE = torch.ones((), dtype=torch.bool)
# Values per block in channel_mean_var (4 MiB of float32): large enough that the per-block calls
# cost little, small enough to stay in cache between the block's passes.
_BLOCK_ELEMENTS = 1 << 20
# Below this many values per channel torch's naive channel-innermost sum is as accurate as ours
# (error ~ rows * eps at worst), and the blocked path's extra calls would cost more than they save.
_STABLE_MIN_ROWS = 256


class BatchNormResult(NamedTuple):
    """What :func:`batch_norm` returns.

    Attributes:
        output: the normalized tensor, same shape and dtype as the input.
        running_mean, running_var: the new running statistics (the given ones when no update).
        num_batches_tracked: the new batch count, or what was given (possibly None).
        updated: a bool scalar tensor, True when the running statistics took this batch in and
            False when they were kept because the batch statistics were not finite; None when no
            update was attempted (eval mode, or no running statistics).
    """

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    updated: Tensor | None


class InstanceNormResult(NamedTuple):
    """What :func:`instance_norm` returns; fields as in :class:`BatchNormResult`."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    updated: Tensor | None


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF_DTYPES else x.dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Checking first is cheaper than Tensor.to's own no-op path, on every call of every layer.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_per_channel(x: Tensor, channels: int, where: str, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != (channels,):
            raise ValueError(
                f"{where}: {name} must have shape ({channels},), one value per channel of the "
                f"input {tuple(x.shape)} (dimension 1), got {tuple(t.shape)}."
            )


def _values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _channel_innermost(x: Tensor) -> bool:
    # torch's CPU batch-norm kernels reduce channel-innermost layouts (2-D input, channels_last)
    # with a plain running sum whose error grows with the batch; NCHW-contiguous input is fine.
    return x.device.type == "cpu" and x.shape[1] > 1 and x.stride(1) == 1


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
    mean, var, _ = _channel_moments(x)
    return mean, var


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`channel_mean_var` and the mean's rounding remainder: ``(mean, var, low)`` with
    ``mean + low`` the mean to about twice the statistics' precision (None under torch.func
    transforms). Subtracting ``mean`` from values near it and then ``low`` keeps a large offset's
    rounding out of the normalized values."""
    channels = x.shape[1]
    acc = _acc_dtype(x)
    rows2d = _rows(x)
    n = rows2d.shape[0]
    kernels = _kernels_for(rows2d) if n else None
    if kernels is not None:
        # One pass of sums of d = x - shift, the shift being the mean of a sample of rows:
        # mean = shift + E[d], var = E[d^2] - E[d]^2, as accurate as two passes while the shift is
        # within a standard deviation of the mean; the kernel passes again where it is not.
        mean, var, low = kernels.mean_var(rows2d, _SHIFT_SAMPLE_ROWS)
        return mean, var, low
    mean = rows2d.sum(0, dtype=acc) / n
    block_rows = max(1, _BLOCK_ELEMENTS // channels)
    if _transformed(x):  # torch.func transforms cannot write into plain buffers: no out= here
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


# Rows in the sample whose mean shifts the data before the one-pass sums: enough that the
# shift lands within a fraction of a standard deviation of the mean, few enough to cost nothing.
_SHIFT_SAMPLE_ROWS = 64


def _kernels_for(rows: Tensor):
    """The compiled channel-innermost kernels when they can take ``rows`` (a contiguous CPU
    matrix, eager mode, no torch.func transform), else None."""
    if (rows.device.type != "cpu" or not rows.is_contiguous() or _compiling() or _transformed(rows)
            or rows.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        return None
    return _kernels.channels_last()


# Above this condition number |mean| / std the fused kernels' y = x*a + (beta - mean*a) loses
# more than ~5 bits to cancellation (error ~ eps * |mean| / std); normalize subtract-first then.
_PRECISE_CONDITION = 32.0


def _ill_conditioned(mean: Tensor, var: Tensor, eps: float) -> bool:
    """Whether to normalize subtract-first. Checked in eager CPU code only: elsewhere the answer
    would cost a host synchronization (CUDA) or a data-dependent branch (compile, vmap)."""
    if mean.device.type != "cpu" or _compiling():
        return False
    try:  # |mean| / sqrt(var + eps) > K  <=>  mean^2 - K^2 var > K^2 eps, in few small ops
        limit = _PRECISE_CONDITION**2
        return float(mean.square().sub_(var, alpha=limit).max()) > limit * eps
    except RuntimeError:  # under torch.func transforms: no data-dependent control flow
        return False


_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _transformed(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform (vmap, grad, ...). Never while
    torch.compile traces (it handles the transforms itself and cannot trace the check)."""
    return _is_functorch_wrapped is not None and not _compiling() and _is_functorch_wrapped(x)


def _compiling() -> bool:
    return _is_compiling is not None and _is_compiling()


def _finite_flag(a: Tensor, b: Tensor) -> Tensor:
    """A bool scalar tensor on ``a``'s device: True when every value of ``a`` and ``b`` (same
    shape) is finite. No host synchronization, no data-dependent branch: callers select with
    ``torch.where(flag, new, old)`` and count with ``count + flag``, which CUDA graphs and
    ``torch.compile(fullgraph=True)`` take as they are. A sum that overflows to inf reads as not
    finite; such a batch would poison the running statistics anyway.

    >>> import torch
    >>> bool(_finite_flag(torch.ones(2), torch.tensor([1.0, float("nan")])))
    False
    """
    total = torch.sum(a + b)
    if _compiling():
        # Not ``total * 0 == 0``: Inductor folds a product with the integer 0 to the constant 0
        # (joint-graph constant folding, blind to NaN and inf), which made every batch "finite"
        # in compiled code. isfinite keeps its meaning under every backend.
        return torch.isfinite(total)
    # Eager: a sum times zero is zero exactly when the sum is finite (NaN and inf give NaN). Two
    # small ops, against isfinite's four kernels on accelerators (==, abs, !=, &).
    return total.mul_(0) == 0


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _normalize_subtract_first(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    mean_low: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with ``x - mean`` formed first, which is
    exact for values near the mean, then torch's inference kernel; differentiable in x, weight
    and bias. 16-bit input is shifted in float32. ``mean_low``, where given, is what the mean
    lost to rounding (the exact mean is ``mean + mean_low``): the kernel subtracts it from the
    shifted values, where it is not lost again."""
    shifted = x.to(mean.dtype) - _channel_view(mean, x)
    low = torch.zeros_like(mean) if mean_low is None else mean_low
    out = torch.batch_norm(shifted, weight, bias, low, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return out.to(x.dtype)


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
            return _normalize_subtract_first(x, mean, var, weight, bias, eps, mean_low)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, mean, var, eps = inputs[:6]
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        if torch.is_grad_enabled():  # create_graph=True: torch's backward has a double backward
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]),
            )
            return gx, gw, gb, None, None, None, None, None
        kernels = _kernels_for(_rows(x)) if grad_out.dtype == x.dtype else None
        if kernels is not None:
            return (*_kernel_backward(kernels, grad_out, x, weight, mean, invstd, ctx.needs_input_grad[:3]),
                    None, None, None, None, None)
        gx, _, _ = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [ctx.needs_input_grad[0], False, False],
        )
        gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # torch's kernel sums channel-innermost gradients naively; these sums are blocked.
            sum_dy, sum_dy_centered = _channel_grad_sums(grad_out, x, mean)
            gw = (sum_dy_centered * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
            gb = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None, None


def _rows(t: Tensor) -> Tensor:
    """``t`` (``(N, C, *)``) as a ``(values per channel, C)`` matrix: a view for channel-innermost
    layouts, a copy otherwise."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _kernel_backward(
    kernels, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Training-mode batch-norm gradients of channel-innermost CPU input by the compiled kernels:
    one pass for ``sum(dy)`` and ``sum(dy * (x - mean))``, one for
    ``dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))``."""
    gx, sum_dy, dot = kernels.backward(_rows(dy).contiguous(), _rows(x), mean, invstd, weight, bool(needs[0]))
    if needs[0]:
        gx = gx.reshape(x.movedim(1, -1).shape).movedim(-1, 1)  # x's strides, x's layout
    gw = (dot * invstd.double()).to(weight.dtype) if needs[1] else None
    gb = sum_dy.to(weight.dtype if weight is not None else x.dtype) if needs[2] else None
    return (gx if needs[0] else None), gw, gb


def _channel_grad_sums(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of channel-innermost tensors, with
    torch's cascaded sum and the blocked, buffered scheme of :func:`channel_mean_var`."""
    channels, acc = x.shape[1], mean.dtype
    rows_dy, rows_x = _rows(dy), _rows(x)
    kernels = _kernels_for(rows_x) if rows_dy.dtype == rows_x.dtype else None
    if kernels is not None:
        sums = kernels.grad_sums(rows_dy.contiguous(), rows_x, mean).to(acc)
        return sums[0], sums[1]
    sum_dy = rows_dy.sum(0, dtype=acc)
    block_rows = max(1, _BLOCK_ELEMENTS // channels)
    if _transformed(x):
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


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _batch_stats_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, stable_stats: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: ``(output, batch_mean, biased batch_var)``.

    torch's kernel does the work where it is accurate. Channel-innermost CPU layouts get
    :func:`channel_mean_var` statistics instead, and ill-conditioned channels (a large mean
    next to a small spread, e.g. a constant channel) are normalized subtract-first.
    """
    n = _values_per_channel(x)
    if stable_stats and _channel_innermost(x) and n >= _STABLE_MIN_ROWS:
        mean, var, low = _channel_moments(x.detach())
        out = _BatchNormGivenStats.apply(x, weight, bias, mean, var, eps, _ill_conditioned(mean, var, eps), low)
        return out, mean, var
    out, mean, var = _native_training_forward(x, weight, bias, eps)
    if _ill_conditioned(mean, var, eps):
        # Batch norm does not change when a constant is subtracted per channel (nor do its
        # gradients), so run the kernel again on x - mean, where it loses nothing (rare: a
        # constant channel, or a large offset next to a small spread).
        shift = mean.detach()
        out, mean, var = _native_training_forward(x.to(shift.dtype) - _channel_view(shift, x), weight, bias, eps)
        out, mean = out.to(x.dtype), mean + shift
    return out, mean, var


def _native_training_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    n = _values_per_channel(x)
    zeros = torch.zeros(x.shape[1], dtype=_acc_dtype(x), device=x.device)
    # With momentum 1 the kernel's "new running statistics" are the batch mean and unbiased
    # variance. The functional form returns them instead of writing into its arguments, which
    # is what lets vmap batch this call.
    out, _, _, mean, var = _functional_batch_norm(x, weight, bias, zeros, zeros, True, 1.0, eps)
    return out, mean, var * ((n - 1) / n)


def _kernel_updates_stats(x, weight, bias, running_mean, running_var, momentum, eps, stable_stats):
    """The common case in one kernel call: torch's training kernel updates copies of the running
    statistics with torch's own momentum rule, so the numbers are torch's to the bit.

    Returns ``(output, new_mean, new_var, updated)``, or None where another path must serve:
    under torch.func transforms (the kernel writes into its arguments), for the blocked
    statistics of channel-innermost input, for ill-conditioned channels, and (on the CPU) for a
    batch with non-finite statistics.
    """
    if _transformed(x) or (stable_stats and _channel_innermost(x) and _values_per_channel(x) >= _STABLE_MIN_ROWS):
        return None
    acc = _acc_dtype(x)
    mean = running_mean.clone() if running_mean.dtype == acc else running_mean.to(acc)
    var = running_var.clone() if running_var.dtype == acc else running_var.to(acc)
    out, save_mean, save_invstd = torch.native_batch_norm(x, weight, bias, mean, var, True, momentum, eps)
    mean, var = _cast(mean, running_mean.dtype), _cast(var, running_var.dtype)
    if x.device.type == "cpu" and not _compiling():
        # One number answers both questions on the CPU: the largest |mean| / std is finite
        # exactly when the statistics are, and says whether the kernel lost precision. NumPy
        # computes it on these few values in a fraction of torch's per-call cost.
        worst = float(np.max(np.abs(save_mean.detach().numpy() * save_invstd.detach().numpy())))
        if not worst <= _PRECISE_CONDITION:
            return None
        return out, mean, var, _TRUE
    updated = _finite_flag(save_mean, save_invstd)
    return out, torch.where(updated, mean, running_mean), torch.where(updated, var, running_var), updated


def _inplace_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    # Fallback for torch versions without the functional op: the same kernel, writing into copies.
    mean, var = running_mean.clone(), running_var.clone()
    out = torch.batch_norm(x, weight, bias, mean, var, training, momentum, eps, torch.backends.cudnn.enabled)
    return out, None, None, mean, var


_functional_batch_norm = getattr(
    torch.ops.aten, "_native_batch_norm_legit_functional", _inplace_batch_norm
)


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The (empty) output for an empty batch, still connected to weight and bias, so they get
    zero gradients as with torch and DDP sees every parameter used."""
    out = input.clone()
    if weight is not None:
        out = out * _channel_view(weight, input).to(input.dtype)
    if bias is not None:
        out = out + _channel_view(bias, input).to(input.dtype)
    return out


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
    mask: Tensor | None = None,
) -> BatchNormResult:
    """Batch normalization over all dimensions but the channel dimension 1.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the batch's mean and biased
    variance when ``training`` (or when no running statistics are given), else with
    ``running_mean``/``running_var``. In training, the running statistics are updated as
    :func:`normlab.stats.update_running_stats` says and returned; the arguments stay untouched.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` or None (always use batch statistics).
        weight, bias: ``(C,)`` affine parameters γ and β, or None (1 and 0).
        training: use and update batch statistics.
        momentum: weight of the new batch in the running average (torch's meaning); None for
            the cumulative average, which needs ``num_batches_tracked``.
        eps: added to the variance. Default 1e-5 as torch.
        num_batches_tracked: int64 scalar tensor, batches already in the running statistics.
        unbiased: store the unbiased batch variance in ``running_var`` (torch's convention).
        stable_stats: on the CPU, compute the batch statistics and gradient sums of
            channel-innermost input (2-D, channels_last) as accurately as for NCHW input
            (:func:`channel_mean_var`; normlab's compiled kernel, :mod:`normlab.kernels`, does
            it in torch's time, the torch-op fallback at some cost); False uses torch's kernel
            and its accuracy (see benchmarks/README.md).
        mask: optional bool tensor, True at valid positions, for padded sequences and point
            sets: the input's shape without the channel dimension (``(N,)`` for ``(N, C)``,
            ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for ``(N, C, H, W)``); size-1
            dimensions broadcast (``(N, 1)`` masks whole samples of ``(N, C, L)``). The batch
            statistics are over the valid positions only (``n`` = their number, also in the
            unbiased running variance), exactly batch norm over the concatenation of the valid
            parts; the output is 0 at padded positions, which get no gradient and may hold
            anything, NaN included. Training needs at least 2 valid positions. The mask path
            composes torch ops (about 2-3.5x the time of the unmasked kernel on the CPU) and
            reads the valid count on the host (one synchronization on accelerators, a graph
            break under torch.compile; vmap works with an unbatched mask). Without a mask
            nothing changes.

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0]])
    >>> r = batch_norm(x, torch.zeros(1), torch.ones(1), training=True, momentum=0.5)
    >>> r.output.squeeze(1), r.running_mean, r.running_var
    (tensor([-1.0000,  1.0000]), tensor([1.]), tensor([1.5000]))
    """
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm: input must be (N, C) or (N, C, *), got a {input.dim()}-D tensor of shape "
            f"{tuple(input.shape)}; add a batch dimension with x.unsqueeze(0)."
        )
    channels = input.shape[1]
    _check_per_channel(
        input, channels, "batch_norm",
        running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
    )
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither.")
    _stats.check_momentum(momentum, owner="batch_norm")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "batch_norm: momentum=None (cumulative average) needs num_batches_tracked, the count "
            "of batches already averaged; pass torch.tensor(0) for a fresh layer."
        )
    use_batch_stats = training or running_mean is None
    if mask is not None:
        return _masked_batch_norm(input, mask, running_mean, running_var, weight, bias, use_batch_stats,
                                  momentum, eps, num_batches_tracked, unbiased)
    n = _values_per_channel(input)
    if use_batch_stats and n == 1:
        raise ValueError(
            f"batch_norm: training needs more than one value per channel to compute a batch "
            f"variance, got input of shape {tuple(input.shape)}. Use a larger batch, drop the last "
            f"partial batch (DataLoader(drop_last=True)), or normalize with running statistics."
        )
    acc = _acc_dtype(input)
    w, b = _cast(weight, acc), _cast(bias, acc)
    if n == 0:  # an empty batch: an empty output (as torch), statistics and count untouched
        return BatchNormResult(_empty_output(input, w, b), running_mean, running_var, num_batches_tracked, None)
    if not use_batch_stats:
        mean, var = _cast(running_mean, acc), _cast(running_var, acc)
        if _ill_conditioned(mean, var, eps):
            out = _normalize_subtract_first(input, mean, var, w, b, eps)
        else:
            out = torch.batch_norm(input, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if running_mean is None:  # batch statistics, nothing to update
        out = _batch_stats_forward(input, w, b, eps, stable_stats)[0]
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)

    if isinstance(momentum, float) and unbiased:
        fast = _kernel_updates_stats(input, w, b, running_mean, running_var, momentum, eps, stable_stats)
        if fast is not None:
            out, new_mean, new_var, updated = fast
            new_count = None if num_batches_tracked is None else num_batches_tracked + (1 if updated is _TRUE else updated)
            return BatchNormResult(out, new_mean, new_var, new_count, updated)

    out, batch_mean, batch_var = _batch_stats_forward(input, w, b, eps, stable_stats)
    count = num_batches_tracked if num_batches_tracked is not None else 0
    new_mean, new_var = update_running_stats(
        running_mean, running_var, batch_mean, batch_var, n, momentum, count, unbiased
    )
    updated = _finite_flag(batch_mean, batch_var)
    # torch.where keeps the last good statistics without asking the host which branch to take.
    new_mean = torch.where(updated, new_mean, running_mean)
    new_var = torch.where(updated, new_var, running_var)
    new_count = None if num_batches_tracked is None else num_batches_tracked + updated
    return BatchNormResult(out, new_mean, new_var, new_count, updated)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> InstanceNormResult:
    """Instance normalization: statistics per sample and channel over the spatial dimensions.

    ``y[n, c] = (x[n, c] - mean[n, c]) / sqrt(var[n, c] + eps) * weight[c] + bias[c]``. With
    running statistics and ``use_input_stats``, they move towards the batch average of the
    per-instance means and unbiased variances (torch's rule) and are returned; the arguments
    stay untouched. With ``use_input_stats=False`` every instance uses the running statistics.

    Args:
        input: ``(N, C, L, ...)`` with at least one spatial dimension.
        running_mean, running_var: ``(C,)`` or None.
        weight, bias: ``(C,)`` or None.

    Returns:
        :class:`InstanceNormResult` ``(output, running_mean, running_var, updated)``.

    >>> import torch
    >>> instance_norm(torch.arange(6.0).reshape(1, 2, 3)).output
    tensor([[[-1.2247,  0.0000,  1.2247],
             [-1.2247,  0.0000,  1.2247]]])
    """
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: input must be (N, C, L, ...) with at least one spatial dimension, got "
            f"shape {tuple(input.shape)}; for an unbatched (C, L) input use x.unsqueeze(0)."
        )
    _check_per_channel(
        input, input.shape[1], "instance_norm",
        running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
    )
    _stats.check_momentum(momentum, owner="instance_norm")
    if momentum is None:
        raise ValueError("instance_norm: momentum=None is not supported (torch has no cumulative "
                         "average for instance norm); give a float in [0, 1].")
    spatial = math.prod(input.shape[2:])
    if use_input_stats and spatial == 1:
        raise ValueError(
            f"instance_norm: each instance needs more than one spatial value to compute a variance, "
            f"got input of shape {tuple(input.shape)}."
        )
    acc = _acc_dtype(input)
    w, b = _cast(weight, acc), _cast(bias, acc)
    if input.numel() == 0:
        return InstanceNormResult(_empty_output(input, w, b), running_mean, running_var, None)
    if acc != input.dtype and w is None and running_mean is not None:
        # torch's kernel casts running statistics to the input's dtype unless given float32
        # affine parameters; the identity ones keep the running averages in float32.
        w = torch.ones(input.shape[1], dtype=acc, device=input.device)
        b = torch.zeros_like(w)
    if running_mean is None or not use_input_stats:
        rm, rv = _cast(running_mean, acc), _cast(running_var, acc)
        out = F.instance_norm(input, rm, rv, w, b, use_input_stats, momentum, eps)
        return InstanceNormResult(out, running_mean, running_var, None)
    rm, rv = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out = F.instance_norm(input, rm, rv, w, b, True, momentum, eps)
    updated = _finite_flag(rm, rv)
    new_mean = torch.where(updated, rm.to(running_mean.dtype), running_mean)
    new_var = torch.where(updated, rv.to(running_var.dtype), running_var)
    return InstanceNormResult(out, new_mean, new_var, updated)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dimensions (as torch).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, statistics per leading index;
    float32 statistics for 16-bit input.

    >>> import torch
    >>> layer_norm(torch.tensor([[1.0, 3.0]]), 2)
    tensor([[-1.0000,  1.0000]])
    """
    shape = _as_shape(normalized_shape)
    _check_trailing(input, shape, "layer_norm", weight=weight, bias=bias)
    return F.layer_norm(input, shape, _match(weight, input), _match(bias, input), eps)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization: channels split into ``num_groups`` groups, statistics per sample and group.

    ``y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c]`` for input ``(N, C, *)``.

    >>> import torch
    >>> group_norm(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), 2)
    tensor([[-1.0000,  1.0000, -1.0000,  1.0000]])
    """
    if input.dim() < 2:
        raise ValueError(f"group_norm: input must be (N, C, *), got shape {tuple(input.shape)}.")
    channels = input.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"group_norm: the {channels} channels must split evenly into num_groups groups, got "
            f"num_groups={num_groups}; choose a divisor of {channels}."
        )
    _check_per_channel(input, channels, "group_norm", weight=weight, bias=bias)
    return F.group_norm(input, num_groups, _match(weight, input), _match(bias, input), eps)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing ``normalized_shape`` dimensions.

    ``y = x / sqrt(mean(x^2) + eps) * weight``; ``eps=None`` means ``torch.finfo(input.dtype).eps``
    (torch's default). 16-bit input is computed in float32 and returned in its dtype.

    >>> import torch
    >>> rms_norm(torch.tensor([[3.0, 4.0]]), 2, eps=0.0)
    tensor([[0.8485, 1.1314]])
    """
    shape = _as_shape(normalized_shape)
    _check_trailing(input, shape, "rms_norm", weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if input.dtype in _HALF_DTYPES:
        out = F.rms_norm(input.float(), shape, _cast(weight, torch.float32), eps)
        return out.to(input.dtype)
    return F.rms_norm(input, shape, _match(weight, input), eps)


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _check_trailing(input: Tensor, shape: tuple[int, ...], where: str, **tensors: Tensor | None) -> None:
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"{where}: the input's trailing dimensions must equal normalized_shape={list(shape)}, got "
            f"input of shape {tuple(input.shape)}; pass normalized_shape=x.shape[-k:] for the last k dims."
        )
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}.")


def _match(param: Tensor | None, input: Tensor) -> Tensor | None:
    # torch's CPU layer/group-norm kernels accept float32 parameters with 16-bit input (and then
    # accumulate in float32), but not 16-bit parameters with float32 input and the like.
    if param is None or param.dtype == input.dtype:
        return param
    if input.dtype in _HALF_DTYPES:
        return param.float()
    return param.to(input.dtype)


# --------------------------------------------------------------------------------------------
# Masked batch norm, batch statistics out (gradient accumulation), the guarded running update
# --------------------------------------------------------------------------------------------


class BatchStats(NamedTuple):
    """What :func:`batch_norm_with_stats` returns.

    Attributes:
        output: the input normalized with its own batch statistics, same shape and dtype.
        mean, var: the batch's per-channel mean and *biased* variance (divisor ``count``), detached;
            float32 for 16-bit input. Zeros for an empty batch.
        count: the number of values per channel behind them (valid positions under a mask), an int.
    """

    output: Tensor
    mean: Tensor
    var: Tensor
    count: int


def batch_norm_with_stats(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    stable_stats: bool = True,
) -> BatchStats:
    """Training-mode batch norm that returns the batch statistics instead of updating running ones.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the batch's mean and biased variance
    (over the valid positions when ``mask`` is given, as in :func:`batch_norm`), computed as
    :func:`batch_norm` computes them in training. The statistics come back as sufficient
    statistics ``(mean, var, count)``, which pool exactly across batches (Chan et al.): this is
    what :func:`normlab.accumulate` uses to update the running statistics once per optimizer step.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        weight, bias: ``(C,)`` or None.
        eps: added to the variance (default 1e-5).
        mask: bool, True at valid positions; shapes as in :func:`batch_norm`.
        stable_stats: as in :func:`batch_norm`.

    Returns:
        :class:`BatchStats` ``(output, mean, var, count)``.

    >>> import torch
    >>> r = batch_norm_with_stats(torch.tensor([[1.0], [3.0], [8.0]]), mask=torch.tensor([True, True, False]))
    >>> r.output.squeeze(1), r.mean, r.var, r.count
    (tensor([-1.0000,  1.0000,  0.0000]), tensor([2.]), tensor([1.]), 2)
    """
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm_with_stats: input must be (N, C) or (N, C, *), got a {input.dim()}-D tensor "
            f"of shape {tuple(input.shape)}; add a batch dimension with x.unsqueeze(0)."
        )
    channels = input.shape[1]
    _check_per_channel(input, channels, "batch_norm_with_stats", weight=weight, bias=bias)
    acc = _acc_dtype(input)
    w, b = _cast(weight, acc), _cast(bias, acc)
    m = None if mask is None else _mask_view(input, mask, "batch_norm_with_stats")
    if _values_per_channel(input) == 0:
        zeros = torch.zeros(channels, dtype=acc, device=input.device)
        return BatchStats(_empty_output(input, w, b), zeros, zeros.clone(), 0)
    if m is None:
        n = _values_per_channel(input)
        if n == 1:
            raise ValueError(
                f"batch_norm_with_stats: batch statistics need more than one value per channel, got "
                f"input of shape {tuple(input.shape)}. Use a larger batch or drop the last partial "
                f"batch (DataLoader(drop_last=True))."
            )
        out, mean, var = _batch_stats_forward(input, w, b, eps, stable_stats)
    else:
        n = _mask_count(input, m)
        _check_valid_count(n, input, mask, "batch_norm_with_stats")
        out, mean, var = _masked_stats_forward(input, m, n, w, b, eps)
    return BatchStats(out, mean.detach(), var.detach(), n)


def _mask_view(input: Tensor, mask: object, where: str) -> Tensor:
    """Check ``mask`` against ``input`` and return it as ``(N, 1, *)``, to broadcast over channels."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else f"a {type(mask).__name__}"
        raise TypeError(
            f"{where}: mask must be a bool tensor, True at valid positions, got {got}; convert with "
            f"mask.bool(), or build it from lengths: torch.arange(L) < lengths[:, None]."
        )
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if mask.dim() != len(expected) or any(m not in (1, e) for m, e in zip(mask.shape, expected)):
        raise ValueError(
            f"{where}: mask must have the input's shape without the channel dimension, {expected} "
            f"(size-1 dimensions broadcast), got {tuple(mask.shape)} for input {tuple(input.shape)}; "
            f"e.g. (N, L) for (N, C, L) input, (N,) for (N, C), (N, 1) to mask whole samples of (N, C, L)."
        )
    if mask.device != input.device:
        raise ValueError(
            f"{where}: mask is on {mask.device} and the input on {input.device}; move it with "
            f"mask.to(x.device)."
        )
    return mask.unsqueeze(1)


def _mask_count(input: Tensor, mask_view: Tensor) -> int:
    """Valid positions per channel: the mask's True entries times the sizes it broadcasts over."""
    repeat = math.prod(
        size for dim, size in enumerate(input.shape) if dim != 1 and mask_view.shape[dim] == 1
    )
    # On the host: it decides the error below and the divisor n - 1 of the unbiased variance.
    return int(mask_view.sum()) * repeat


def _check_valid_count(count: int, input: Tensor, mask: Tensor, where: str) -> None:
    if count < 2:
        raise ValueError(
            f"{where}: training needs at least 2 valid positions per channel to compute a batch "
            f"variance, got {count} (mask of shape {tuple(mask.shape)} with {int(mask.sum())} True, "
            f"input {tuple(input.shape)}). Skip such batches, or normalize them with the running "
            f"statistics (eval mode, or a layer built with single_sample='running')."
        )


def _masked_stats_forward(
    x: Tensor, m: Tensor, count: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm over the positions where ``m`` (``(N, 1, *)``) is True:
    ``(output, mean, biased var)``, output 0 at padded positions; differentiable in x, weight, bias.

    Composed of torch ops (autograd gives the exact gradient, including the statistics'
    dependence on the valid x). Two-pass statistics: the deviations are formed before squaring,
    and the output from them (subtract-first), so large offsets lose nothing.
    """
    acc = _acc_dtype(x)
    axes = [0, *range(2, x.dim())]
    xa = x if x.dtype == acc else x.to(acc)
    # torch.where rather than a product with the mask: padded values may be NaN or inf.
    mean = torch.where(m, xa, 0).sum(axes) / count
    centered = torch.where(m, xa - _channel_view(mean, x), 0)
    var = centered.square().sum(axes) / count
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if bias is None:  # centered is 0 at padded positions already
        out = centered * _channel_view(scale, x)
    else:
        out = torch.where(m, torch.addcmul(_channel_view(bias, x), centered, _channel_view(scale, x)), 0)
    return out.to(x.dtype), mean, var


def _masked_batch_norm(
    input: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    unbiased: bool,
) -> BatchNormResult:
    """:func:`batch_norm` with a mask (arguments checked there, but for the mask)."""
    m = _mask_view(input, mask, "batch_norm")
    acc = _acc_dtype(input)
    w, b = _cast(weight, acc), _cast(bias, acc)
    if _values_per_channel(input) == 0:
        return BatchNormResult(_empty_output(input, w, b), running_mean, running_var, num_batches_tracked, None)
    if not use_batch_stats:
        # Zero the padding first: NaN there would reach the weight gradient through x_hat.
        x = torch.where(m, input, 0)
        mean, var = _cast(running_mean, acc), _cast(running_var, acc)
        if _ill_conditioned(mean, var, eps):
            out = _normalize_subtract_first(x, mean, var, w, b, eps)
        else:
            out = torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        return BatchNormResult(torch.where(m, out, 0), running_mean, running_var, num_batches_tracked, None)
    n = _mask_count(input, m)
    _check_valid_count(n, input, mask, "batch_norm")
    out, batch_mean, batch_var = _masked_stats_forward(input, m, n, w, b, eps)
    if running_mean is None:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    new_mean, new_var, new_count, updated = _guarded_update(
        running_mean, running_var, batch_mean.detach(), batch_var.detach(), n, momentum,
        num_batches_tracked, unbiased,
    )
    return BatchNormResult(out, new_mean, new_var, new_count, updated)


def _guarded_update(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    n: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    unbiased: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One running-statistics update from a batch's mean, biased variance and count ``n``, kept
    at the old values when the batch statistics are not finite, without a host synchronization:
    ``(new_mean, new_var, new_num_batches_tracked, updated)``."""
    count = num_batches_tracked if num_batches_tracked is not None else 0
    new_mean, new_var = update_running_stats(
        running_mean, running_var, batch_mean, batch_var, n, momentum, count, unbiased
    )
    updated = _finite_flag(batch_mean, batch_var)
    new_mean = torch.where(updated, new_mean, running_mean)
    new_var = torch.where(updated, new_var, running_var)
    new_count = None if num_batches_tracked is None else num_batches_tracked + updated
    return new_mean, new_var, new_count, updated


# --------------------------------------------------------------------------------------------
# Batch renormalization (Ioffe 2017)
# --------------------------------------------------------------------------------------------


def _renorm_factors(
    mean: Tensor, invstd: Tensor, running_mean: Tensor, running_var: Tensor,
    r_max: float | Tensor, d_max: float | Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """Ioffe's corrections from the batch mean and ``1 / sigma_B`` and the running statistics:
    ``r = clip(sigma_B / sigma, 1 / r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma = sqrt(running_var + eps)``; detached (constants for backpropagation)."""
    inv_sigma = torch.rsqrt(running_var.to(mean.dtype) + eps)
    if isinstance(r_max, Tensor):
        r_max = r_max.to(mean.dtype)
    if isinstance(d_max, Tensor):
        d_max = d_max.to(mean.dtype)
    r_min = 1.0 / r_max if not isinstance(r_max, Tensor) else r_max.reciprocal()
    r = torch.clamp(inv_sigma / invstd, r_min, r_max)
    d = torch.clamp((mean - running_mean.to(mean.dtype)) * inv_sigma, -d_max, d_max)
    return r.detach(), d.detach()


def _renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel affine map of batch renorm on x_hat: ``y = x_hat * (gamma r) + (gamma d + beta)``;
    differentiable in gamma and beta, so autograd gives ``dgamma = sum(dy (x_hat r + d))``."""
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    return scale, shift if bias is None else shift + bias


class _NormalizeWithStats(torch.autograd.Function):
    """Training-mode batch norm with the batch statistics given, on torch's kernels.

    Forward: torch's inference kernel, ``(x - mean) / sqrt(var + eps) * weight + bias`` in one
    pass. Backward: torch's training-mode backward given the mean and 1 / sigma, so dx includes
    the statistics' dependence on x as batch norm's does, and the kernel's own parameter sums.
    For the float32/float64 input whose statistics torch's kernels compute accurately
    (:func:`_fast_kernel_ok`); :class:`_BatchNormGivenStats` serves the others.
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
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        # Under create_graph=True this op is recorded: torch's backward has a double backward.
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]),
        )
        return gx, gw, gb, None, None, None


def _fast_kernel_ok(x: Tensor, stable_stats: bool, n: int) -> bool:
    """Whether torch's plain kernels serve: float32/float64 eager input whose statistics they
    compute accurately (not the blocked statistics of channel-innermost CPU input)."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and not _compiling()
        and not _transformed(x)
        and not (stable_stats and _channel_innermost(x) and n >= _STABLE_MIN_ROWS)
    )


def _accurate_mean_var(x: Tensor, eps: float, stable_stats: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel batch mean, biased variance and the mean's rounding remainder (or None; see
    :func:`_channel_moments`) of a detached ``x``, as accurate as
    :func:`batch_norm`'s: blocked statistics for channel-innermost CPU input, torch's kernel
    otherwise, computed again after a shift for ill-conditioned channels."""
    if stable_stats and _channel_innermost(x) and _values_per_channel(x) >= _STABLE_MIN_ROWS:
        return _channel_moments(x)
    _, mean, var = _native_training_forward(x, None, None, eps)
    if _ill_conditioned(mean, var, eps):
        shift = mean
        _, mean, var = _native_training_forward(x.to(shift.dtype) - _channel_view(shift, x), None, None, eps)
        mean = mean + shift
    return mean, var, None


def _check_renorm_limits(r_max: object, d_max: object, where: str) -> None:
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, Tensor):
            continue  # a schedule's value on the device: checking it would synchronize
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a number >= {low:g}, got {type(value).__name__} {value!r}.")
        if not value >= low:
            raise ValueError(
                f"{where}: {name} must be >= {low:g} ({'r_max = 1' if name == 'r_max' else 'd_max = 0'} "
                f"turns the correction off), got {value!r}."
            )


def _batch_renorm_train(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    stable_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Training-mode batch renorm without the running update: ``(output, batch_mean, biased
    batch_var, known_finite)``, the statistics detached, in float32 for 16-bit input.
    ``known_finite`` is True when the statistics were checked finite on the host (CPU)."""
    acc = _acc_dtype(input)
    w, b = _cast(weight, acc), _cast(bias, acc)
    n = _values_per_channel(input)
    if _fast_kernel_ok(input, stable_stats, n) and input.device.type in ("cpu", "cuda"):
        # torch's statistics kernel (the passes its training kernel makes before normalizing),
        # then its inference kernel applies gamma r and gamma d + beta: torch's training cost.
        mean, var = torch.batch_norm_update_stats(input.detach(), None, None, 1.0)
        on_cpu = input.device.type == "cpu"
        if on_cpu:
            # The largest |mean| / sigma_B is finite exactly when the statistics are, and says
            # whether the kernel's x * a + b form keeps its precision (see batch_norm); the
            # other batches take the general path below. Free on the host, as in batch_norm.
            with np.errstate(all="ignore"):
                worst = float(np.max(np.abs(mean.numpy()) / np.sqrt(var.numpy() + eps)))
        if not on_cpu or worst <= _PRECISE_CONDITION:
            r, d = _renorm_factors(mean, torch.rsqrt(var + eps), running_mean, running_var, r_max, d_max, eps)
            scale, shift = _renorm_affine(w, b, r, d)
            return _NormalizeWithStats.apply(input, scale, shift, mean, var, eps), mean, var, on_cpu
    mean, var, low = _accurate_mean_var(input.detach(), eps, stable_stats)
    r, d = _renorm_factors(mean, torch.rsqrt(var + eps), running_mean, running_var, r_max, d_max, eps)
    scale, shift = _renorm_affine(w, b, r, d)
    out = _BatchNormGivenStats.apply(input, scale, shift, mean, var, eps, _ill_conditioned(mean, var, eps), low)
    return out, mean, var, False


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
) -> BatchNormResult:
    """Batch renormalization (Ioffe 2017): batch norm corrected towards the running statistics.

    In training, per channel, with the batch mean ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
    (biased ``var_B``) and ``sigma = sqrt(running_var + eps)`` before this batch's update::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with ``r`` and ``d`` constants for backpropagation (detached), so
    ``dgamma = sum(dy * (x_hat r + d))``, ``dbeta = sum(dy)`` and dx is batch norm's with
    weight ``gamma r``. The running statistics are then updated as by :func:`batch_norm`
    (torch's momentum, unbiased variance, ``num_batches_tracked + 1``) and returned. With
    ``r_max = 1`` and ``d_max = 0`` (r = 1, d = 0) this is batch norm. In eval mode, or without
    running statistics (r = 1, d = 0), it is :func:`batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        running_mean, running_var: ``(C,)``, or None (then plain batch norm).
        weight, bias: ``(C,)`` or None.
        training, momentum, eps, num_batches_tracked, unbiased, stable_stats: as :func:`batch_norm`.
        r_max: the largest correction of the scale (>= 1; default 3, the paper's final value).
        d_max: the largest correction of the shift (>= 0; default 5, the paper's final value).
            Either may be a 0-dim tensor (a schedule's value; not checked, to stay on the device).

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0]])   # batch mean 2, std 1; running mean 0, var 1
    >>> r = batch_renorm(x, torch.zeros(1), torch.ones(1), training=True, r_max=3.0, d_max=1.0, eps=0.0)
    >>> r.output.squeeze(1)                # x_hat * 1 + clip(2, -1, 1)
    tensor([0., 2.])
    """
    _check_renorm_limits(r_max, d_max, "batch_renorm")
    if not training or running_mean is None or running_var is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=num_batches_tracked, unbiased=unbiased, stable_stats=stable_stats)
    if input.dim() < 2:
        raise ValueError(
            f"batch_renorm: input must be (N, C) or (N, C, *), got a {input.dim()}-D tensor of shape "
            f"{tuple(input.shape)}; add a batch dimension with x.unsqueeze(0)."
        )
    _check_per_channel(input, input.shape[1], "batch_renorm", running_mean=running_mean,
                       running_var=running_var, weight=weight, bias=bias)
    _stats.check_momentum(momentum, owner="batch_renorm")
    if momentum is None and num_batches_tracked is None:
        raise ValueError(
            "batch_renorm: momentum=None (cumulative average) needs num_batches_tracked, the count "
            "of batches already averaged; pass torch.tensor(0) for a fresh layer."
        )
    n = _values_per_channel(input)
    if n == 1:
        raise ValueError(
            f"batch_renorm: training needs more than one value per channel to compute a batch "
            f"variance, got input of shape {tuple(input.shape)}. Use a larger batch, drop the last "
            f"partial batch (DataLoader(drop_last=True)), or normalize with running statistics."
        )
    if n == 0:  # an empty batch: an empty output, statistics and count untouched
        acc = _acc_dtype(input)
        out = _empty_output(input, _cast(weight, acc), _cast(bias, acc))
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    out, mean, var, known_finite = _batch_renorm_train(
        input, running_mean, running_var, weight, bias, eps, r_max, d_max, stable_stats
    )
    count = num_batches_tracked if num_batches_tracked is not None else 0
    new_mean, new_var = update_running_stats(running_mean, running_var, mean, var, n, momentum, count, unbiased)
    if known_finite:
        updated = _TRUE
        new_count = None if num_batches_tracked is None else num_batches_tracked + 1
    else:
        updated = _finite_flag(mean, var)
        new_mean = torch.where(updated, new_mean, running_mean)
        new_var = torch.where(updated, new_var, running_var)
        new_count = None if num_batches_tracked is None else num_batches_tracked + updated
    return BatchNormResult(out, new_mean, new_var, new_count, updated)


# --------------------------------------------------------------------------------------------
# Ghost batch normalization (Hoffer, Hubara & Soudry 2017)
# --------------------------------------------------------------------------------------------


def ghost_batch_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """The sizes of the virtual batches a batch of ``n`` samples is cut into (along dimension 0).

    ``virtual_batch_size`` consecutive samples each; the last virtual batch holds the rest and
    may be smaller, except that a rest of one sample joins the virtual batch before it (one
    sample gives no batch statistics). A batch of at most ``virtual_batch_size`` samples is one
    virtual batch.

    >>> ghost_batch_sizes(10, 4), ghost_batch_sizes(9, 4), ghost_batch_sizes(3, 4)
    ([4, 4, 2], [4, 5], [3])
    """
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError(
            f"ghost_batch_norm: virtual_batch_size must be an int >= 2, got "
            f"{type(virtual_batch_size).__name__} {virtual_batch_size!r}."
        )
    if virtual_batch_size < 2:
        raise ValueError(
            f"ghost_batch_norm: virtual_batch_size must be >= 2 (a virtual batch of one sample has "
            f"no batch statistics), got {virtual_batch_size}."
        )
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    sizes = [virtual_batch_size] * full
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


class _GhostBatchNormKernel(torch.autograd.Function):
    """Training-mode batch norm of each virtual batch on torch's kernels, one call per virtual batch.

    Virtual batches are consecutive slices along dimension 0, so each is a contiguous view (in
    any memory format) of the input and of one preallocated output, which the forward kernel
    writes directly: no concatenation. The backward kernel's out= form computes each slice of
    the input gradient and copies it into place (one copy of the gradient in all; torch has no
    in-place backward kernel). The running statistics given (copies) are updated by the kernel,
    virtual batch by virtual batch, with torch's momentum rule; None for no update. Outputs: y
    and the per-virtual-batch means and ``1 / sigma`` (``(G, C)``, no gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, sizes, momentum, eps):
        out = torch.empty_like(x)
        stats_dtype = _acc_dtype(x)
        means = torch.empty(len(sizes), x.shape[1], dtype=stats_dtype, device=x.device)
        invstds = torch.empty_like(means)
        for i, (xs, ys) in enumerate(zip(x.split(sizes), out.split(sizes))):
            torch.native_batch_norm(xs, weight, bias, running_mean, running_var, True, momentum, eps,
                                    out=(ys, means[i], invstds[i]))
        ctx.save_for_backward(x, weight, means, invstds)
        ctx.sizes, ctx.eps = sizes, eps
        ctx.mark_non_differentiable(means, invstds)
        return out, means, invstds

    @staticmethod
    def backward(ctx, grad_out, _means, _invstds):
        x, weight, means, invstds = ctx.saved_tensors
        sizes, eps = ctx.sizes, ctx.eps
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b]
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        pieces = zip(grad_out.split(sizes), x.split(sizes), means, invstds)
        if torch.is_grad_enabled():  # create_graph=True: torch's backward has a double backward
            parts = [torch.ops.aten.native_batch_norm_backward(g, xs, weight, None, None, m, s, True, eps, mask)
                     for g, xs, m, s in pieces]
            gx = torch.cat([p[0] for p in parts]) if need_x else None
            gw = torch.stack([p[1] for p in parts]).sum(0) if need_w else None
            gb = torch.stack([p[2] for p in parts]).sum(0) if need_b else None
            return gx, gw, gb, None, None, None, None, None
        # The out= form wants every output: the parameter sums come from the same passes.
        gx = torch.empty_like(x)
        param_dtype = weight.dtype if weight is not None else x.dtype
        gws = torch.empty(len(sizes), x.shape[1], dtype=param_dtype, device=x.device)
        gbs = torch.empty_like(gws)
        for i, ((g, xs, m, s), gxs) in enumerate(zip(pieces, gx.split(sizes))):
            torch.ops.aten.native_batch_norm_backward.out(
                g, xs, weight, None, None, m, s, True, eps, [True, True, True], out0=gxs, out1=gws[i], out2=gbs[i],
            )
        return (gx if need_x else None, gws.sum(0) if need_w else None, gbs.sum(0) if need_b else None,
                None, None, None, None, None)


def _ghost_kernel_path(x, weight, bias, running_mean, running_var, update, sizes, momentum, eps,
                       num_batches_tracked):
    """The ghost forward on torch's kernels (float momentum and unbiased variance: torch's rule),
    or None where the general path must serve: running statistics in another dtype than the
    input, or (on the CPU) an ill-conditioned or non-finite virtual batch."""
    rm = running_mean.clone() if update else None
    rv = running_var.clone() if update else None
    if update and (rm.dtype != x.dtype or rv.dtype != x.dtype):
        return None  # torch's kernel wants running statistics in the input's dtype
    out, means, invstds = _GhostBatchNormKernel.apply(
        x, weight, bias, rm, rv, sizes, momentum if update else 0.0, eps
    )
    if x.device.type == "cpu":
        worst = float(np.max(np.abs(means.numpy() * invstds.numpy())))  # see _kernel_updates_stats
        if not worst <= _PRECISE_CONDITION:
            return None
        updated = _TRUE
    else:
        updated = _finite_flag(means, invstds)
    if not update:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if updated is _TRUE:
        count = None if num_batches_tracked is None else num_batches_tracked + len(sizes)
        return BatchNormResult(out, rm, rv, count, updated)
    rm = torch.where(updated, rm, running_mean)
    rv = torch.where(updated, rv, running_var)
    count = None if num_batches_tracked is None else num_batches_tracked + len(sizes) * updated
    return BatchNormResult(out, rm, rv, count, updated)


def ghost_batch_norm(
    input: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
) -> BatchNormResult:
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017): batch statistics per virtual batch.

    Where batch norm uses batch statistics (``training``, or no running statistics), the batch
    is cut along dimension 0 into the virtual batches of :func:`ghost_batch_sizes`, and each is
    normalized as by :func:`batch_norm` with its own mean and variance. In training the running
    statistics take one update per virtual batch, in order (the paper's Algorithm 1: exactly
    :func:`batch_norm` applied virtual batch by virtual batch), and ``num_batches_tracked``
    grows by the number of virtual batches; the effective momentum per call is
    ``1 - (1 - momentum) ** G`` for G virtual batches. A call in which any virtual batch has
    non-finite statistics leaves the running statistics and the count as they were (``updated``
    is False). In eval mode with running statistics this is :func:`batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        virtual_batch_size: samples per virtual batch (int >= 2).
        running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            unbiased, stable_stats: as :func:`batch_norm`.

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    >>> r = ghost_batch_norm(x, 2, torch.zeros(1), torch.ones(1), training=True, momentum=0.5,
    ...                      eps=0.0, num_batches_tracked=torch.tensor(0))
    >>> r.output.squeeze(1), int(r.num_batches_tracked)
    (tensor([-1.,  1., -1.,  1.]), 2)
    """
    if input.dim() < 2:
        raise ValueError(
            f"ghost_batch_norm: input must be (N, C) or (N, C, *), got a {input.dim()}-D tensor of "
            f"shape {tuple(input.shape)}; add a batch dimension with x.unsqueeze(0)."
        )
    sizes = ghost_batch_sizes(input.shape[0], virtual_batch_size)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats or len(sizes) == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=num_batches_tracked, unbiased=unbiased, stable_stats=stable_stats)
    _check_per_channel(input, input.shape[1], "ghost_batch_norm", running_mean=running_mean,
                       running_var=running_var, weight=weight, bias=bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError("ghost_batch_norm: give both running_mean and running_var, or neither.")
    _stats.check_momentum(momentum, owner="ghost_batch_norm")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "ghost_batch_norm: momentum=None (cumulative average) needs num_batches_tracked, the "
            "count of (virtual) batches already averaged; pass torch.tensor(0) for a fresh layer."
        )
    update = training and running_mean is not None
    per_sample = _values_per_channel(input) // input.shape[0]
    if (_fast_kernel_ok(input, stable_stats, max(sizes) * per_sample)
            and (not update or (isinstance(momentum, float) and unbiased))):
        acc = _acc_dtype(input)
        fast = _ghost_kernel_path(input, _cast(weight, acc), _cast(bias, acc), running_mean, running_var,
                                  update, sizes, momentum, eps, num_batches_tracked)
        if fast is not None:
            return fast
    outs, flags = [], []
    mean, var, count = running_mean, running_var, num_batches_tracked
    for piece in input.split(sizes):
        r = batch_norm(piece, mean, var, weight, bias, training, momentum, eps,
                       num_batches_tracked=count, unbiased=unbiased, stable_stats=stable_stats)
        outs.append(r.output)
        mean, var, count = r.running_mean, r.running_var, r.num_batches_tracked
        flags.append(r.updated)
    out = torch.cat(outs)
    if not update:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if all(f is _TRUE for f in flags):
        return BatchNormResult(out, mean, var, count, _TRUE)
    updated = torch.stack(flags).all()
    mean = torch.where(updated, mean, running_mean)
    var = torch.where(updated, var, running_var)
    if count is not None:
        count = torch.where(updated, count, num_batches_tracked)
    return BatchNormResult(out, mean, var, count, updated)
