"""Conformance cases for ``BatchNormAct1d/2d/3d`` (normlab.layers.act).

With ``act="identity"`` the fused layer is batch norm: its torch counterpart is
``torch.nn.BatchNorm{1,2,3}d`` (same state dict, numbers and gradients) and the reference is
:func:`normlab.reference.batch_norm`. Both of the layer's backward paths take part: the default
one, which saves the output and recovers x_hat from it, and ``save="input"``.

The other activations have no single torch module; they join with the float64 reference
:func:`normlab.reference.batch_norm_act` as the oracle (``has_torch=False``).
"""

from __future__ import annotations

from torch import nn

from normlab import reference as ref
from normlab.layers import act as act_layers
from normlab.layers.base import TORCH_NORM_HAS_BIAS

from .cases import (
    _BATCH_SHAPES,
    Builder,
    Grads,
    LayerCase,
    RefStep,
    Shape,
    Snapshot,
    _flags,
    _grads,
    batch_backward,
    batch_forward,
)


def _builder(dim: int, fixed: dict, save: str = "auto") -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        if lib is nn:  # torch's counterpart of the identity case
            return getattr(nn, f"BatchNorm{dim}d")(shape[1], **{**fixed, **overrides})
        return getattr(act_layers, f"BatchNormAct{dim}d")(
            shape[1], act="identity", save=save, **{**fixed, **overrides})

    return build


def _act_builder(act: str, **fixed) -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        return act_layers.BatchNormAct2d(shape[1], act=act, **{**fixed, **overrides})

    return build


def _act_reference(act: str, negative_slope: float = 0.01, alpha: float = 1.0):
    def forward(s: Snapshot, x, training: bool) -> RefStep:
        y, rm, rv, count = ref.batch_norm_act(
            x, s.running_mean, s.running_var, s.weight, s.bias, training=training,
            momentum=s.momentum, eps=s.eps, num_batches_tracked=s.num_batches_tracked or 0,
            unbiased=s.unbiased, act=act, negative_slope=negative_slope, alpha=alpha,
        )
        return RefStep(y, rm, rv, None if s.num_batches_tracked is None else count)

    def backward(s: Snapshot, x, dy, training: bool) -> Grads:
        dx, dw, db = ref.batch_norm_act_backward(
            dy, x, s.weight, s.bias, s.eps, training=training, running_mean=s.running_mean,
            running_var=s.running_var, act=act, negative_slope=negative_slope, alpha=alpha,
        )
        return _grads(s, dx, dw, db)

    return forward, backward


def _identity_cases() -> list[LayerCase]:
    # Every option combination on 2-D input; the other ranks with the defaults (the layer's
    # code does not depend on the rank beyond the batch-norm kernel's).
    specs = [("BatchNorm2d", 2, dict(affine=a, track_running_stats=t)) for a in (True, False) for t in (True, False)]
    specs += [
        ("BatchNorm2d", 2, dict(affine=True, track_running_stats=True, momentum=None)),
        ("BatchNorm2d", 2, dict(save="input")),
        ("BatchNorm2d", 2, dict(bias=False)),  # issue 15: a weight without a bias
        ("BatchNorm1d-NC", 1, {}),
        ("BatchNorm1d-NCL", 1, {}),
        ("BatchNorm3d", 3, {}),
    ]
    cases = []
    for kind, dim, opt in specs:
        shapes, tiny = _BATCH_SHAPES[kind]
        tracking = opt.get("track_running_stats", True)
        fixed = {k: v for k, v in opt.items() if k != "save"}
        cases.append(LayerCase(
            name=f"BatchNormAct{kind.removeprefix('BatchNorm')}-identity" + (f"-{_flags(**opt)}" if opt else ""),
            family="batch",
            build=_builder(dim, fixed, opt.get("save", "auto")),
            shapes=shapes,
            forward=batch_forward,
            backward=batch_backward,
            gradcheck_shape=tiny,
            has_torch=TORCH_NORM_HAS_BIAS or "bias" not in opt,
            has_running_stats=tracking,
            counts_batches=tracking,
            tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
        ))
    return cases


def _activation_cases() -> list[LayerCase]:
    shapes, tiny = _BATCH_SHAPES["BatchNorm2d"]
    specs = [
        ("relu", {}, {}),
        ("leaky_relu", dict(negative_slope=0.1), dict(negative_slope=0.1)),
        ("elu", dict(alpha=0.7), dict(alpha=0.7)),
        ("silu", {}, {}),
        ("leaky_relu", dict(negative_slope=0.1, save="input"), dict(negative_slope=0.1)),
        # issue 15: without a bias, each saving mode recovers x_hat from the output (or keeps the input)
        ("leaky_relu", dict(negative_slope=0.1, bias=False), dict(negative_slope=0.1)),
        ("silu", dict(bias=False), {}),
        ("elu", dict(alpha=0.7, bias=False, save="input"), dict(alpha=0.7)),
    ]
    cases = []
    for act, opts, ref_opts in specs:
        forward, backward = _act_reference(act, **ref_opts)
        cases.append(LayerCase(
            name=f"BatchNormAct2d-{act}" + (f"-{_flags(**opts)}" if opts else ""),
            family="batch",
            build=_act_builder(act, **opts),
            shapes=shapes,
            forward=forward,
            backward=backward,
            gradcheck_shape=tiny,
            has_torch=False,
            has_running_stats=True,
            counts_batches=True,
            tunable=("eps", "momentum"),
        ))
    return cases


CASES: list[LayerCase] = _identity_cases() + _activation_cases()
