"""Batch norm fused with an activation that keeps only what backward needs: :func:`batch_norm_act`,
the autograd function behind ``normlab.BatchNormAct1d/2d/3d``, and the activation algebra it uses.

``y = act(z)``, ``z = gamma * x_hat + beta``, ``x_hat = (x - mean) / sqrt(var + eps)``, for
``act`` one of ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``), ``"elu"``
(``alpha``) and ``"silu"``; statistics and running-statistics updates are batch norm's
(:func:`normlab.functional.batch_norm`), so the numbers are batch norm's followed by the
activation.

What autograd keeps between forward and backward (torch's ``BatchNorm2d`` followed by the
activation keeps the input ``x`` and the batch-norm output ``z``, and the activation's output
``y`` is the result; three tensors of the input's size):

================================ ======================== ============================================
activation                       saved                    backward recovers
================================ ======================== ============================================
identity, leaky_relu (slope>0),  the output ``y`` only    ``z = act^-1(y)``, ``x_hat = (z - beta) /
elu (alpha>0)                    (it is the result too)   gamma`` (In-Place ABN, Rota Bulo et al. 2018)
relu, silu, and the above        the input ``x`` only     ``z`` recomputed from ``x`` and the saved
with ``save="input"``                                     per-channel statistics
================================ ======================== ============================================

Counting the output, a call keeps one tensor of the input's size for identity, leaky_relu
and elu (torch: two for identity, three for the others), two for silu (torch: three) and two for
relu, as torch does (torch's relu keeps its output, the call's own output): the memory saving
needs an invertible activation, hence In-Place ABN's leaky_relu with slope 0.01 in place of relu.
The backward is batch norm's: with ``g = dy * act'(z)`` and means over all dimensions but C,
``dx = gamma / sigma * (g - mean(g) - x_hat * mean(g * x_hat))`` in training (``dx = gamma /
sigma * g`` with running statistics), ``dgamma = sum(g * x_hat)``, ``dbeta = sum(g)``: torch's
kernel sums per channel, and dx is formed in a buffer the backward allocated anyway. The peak of
a whole forward+backward step, in tensors of the input's size beyond the input and its upstream
gradient, is 3 when recovering from the output (y, then z and g, dx taking z's place) and 2 when
the input was saved (y, then g, dx taking its place); torch's batch norm + activation peaks at 3
(benchmarks/bench_act.py measures both).

Recovering ``x_hat`` from ``y`` divides by gamma, which amplifies the rounding of ``z`` by
``|beta / gamma|``. A call in which some channel has ``|gamma| < |beta| / 100`` or ``|gamma|``
below ``64 * finfo(dtype).tiny`` (gamma = 0 included) therefore saves the input instead, for
that call only: the gradients stay exact to rounding (one host synchronization per call on
accelerators reads gamma). For ELU, ``alpha * (exp(z) - 1)`` carries little of ``z`` once it is
near ``-alpha``: the recovered ``z`` is off by about ``eps_dtype * exp(-z)`` (float32: 1e-5 at
z = -5, 2e-3 at z = -10) and is clamped at ``log(eps_dtype)``; the input gradient of such
saturated elements is approximate. ``save="input"`` is exact there too.

Second-order gradients (``create_graph=True``) are supported on every path. With a mask, for
empty input, inside ``torch.func`` transforms and under ``torch.compile`` the call runs unfused
(batch norm, then the activation: the same numbers, torch's memory use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..stats import statistics_dtype
from . import _numerics as N
from ._batch import BatchNormResult, SingleSample, _too_few, batch_norm
from ._dispatch import batch_stats_forward, channel_grad_sums, kernel_updates_stats, normalize_eval

__all__ = ["ACTIVATIONS", "Activation", "activation", "batch_norm_act"]

ActName = Literal["identity", "relu", "leaky_relu", "elu", "silu"]
SaveMode = Literal["auto", "input"]
ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "leaky_relu", "elu", "silu")
SAVE_MODES = ("auto", "input")
# Recovering x_hat = (z - beta) / gamma from a rounded z costs about |beta / gamma| roundings;
# above this ratio the call saves its input instead (float32: at most ~1e-5 absolute in x_hat).
_MAX_BETA_OVER_GAMMA = 100.0
_ops = torch.ops.aten


# --------------------------------------------------------------------------------------------
# Activations: forward, inverse and derivative in the forms the fused backward needs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """One of :data:`ACTIVATIONS` with its parameters, in every form the fused forward and backward
    need: applied (out of place, in place), inverted, differentiated from its output or its
    input, and as a ``torch.nn`` module. Build it checked with :func:`activation`."""

    name: str
    negative_slope: float = 0.01
    alpha: float = 1.0

    @property
    def invertible(self) -> bool:
        """Whether ``z`` is a function of ``act(z)`` (strictly monotonic activations)."""
        return (
            self.name == "identity"
            or (self.name == "leaky_relu" and self.negative_slope > 0)
            or (self.name == "elu" and self.alpha > 0)
        )

    def apply(self, z: Tensor) -> Tensor:
        """Out of place and differentiable (the unfused path)."""
        if self.name == "relu":
            return F.relu(z)
        if self.name == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        if self.name == "elu":
            return F.elu(z, self.alpha)
        if self.name == "silu":
            return F.silu(z)
        return z

    def apply_(self, z: Tensor) -> Tensor:
        """In place on a fresh tensor (the batch-norm output nobody else holds)."""
        if self.name == "relu":
            return z.relu_()
        if self.name == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope, inplace=True)
        if self.name == "elu":
            return F.elu(z, self.alpha, inplace=True)
        if self.name == "silu":
            return F.silu(z, inplace=True)
        return z

    def inverse(self, y: Tensor) -> Tensor:
        """``z`` from ``y = act(z)``: a new tensor (``y`` itself for the identity)."""
        if self.name == "leaky_relu":
            return F.leaky_relu(y, 1.0 / self.negative_slope)  # slope 1/s undoes slope s
        if self.name == "elu":
            # z = log1p(y / alpha) where y <= 0; the clamp keeps saturated elements finite.
            tiny = -1.0 + torch.finfo(y.dtype).eps
            z = torch.clamp(y, max=0).div_(self.alpha).clamp_(min=tiny).log1p_()
            return torch.where(y > 0, y, z, out=z)
        return y

    def grad_from_output(self, dy: Tensor, y: Tensor) -> Tensor:
        """``dy * act'(z)`` read from ``y``: a new tensor (``dy`` itself for the identity)."""
        if self.name == "leaky_relu":
            return _ops.leaky_relu_backward(dy, y, self.negative_slope, True)
        if self.name == "elu":
            return _ops.elu_backward(dy, self.alpha, 1.0, 1.0, True, y)
        return dy

    def grad_from_input_(self, dy: Tensor, z: Tensor) -> Tensor:
        """``dy * act'(z)`` written over ``z`` (``dy`` itself for the identity)."""
        if self.name == "relu":
            return _ops.threshold_backward.grad_input(dy, z, 0, grad_input=z)
        if self.name == "leaky_relu":
            return _ops.leaky_relu_backward.grad_input(dy, z, self.negative_slope, False, grad_input=z)
        if self.name == "elu":
            return _ops.elu_backward.grad_input(dy, self.alpha, 1.0, 1.0, False, z, grad_input=z)
        if self.name == "silu":
            return _ops.silu_backward.grad_input(dy, z, grad_input=z)
        return dy

    def inverse_and_slope(self, y: Tensor) -> tuple[Tensor, Tensor | float]:
        """Differentiable ``(z, act'(z))`` from ``y`` (the create_graph backward)."""
        if self.name == "leaky_relu":
            positive = y > 0
            return torch.where(positive, y, y / self.negative_slope), torch.where(
                positive, torch.ones_like(y), torch.full_like(y, self.negative_slope))
        if self.name == "elu":
            positive = y > 0
            tiny = -1.0 + torch.finfo(y.dtype).eps
            z = torch.where(positive, y, torch.log1p((y / self.alpha).clamp(min=tiny)))
            return z, torch.where(positive, torch.ones_like(y), y + self.alpha)
        return y, 1.0

    def module(self) -> nn.Module:
        """The activation as a ``torch.nn`` module."""
        if self.name == "relu":
            return nn.ReLU()
        if self.name == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        if self.name == "elu":
            return nn.ELU(self.alpha)
        if self.name == "silu":
            return nn.SiLU()
        return nn.Identity()


def _recoverable(weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether every channel's x_hat can be recovered from the output to rounding accuracy."""
    if weight is None:
        return True
    tiny = 64 * torch.finfo(dtype).tiny
    params = (weight,) if bias is None else (weight, bias)
    if all(p.is_cpu and p.dtype in N.NUMPY_DTYPES for p in params):
        # NumPy answers for a few values in a fraction of the cost of small torch ops.
        magnitude = np.abs(weight.detach().numpy())
        ok = magnitude >= tiny
        if bias is not None:
            ok &= magnitude * _MAX_BETA_OVER_GAMMA >= np.abs(bias.detach().numpy())
        return bool(ok.all())
    magnitude = weight.detach().abs()
    ok = magnitude >= tiny
    if bias is not None:
        ok &= magnitude * _MAX_BETA_OVER_GAMMA >= bias.detach().abs()
    return bool(ok.all())


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One call's options, and the batch statistics the forward hands back for the update."""

    act: Activation
    batch_stats: bool
    eps: float
    stable_stats: bool
    save: str
    momentum: float | None = None
    kernel_update: bool = False  # may torch's kernel update the running statistics?
    batch_mean: Tensor | None = field(default=None)  # the general path's batch statistics
    batch_var: Tensor | None = field(default=None)
    new_mean: Tensor | None = field(default=None)  # the kernel's new running statistics
    new_var: Tensor | None = field(default=None)
    saved: str | None = field(default=None)  # "output" or "input": what this call kept


def _view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _axes(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))


class _BatchNormActFunction(torch.autograd.Function):
    """``(y, invstd) = f(x, weight, bias, running_mean, running_var, call)``.

    ``invstd`` (``1 / sqrt(var + eps)`` per channel) is an output so that second-order
    gradients, which differentiate the backward, can reach the statistics' dependence on x
    when only ``y`` is saved. The layer discards it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, call: _Call):
        acc = statistics_dtype(x.dtype)
        w, b = N.cast(weight, acc), N.cast(bias, acc)
        fast = None
        if call.kernel_update:
            fast = kernel_updates_stats(x, w, b, running_mean, running_var, call.momentum, call.eps,
                                        call.stable_stats)
        if fast is not None:  # CPU: torch's kernel updated copies of the running statistics
            z, mean, invstd, call.new_mean, call.new_var, _ = fast
        elif call.batch_stats:
            z, mean, var = batch_stats_forward(x, w, b, call.eps, call.stable_stats)
            call.batch_mean, call.batch_var = mean, var
            invstd = torch.rsqrt(var + call.eps)
        else:
            mean, var = N.cast(running_mean, acc), N.cast(running_var, acc)
            z = normalize_eval(x, mean, var, w, b, call.eps)
            invstd = torch.rsqrt(var + call.eps)
        y = call.act.apply_(z)  # z is fresh from the kernel: nobody else holds it
        ctx.set_materialize_grads(False)
        ctx.call = call
        if call.save == "auto" and call.act.invertible and _recoverable(weight, bias, y.dtype):
            call.saved = "output"
            ctx.save_for_backward(y, weight, bias, invstd)
            if not call.batch_stats:
                ctx.mark_non_differentiable(invstd)
        else:
            call.saved = "input"
            ctx.save_for_backward(x, weight, bias, mean, invstd)
            ctx.mark_non_differentiable(invstd)
        return y, invstd

    @staticmethod
    def backward(ctx, grad_y, grad_invstd):
        if grad_y is None and grad_invstd is None:
            return None, None, None, None, None, None
        if ctx.call.saved == "output":
            if torch.is_grad_enabled():
                grads = _output_backward_differentiable(ctx, grad_y, grad_invstd)
            else:
                grads = _output_backward(ctx, grad_y, grad_invstd)
        elif torch.is_grad_enabled():
            grads = _input_backward_differentiable(ctx, grad_y)
        else:
            grads = _input_backward(ctx, grad_y)
        dx, dw, db = grads
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None, None, None


def _finish_backward(
    g: Tensor,
    g_fresh: bool,
    u: Tensor,
    u_fresh: bool,
    center: Tensor,
    scale: Tensor,
    gamma_invstd: Tensor,
    batch_stats: bool,
    need_dx: bool,
    blocked: bool,
    eps: float,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Batch norm's backward from ``g = dy * act'(z)`` and ``u`` with ``x_hat = (u - center) *
    scale`` per channel (u = z for the saved output, u = x for the saved input):
    ``(dx, sum(g * x_hat), sum(g))``.

    ``dx = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat))`` in training (``gamma *
    invstd * g`` with running statistics) is ``a * g + b * u + c`` per channel, formed in the
    buffer of ``u`` or ``g`` where the backward allocated it (``*_fresh``), so the backward holds
    no more than the saved tensor, these two and nothing of their size beyond.
    """
    ndim, dtype = g.dim(), g.dtype
    if blocked:  # channel-innermost input: torch's cascaded sums, as normlab's batch norm
        sum_g, dot = channel_grad_sums(g, u, center)
        dot = dot * scale
    else:  # the kernel's per-channel sums only: nothing of the input's size allocated
        _, dot, sum_g = _ops.native_batch_norm_backward(
            g, u, gamma_invstd, None, None, center, scale, True, eps, [False, True, True])
    if not need_dx:
        return None, dot, sum_g
    # Coefficients in the gradient's dtype: elementwise ops compute 16-bit data in float32
    # internally and round once per op.
    a = N.cast(_view(gamma_invstd, ndim), dtype)
    if not batch_stats:
        return (g.mul_(a) if g_fresh else g * a), dot, sum_g
    k = gamma_invstd / N.values_per_channel(g)
    b_coef = torch.mul(k, scale).mul_(dot).neg_()  # -gamma * invstd * scale * mean(g * x_hat)
    c_coef = torch.mul(k, sum_g).neg_().addcmul_(b_coef, center, value=-1)  # -a mean(g) - b center
    b, c = N.cast(_view(b_coef, ndim), dtype), N.cast(_view(c_coef, ndim), dtype)
    # (mul_ then add_ outruns addcmul with a broadcast first operand, on large tensors too)
    if u_fresh:
        dx = u.mul_(b).add_(c).addcmul_(g, a)
    elif g_fresh:
        dx = g.mul_(a).add_(c).addcmul_(u, b)
    else:
        dx = torch.mul(g, a).add_(c).addcmul_(u, b)
    return dx, dot, sum_g


def _output_backward(ctx, dy: Tensor | None, d_invstd: Tensor | None):
    """The fused backward from the saved output: ``x_hat = (act^-1(y) - beta) / gamma``."""
    y, weight, bias, invstd = ctx.saved_tensors
    call: _Call = ctx.call
    acc, channels = invstd.dtype, y.shape[1]
    w = N.cast(weight, acc) if weight is not None else torch.ones(channels, dtype=acc, device=y.device)
    b = N.cast(bias, acc) if bias is not None else torch.zeros(channels, dtype=acc, device=y.device)
    inv_w = torch.reciprocal(w)
    act = call.act
    dx = dw = db = None
    if dy is not None:
        dy = dy.contiguous(memory_format=N.memory_format(y))
        z = act.inverse(y)
        g = act.grad_from_output(dy, y)
        dx, dot, sum_g = _finish_backward(
            g, g is not dy, z, z is not y, b, inv_w, w * invstd, call.batch_stats,
            ctx.needs_input_grad[0], N.blocked(y, call.stable_stats), call.eps,
        )
        dw = None if weight is None else dot.to(weight.dtype)
        db = None if bias is None else sum_g.to(bias.dtype)
    if d_invstd is not None:  # second order: invstd depends on x by -invstd^2 * x_hat / n
        n = N.values_per_channel(y)
        coef = _view(-d_invstd * invstd * invstd * inv_w / n, y.dim())
        extra = (act.inverse(y).to(acc) - _view(b, y.dim())).mul_(coef).to(y.dtype)
        dx = extra if dx is None else dx.add_(extra)
    return dx, dw, db


def _output_backward_differentiable(ctx, dy: Tensor | None, d_invstd: Tensor | None):
    """The same formulas in differentiable ops (``create_graph=True``)."""
    y, weight, bias, invstd = ctx.saved_tensors
    call: _Call = ctx.call
    acc, ndim = invstd.dtype, y.dim()
    axes = _axes(ndim)
    z, slope = call.act.inverse_and_slope(y.to(acc))
    w = _view(weight.to(acc), ndim) if weight is not None else 1.0
    b = _view(bias.to(acc), ndim) if bias is not None else 0.0
    x_hat = (z - b) / w
    scale = _view(invstd, ndim) * w
    dx = dw = db = None
    if dy is not None:
        g = dy.to(acc) * slope
        dw, db = (g * x_hat).sum(axes), g.sum(axes)
        if call.batch_stats:
            dx = scale * (g - g.mean(axes, keepdim=True) - x_hat * (g * x_hat).mean(axes, keepdim=True))
        else:
            dx = scale * g
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if bias is None else db.to(bias.dtype)
    if d_invstd is not None:
        extra = -_view(d_invstd * invstd * invstd, ndim) * x_hat / N.values_per_channel(y)
        dx = extra if dx is None else dx + extra
    return (None if dx is None else dx.to(y.dtype)), dw, db


def _input_backward(ctx, dy: Tensor | None):
    """The backward from the saved input and statistics: z recomputed, then batch norm's."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    call: _Call = ctx.call
    if dy is None:
        return None, None, None
    acc, channels, ndim = mean.dtype, x.shape[1], x.dim()
    w = N.cast(weight, acc) if weight is not None else torch.ones(channels, dtype=acc, device=x.device)
    b = N.cast(bias, acc) if bias is not None else torch.zeros(channels, dtype=acc, device=x.device)
    dy = dy.contiguous(memory_format=N.memory_format(x))
    a = w * invstd
    if mean.is_cpu and not N.precise(mean, invstd):
        # A large mean next to a small spread: x * a + (b - mean * a), the kernel's sums and
        # a * g + b * x + c would all cancel. u = x - mean (one tensor more, in this rare case)
        # is small; its own mean is what the rounded float mean missed, so u - mean(u) is x
        # centered to full precision.
        u = torch.sub(x, _view(mean, ndim).to(x.dtype))
        center = u.mean(_axes(ndim), dtype=acc)
        z = torch.addcmul(_view(b, ndim).to(x.dtype), u, _view(a, ndim).to(x.dtype))
    else:
        u, center = x, mean
        z = torch.addcmul(_view(b - mean * a, ndim).to(x.dtype), x, _view(a, ndim).to(x.dtype))
    g = call.act.grad_from_input_(dy, z)  # in z's buffer
    dx, dw, db = _finish_backward(
        g, g is not dy, u, u is not x, center, invstd, a, call.batch_stats,
        ctx.needs_input_grad[0], N.blocked(x, call.stable_stats), call.eps,
    )
    dw = None if weight is None else dw.to(weight.dtype)
    db = None if bias is None else db.to(bias.dtype)
    return dx, dw, db


def _input_backward_differentiable(ctx, dy: Tensor | None):
    """``create_graph=True`` from the saved input: rerun the unfused forward under autograd."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    call: _Call = ctx.call
    if dy is None:
        return None, None, None
    if call.batch_stats:  # the statistics depend on x: batch norm's own differentiable path
        z = batch_norm(x, None, None, weight, bias, training=True, eps=call.eps).output
    else:  # running statistics: constants
        ndim = x.dim()
        z = (x - _view(mean, ndim)) * _view(invstd, ndim)
        if weight is not None:
            z = z * _view(weight, ndim)
        if bias is not None:
            z = z + _view(bias, ndim)
        z = z.to(x.dtype)
    y = call.act.apply(z)
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias))



# --------------------------------------------------------------------------------------------
# The functions
# --------------------------------------------------------------------------------------------


def activation(act: object, negative_slope: object = 0.01, alpha: object = 1.0, *,
               name: str = "batch_norm_act") -> Activation:
    """The checked :class:`Activation`: ``act`` one of :data:`ACTIVATIONS`, ``negative_slope`` and
    ``alpha`` numbers, ``alpha > 0`` for ELU (whose inverse divides by it). ``name`` is the
    caller's name in the errors (a layer checks its options with it at construction).

    >>> activation("leaky_relu", 0.2).module()
    LeakyReLU(negative_slope=0.2)
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"{name}: act must be one of {list(ACTIVATIONS)}, got {act!r}.")
    for key, value in (("negative_slope", negative_slope), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: {key} must be a float, got {type(value).__name__} {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be a finite number (typically {0.01 if key == 'negative_slope' else 1.0}), "
                             f"got {value!r}.")
    if act == "elu" and not alpha > 0:
        raise ValueError(f"{name}: act='elu' needs alpha > 0 (typically 1.0), got alpha={alpha!r}.")
    return Activation(act, float(negative_slope), float(alpha))


def check_save(save: object, name: str) -> None:
    if save not in SAVE_MODES:
        raise ValueError(f"{name}: save must be one of {list(SAVE_MODES)}, got {save!r}.")


def _unfused(input: Tensor, *others: Tensor | None) -> bool:
    """Where the fused function does not run: empty input, torch.func transforms (of the input or
    of ``others``, the parameters and running statistics) and torch.compile or torch.export
    (batch norm's own path, then the activation: the same numbers, torch's memory)."""
    return input.numel() == 0 or N.traced(input, *others)


def fused_with_stats(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, stable_stats: bool,
                     act: Activation, save: str) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode ``act(batch_norm(input))`` with its own statistics, fused, without a running
    update: ``(output, batch_mean, biased batch_var)`` (for pooling, :func:`batch_norm_with_stats`)."""
    call = _Call(act, True, eps, stable_stats, save)
    y, _ = _BatchNormActFunction.apply(input, weight, bias, None, None, call)
    return y, call.batch_mean.detach(), call.batch_var.detach()


def batch_norm_act(
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
    act: ActName = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    save: SaveMode = "auto",
    mask: Tensor | None = None,
    single_sample: SingleSample = "error",
    name: str = "batch_norm_act",
) -> BatchNormResult:
    """Batch norm followed by an activation, fused: ``y = act(batch_norm(x))``, keeping only what
    the backward needs (see the table of :mod:`normlab.functional.act`).

    Statistics, running-statistics updates and their result are exactly :func:`batch_norm`'s;
    ``act`` is one of ``"identity"`` (default), ``"relu"``, ``"leaky_relu"`` (slope
    ``negative_slope`` for z < 0), ``"elu"`` (``alpha * (exp(z) - 1)`` for z < 0, alpha > 0) and
    ``"silu"``. ``save="auto"`` keeps the output alone where the activation is invertible and the
    input otherwise; ``"input"`` always keeps the input (exact for ELU's saturated elements). With
    a ``mask``, for empty input, inside ``torch.func`` transforms and under ``torch.compile`` the
    call runs unfused (:func:`batch_norm`, then the activation, which keeps padded zeros at 0).

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, unbiased, stable_stats, mask, single_sample, name: as
            :func:`batch_norm`.
        act, negative_slope, alpha: the activation (:func:`activation`).
        save: ``"auto"`` or ``"input"``, as above.

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0]])
    >>> batch_norm_act(x, training=True, act="leaky_relu", negative_slope=0.5, eps=1e-12).output.squeeze(1)
    tensor([-0.5000,  1.0000])
    """
    fn = activation(act, negative_slope, alpha, name=name)
    check_save(save, name)
    N.check_input(input, name)  # before _unfused reads it
    if mask is not None or _unfused(input, weight, bias, running_mean, running_var):
        r = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked=num_batches_tracked, unbiased=unbiased, stable_stats=stable_stats,
                       mask=mask, single_sample=single_sample, name=name)
        return r._replace(output=fn.apply(r.output))
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    update = training and running_mean is not None
    if training:
        N.check_update(momentum, num_batches_tracked if update else 0, name)
    use_batch_stats = training or running_mean is None
    n = N.values_per_channel(input)
    if n < 2 and _too_few(n, use_batch_stats, running_mean, single_sample, input, name):
        use_batch_stats = update = False
    call = _Call(fn, use_batch_stats, eps, stable_stats, save, momentum,
                 kernel_update=update and unbiased and isinstance(momentum, float) and input.is_cpu)
    y, _ = _BatchNormActFunction.apply(input, weight, bias, running_mean, running_var, call)
    if not update:
        return BatchNormResult(y, running_mean, running_var, num_batches_tracked, None)
    if call.new_mean is not None:  # torch's kernel updated copies (finite statistics)
        count = None if num_batches_tracked is None else num_batches_tracked + 1
        return BatchNormResult(y, call.new_mean, call.new_var, count, N.TRUE)
    return BatchNormResult(y, *N.guarded_update(running_mean, running_var, call.batch_mean, call.batch_var, n,
                                                momentum, num_batches_tracked, unbiased))
