"""Batch norm fused with an activation that keeps only what backward needs: ``BatchNormAct1d/2d/3d``.

``y = act(z)``, ``z = gamma * x_hat + beta``, ``x_hat = (x - mean) / sqrt(var + eps)``, for
``act`` one of ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``), ``"elu"``
(``alpha``) and ``"silu"``. Statistics, running-statistics updates, options and state dict are
those of :class:`normlab.BatchNorm2d` (a BatchNormAct *is* a normlab/torch batch norm), so a
batch-norm checkpoint loads with ``strict=True`` and the numbers are batch norm's followed by
the activation.

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

Counting the output, the layer keeps one tensor of the input's size for identity, leaky_relu
and elu (torch: two for identity, three for the others), two for silu (torch: three) and two for
relu, as torch does (torch's relu keeps its output, the layer's own output): the memory saving
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

Second-order gradients (``create_graph=True``) are supported on every path. As
:class:`normlab.BatchNorm2d`: ``forward(input, mask=None)`` takes a mask of valid positions (that
call runs unfused: batch norm's masked path, then the activation, which keeps padded zeros at
0); inside :func:`normlab.accumulate` the running statistics pool the micro-batches; under
``torch.utils.checkpoint`` a recomputed forward leaves them alone. Inside ``torch.func``
transforms and ``torch.compile`` the layer runs unfused too, with the same numbers and torch's
memory use.

Like timm's ``BatchNormAct2d``, the class subclasses ``torch.nn.BatchNorm2d``: code that treats
batch norms specially (weight-decay groups, recalibration, putting them in eval mode) sees one.
A tool that *replaces* batch norms by type drops the activation (torch's
``SyncBatchNorm.convert_sync_batchnorm`` does); :func:`normlab.surgery.fold.fold_batchnorm`
checks the eval formula and leaves a BatchNormAct with an activation alone.
:meth:`split <_BatchNormActMixin.split>` gives the plain batch norm and the activation module,
for tools that need them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as NF
from ..functional import (
    _PRECISE_CONDITION,
    _STABLE_MIN_ROWS,
    _TRUE,
    _acc_dtype,
    _batch_stats_forward,
    _cast,
    _channel_grad_sums,
    _channel_innermost,
    _compiling,
    _transformed,
    _values_per_channel,
)
from .base import check_choice, in_backward
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]

ActName = Literal["identity", "relu", "leaky_relu", "elu", "silu"]
SaveMode = Literal["auto", "input"]
ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "leaky_relu", "elu", "silu")
_SAVE_MODES = ("auto", "input")
# Recovering x_hat = (z - beta) / gamma from a rounded z costs about |beta / gamma| roundings;
# above this ratio the call saves its input instead (float32: at most ~1e-5 absolute in x_hat).
_MAX_BETA_OVER_GAMMA = 100.0
_ops = torch.ops.aten
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Activations: forward, inverse and derivative in the forms the fused backward needs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Activation:
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
    if all(p.device.type == "cpu" and p.dtype in _NUMPY_DTYPES for p in params):
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


def _ill_conditioned(mean: Tensor, invstd: Tensor) -> bool:
    """Whether some channel's ``|mean| * invstd`` exceeds normlab's bound for ``x * a + b``
    forms (see :mod:`normlab.functional`); answered on the CPU only, as there."""
    if mean.device.type != "cpu" or mean.dtype not in _NUMPY_DTYPES:
        return False
    return not float(np.max(np.abs(mean.detach().numpy() * invstd.detach().numpy()), initial=0.0)) <= _PRECISE_CONDITION


def _kernel_training_forward(x: Tensor, w: Tensor | None, b: Tensor | None, running_mean: Tensor,
                             running_var: Tensor, momentum: float, eps: float, stable_stats: bool):
    """The common CPU case in one kernel call, as normlab's batch norm takes it: torch's
    training kernel normalizes and updates copies of the running statistics (torch's numbers to
    the bit). ``(z, batch_mean, invstd, new_running_mean, new_running_var)``, or None where the
    general path must serve (channel-innermost input for the blocked statistics, ill-conditioned
    or non-finite statistics, accelerators)."""
    if x.device.type != "cpu" or (
        stable_stats and _channel_innermost(x) and _values_per_channel(x) >= _STABLE_MIN_ROWS
    ):
        return None
    acc = _acc_dtype(x)
    mean = running_mean.clone() if running_mean.dtype == acc else running_mean.to(acc)
    var = running_var.clone() if running_var.dtype == acc else running_var.to(acc)
    z, batch_mean, invstd = torch.native_batch_norm(x, w, b, mean, var, True, momentum, eps)
    # One number says both whether the statistics are finite and whether the kernel's
    # x * a + b form kept its precision.
    worst = float(np.max(np.abs(batch_mean.numpy() * invstd.numpy())))
    if not worst <= _PRECISE_CONDITION:
        return None
    return z, batch_mean, invstd, _cast(mean, running_mean.dtype), _cast(var, running_var.dtype)


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One call's options, and the batch statistics the forward hands back for the update."""

    act: _Activation
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
        acc = _acc_dtype(x)
        w, b = _cast(weight, acc), _cast(bias, acc)
        fast = None
        if call.kernel_update:
            fast = _kernel_training_forward(x, w, b, running_mean, running_var, call.momentum, call.eps,
                                            call.stable_stats)
        if fast is not None:
            z, mean, invstd, call.new_mean, call.new_var = fast
        elif call.batch_stats:
            z, mean, var = _batch_stats_forward(x, w, b, call.eps, call.stable_stats)
            call.batch_mean, call.batch_var = mean, var
            invstd = torch.rsqrt(var + call.eps)
        else:
            mean, var = _cast(running_mean, acc), _cast(running_var, acc)
            z = NF.batch_norm(x, mean, var, w, b, training=False, eps=call.eps).output
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


def _blocked_param_sums(call: _Call, x: Tensor) -> bool:
    # As normlab's batch norm: torch's kernel sums channel-innermost parameter gradients naively.
    return call.stable_stats and _channel_innermost(x) and _values_per_channel(x) >= _STABLE_MIN_ROWS


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
        sum_g, dot = _channel_grad_sums(g, u, center)
        dot = dot * scale
    else:  # the kernel's per-channel sums only: nothing of the input's size allocated
        _, dot, sum_g = _ops.native_batch_norm_backward(
            g, u, gamma_invstd, None, None, center, scale, True, eps, [False, True, True])
    if not need_dx:
        return None, dot, sum_g
    # Coefficients in the gradient's dtype: elementwise ops compute 16-bit data in float32
    # internally and round once per op.
    a = _cast(_view(gamma_invstd, ndim), dtype)
    if not batch_stats:
        return (g.mul_(a) if g_fresh else g * a), dot, sum_g
    k = gamma_invstd / _values_per_channel(g)
    b_coef = torch.mul(k, scale).mul_(dot).neg_()  # -gamma * invstd * scale * mean(g * x_hat)
    c_coef = torch.mul(k, sum_g).neg_().addcmul_(b_coef, center, value=-1)  # -a mean(g) - b center
    b, c = _cast(_view(b_coef, ndim), dtype), _cast(_view(c_coef, ndim), dtype)
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
    w = _cast(weight, acc) if weight is not None else torch.ones(channels, dtype=acc, device=y.device)
    b = _cast(bias, acc) if bias is not None else torch.zeros(channels, dtype=acc, device=y.device)
    inv_w = torch.reciprocal(w)
    act = call.act
    dx = dw = db = None
    if dy is not None:
        dy = dy.contiguous(memory_format=NF._memory_format(y))
        z = act.inverse(y)
        g = act.grad_from_output(dy, y)
        dx, dot, sum_g = _finish_backward(
            g, g is not dy, z, z is not y, b, inv_w, w * invstd, call.batch_stats,
            ctx.needs_input_grad[0], _blocked_param_sums(call, y), call.eps,
        )
        dw = None if weight is None else dot.to(weight.dtype)
        db = None if bias is None else sum_g.to(bias.dtype)
    if d_invstd is not None:  # second order: invstd depends on x by -invstd^2 * x_hat / n
        n = _values_per_channel(y)
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
        extra = -_view(d_invstd * invstd * invstd, ndim) * x_hat / _values_per_channel(y)
        dx = extra if dx is None else dx + extra
    return (None if dx is None else dx.to(y.dtype)), dw, db


def _input_backward(ctx, dy: Tensor | None):
    """The backward from the saved input and statistics: z recomputed, then batch norm's."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    call: _Call = ctx.call
    if dy is None:
        return None, None, None
    acc, channels, ndim = mean.dtype, x.shape[1], x.dim()
    w = _cast(weight, acc) if weight is not None else torch.ones(channels, dtype=acc, device=x.device)
    b = _cast(bias, acc) if bias is not None else torch.zeros(channels, dtype=acc, device=x.device)
    dy = dy.contiguous(memory_format=NF._memory_format(x))
    a = w * invstd
    if _ill_conditioned(mean, invstd):
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
        ctx.needs_input_grad[0], _blocked_param_sums(call, x), call.eps,
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
        z = NF.batch_norm(x, None, None, weight, bias, training=True, eps=call.eps).output
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
# The layers
# --------------------------------------------------------------------------------------------


class _BatchNormActMixin:
    """Options, forward and helpers shared by BatchNormAct1d/2d/3d."""

    _plain_class: type  # the normlab batch norm of the same rank (for split)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        act: ActName = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        save: SaveMode = "auto",
        **options,
    ) -> None:
        owner = type(self).__name__
        check_choice(owner, "act", act, ACTIVATIONS)
        check_choice(owner, "save", save, _SAVE_MODES)
        for name, value in (("negative_slope", negative_slope), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__} {value!r}.")
        if act == "elu" and not alpha > 0:
            raise ValueError(f"{owner}: act='elu' needs alpha > 0 (typically 1.0), got alpha={alpha!r}.")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.act = act
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.save = save

    @property
    def _activation(self) -> _Activation:
        # Built on use, so assigning layer.act / negative_slope / alpha takes effect.
        return _Activation(self.act, self.negative_slope, self.alpha)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(batch_norm(input))``; ``mask`` as :class:`normlab.BatchNorm2d`'s (statistics over
        the valid positions, zeros at the padded ones, which every activation here keeps 0)."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}; check the preceding layer's output size."
            )
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracking = running_mean is not None and running_var is not None
        use_batch_stats = self.training or not tracking
        if (
            mask is not None
            or input.numel() == 0
            or (use_batch_stats and input.numel() == input.shape[1])
            or _transformed(input)
            or _compiling()
        ):
            # Masks, empty and one-value batches (errors, single_sample fallback) and function
            # transforms: batch norm's own path, then the activation.
            return self._activation.apply(super().forward(input) if mask is None else super().forward(input, mask))
        pooling = self._accumulator is not None
        call = _Call(
            self._activation, use_batch_stats, self.eps, self.stable_stats, self.save, self.momentum,
            kernel_update=(use_batch_stats and tracking and not pooling and self.unbiased
                           and isinstance(self.momentum, float)),
        )
        y, _ = _BatchNormActFunction.apply(
            input, params["weight"], params["bias"],
            running_mean if tracking else None, running_var if tracking else None, call,
        )
        if use_batch_stats and tracking:
            count = buffers["num_batches_tracked"]
            if call.new_mean is not None:  # torch's kernel updated copies (finite statistics)
                self._store_stats(call.new_mean, call.new_var, _TRUE, count + 1)  # not when recomputed
            elif pooling:  # inside normlab.accumulate: pool, update at the optimizer step
                if not in_backward():
                    self._accumulator.add(call.batch_mean, call.batch_var, _values_per_channel(input))
            else:
                new_mean, new_var, new_count, updated = NF._guarded_update(
                    running_mean, running_var, call.batch_mean, call.batch_var, _values_per_channel(input),
                    self.momentum, count, self.unbiased,
                )
                self._store_stats(new_mean, new_var, updated, new_count)
        return y

    def split(self) -> tuple[nn.Module, nn.Module]:
        """``(batch_norm, activation)``: a normlab batch norm with this layer's options and a copy
        of its state, and the activation as a ``torch.nn`` module; ``activation(batch_norm(x))``
        equals ``self(x)``. For tools that replace or fold batch norms.

        >>> import torch
        >>> from normlab.layers.act import BatchNormAct2d
        >>> bn, act = BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2).split()
        >>> type(bn).__name__, act
        ('BatchNorm2d', LeakyReLU(negative_slope=0.2))
        """
        plain = self._plain_class(
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
            single_sample=self.single_sample, on_nonfinite=self.on_nonfinite, unbiased=self.unbiased,
            stable_stats=self.stable_stats,
        )
        # assign=True keeps this layer's devices and dtypes; the clones keep the two independent.
        state = {key: value.detach().clone() for key, value in self.state_dict().items()}
        plain.load_state_dict(state, assign=True)
        return plain.train(self.training), self._activation.module()

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", act={self.act!r}"
        if self.act == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.act == "elu":
            extra += f", alpha={self.alpha}"
        if self.save != "auto":
            extra += f", save={self.save!r}"
        return extra


_DOC_ARGS = """
    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm2d``.
        act: ``"identity"``, ``"relu"`` (default), ``"leaky_relu"``, ``"elu"`` or ``"silu"``.
        negative_slope: slope of leaky_relu for z < 0 (default 0.01).
        alpha: ELU's ``alpha`` (default 1.0): ``alpha * (exp(z) - 1)`` for z < 0.
        save: ``"auto"`` (default) keeps the output alone where the activation is invertible
            and the input otherwise (see :mod:`normlab.layers.act`); ``"input"`` always keeps
            the input (exact for ELU's saturated elements, one tensor more for the
            invertible activations).
        single_sample, on_nonfinite, unbiased, stable_stats: see :mod:`normlab.layers.batch`.
"""


class BatchNormAct1d(_BatchNormActMixin, BatchNorm1d):
    __doc__ = """Batch norm over ``(N, C)`` or ``(N, C, L)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm1d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct1d
    >>> layer = BatchNormAct1d(3, act="silu")
    >>> bool((layer(torch.randn(8, 3)) >= -0.2785).all())  # silu's minimum is -0.2785
    True
    """
    _plain_class = BatchNorm1d


class BatchNormAct2d(_BatchNormActMixin, BatchNorm2d):
    __doc__ = """Batch norm over ``(N, C, H, W)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm2d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct2d
    >>> layer = BatchNormAct2d(8, act="leaky_relu", negative_slope=0.01)
    >>> layer.load_state_dict(torch.nn.BatchNorm2d(8).state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(4, 8, 5, 5)
    >>> reference = torch.nn.functional.leaky_relu(torch.nn.BatchNorm2d(8)(x), 0.01)
    >>> torch.allclose(layer(x), reference, atol=1e-6)
    True
    """
    _plain_class = BatchNorm2d


class BatchNormAct3d(_BatchNormActMixin, BatchNorm3d):
    __doc__ = """Batch norm over ``(N, C, D, H, W)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm3d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct3d
    >>> BatchNormAct3d(2, act="elu")(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """
    _plain_class = BatchNorm3d
