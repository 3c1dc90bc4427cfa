"""Conformance cases of FrozenBatchNorm1d/2d/3d: batch norm's eval formula in both modes.

The reference is :func:`normlab.reference.batch_norm` with ``training=False`` whatever the
layer's mode, and its eval-mode backward. Running statistics never move (``counts_batches`` is
False, and ``has_running_stats`` makes the harness check that they stay put in training).

weight and bias are buffers of a frozen layer, so by default they get no gradient. The generic
gradient checks compare the weight and bias gradients with the reference's, so the affine cases
mark those buffers ``requires_grad``, as a ``torch.func`` user differentiating through them
would: that checks the forward's dependence on γ and β as well. The layer's own tests
(tests/surgery/test_frozen.py) check that by default nothing but the ``(C,)`` scale is saved.
"""

from __future__ import annotations

import numpy as np

from normlab import reference as ref
from normlab.layers import frozen

from .cases import LayerCase, RefStep, Snapshot, _grads


def frozen_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    y, rm, rv, _ = ref.batch_norm(
        x, s.running_mean, s.running_var, s.weight, s.bias, training=False, eps=s.eps,
    )
    return RefStep(y, rm, rv, s.num_batches_tracked)


def frozen_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> dict:
    dx, dw, db = ref.batch_norm_backward(
        dy, x, s.weight, s.eps, training=False, running_mean=s.running_mean, running_var=s.running_var,
    )
    return _grads(s, dx, dw, db)


def _builder(cls_name: str, affine: bool, bias: bool = True):
    def build(lib, shape, **overrides):
        layer = getattr(frozen, cls_name)(shape[1], affine=affine, bias=bias, **overrides)
        for buffer in (layer.weight, layer.bias):
            if buffer is not None:
                buffer.requires_grad_(True)
        return layer

    return build


_SHAPES = {
    "FrozenBatchNorm1d-NC": ("FrozenBatchNorm1d", ((8, 4), (300, 4)), (5, 3)),
    "FrozenBatchNorm1d-NCL": ("FrozenBatchNorm1d", ((4, 3, 5),), (3, 2, 3)),
    "FrozenBatchNorm2d": ("FrozenBatchNorm2d", ((4, 3, 5, 5), (2, 3, 8, 8)), (2, 2, 2, 3)),
    "FrozenBatchNorm3d": ("FrozenBatchNorm3d", ((2, 3, 3, 4, 5),), (2, 2, 2, 2, 2)),
}

CASES = [
    LayerCase(
        name=f"{kind}-affine={affine}" + ("" if bias else "-bias=False"),
        family="batch",
        build=_builder(cls_name, affine, bias),
        shapes=shapes,
        forward=frozen_forward,
        backward=frozen_backward,
        gradcheck_shape=tiny,
        has_torch=False,  # torchvision has one (without num_batches_tracked); torch.nn does not
        has_running_stats=True,
        counts_batches=False,
        tunable=("eps",),
    )
    for kind, (cls_name, shapes, tiny) in _SHAPES.items()
    for affine, bias in ((True, True), (False, True), (True, False))
    # affine=False on two input kinds; a weight without a bias (issue 15) on one
    if (affine and bias) or (not affine and kind in ("FrozenBatchNorm2d", "FrozenBatchNorm1d-NC"))
    or (not bias and kind == "FrozenBatchNorm2d")
]
