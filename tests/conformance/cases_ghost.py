"""Conformance cases of GhostBatchNorm1d/2d/3d against :func:`normlab.reference.ghost_batch_norm`.

The reference is batch norm applied virtual batch by virtual batch (the float64
:func:`normlab.reference.batch_norm` on each slice, running statistics passed along). Small
virtual batch sizes make every sample shape hold several virtual batches, with a smaller last
one; the property test's random batch sizes (2 to 6) also hit a rest of one sample, which joins
the virtual batch before it. The larger shapes give channel-innermost virtual batches of at
least 256 values per channel (normlab's blocked statistics, the general path) next to the
kernel path of the others.

``counts_batches`` is False only because the generic check expects one count per call: the
count grows by one per virtual batch, and the reference's count is compared exactly anyway.
torch.nn has no ghost batch norm (``has_torch=False``); tests/layers/test_ghost.py compares with
torch's BatchNorm applied chunk by chunk.
"""

from __future__ import annotations

import numpy as np

from normlab import reference as ref
from normlab.layers import ghost

from .cases import LayerCase, RefStep, Snapshot, _flags, _grads


def ghost_adapters(virtual_batch_size: int):
    """The reference forward and backward for a fixed virtual batch size."""

    def forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
        y, rm, rv, count = ref.ghost_batch_norm(
            x, virtual_batch_size, s.running_mean, s.running_var, s.weight, s.bias,
            training=training, momentum=s.momentum, eps=s.eps,
            num_batches_tracked=s.num_batches_tracked or 0, unbiased=s.unbiased,
        )
        return RefStep(y, rm, rv, None if s.num_batches_tracked is None else count)

    def backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> dict:
        dx, dw, db = ref.ghost_batch_norm_backward(
            dy, x, virtual_batch_size, s.weight, s.eps, training=training,
            running_mean=s.running_mean, running_var=s.running_var,
        )
        return _grads(s, dx, dw, db)

    return forward, backward


def _builder(cls_name: str, **fixed):
    def build(lib, shape, **overrides):
        return getattr(ghost, cls_name)(shape[1], **{**fixed, **overrides})

    return build


_SHAPES = {
    # (class, virtual_batch_size, shapes, gradcheck shape)
    "GhostBatchNorm1d-NC": ("GhostBatchNorm1d", 3, ((8, 4), (600, 4)), (5, 3)),
    "GhostBatchNorm1d-NCL": ("GhostBatchNorm1d", 3, ((7, 3, 5), (8, 3, 40)), (5, 2, 3)),
    "GhostBatchNorm2d": ("GhostBatchNorm2d", 2, ((5, 3, 5, 5), (4, 3, 16, 16)), (4, 2, 2, 2)),
    "GhostBatchNorm3d": ("GhostBatchNorm3d", 2, ((3, 3, 3, 4, 5), (4, 3, 4, 8, 8)), (4, 2, 2, 2, 1)),
}


def _cases() -> list[LayerCase]:
    cases = []
    for kind, (cls_name, vbs, shapes, tiny) in _SHAPES.items():
        options = [dict(virtual_batch_size=vbs)]
        if kind in ("GhostBatchNorm2d", "GhostBatchNorm1d-NC"):
            options += [
                dict(virtual_batch_size=vbs, affine=False),
                dict(virtual_batch_size=vbs, track_running_stats=False),
                dict(virtual_batch_size=vbs, momentum=None),
                dict(virtual_batch_size=vbs, unbiased=False),
                dict(virtual_batch_size=vbs, bias=False),  # issue 15: a weight without a bias
            ]
        if kind == "GhostBatchNorm1d-NC":
            options.append(dict(virtual_batch_size=256))  # (600, 4): 256 + 256 + 88 rows
        for opt in options:
            tracking = opt.get("track_running_stats", True)
            forward, backward = ghost_adapters(opt["virtual_batch_size"])
            cases.append(LayerCase(
                name=f"{kind}-{_flags(**opt)}",
                family="batch",
                build=_builder(cls_name, **opt),
                shapes=shapes,
                forward=forward,
                backward=backward,
                gradcheck_shape=tiny,
                has_torch=False,
                has_running_stats=tracking,
                counts_batches=False,
                tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
            ))
    return cases


CASES = _cases()
