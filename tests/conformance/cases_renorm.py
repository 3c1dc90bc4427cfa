"""Conformance cases of BatchRenorm1d/2d/3d (Ioffe 2017) against :func:`normlab.reference.batch_renorm`.

Two kinds of configuration:

* ``r_max=1, d_max=0``: r = 1 and d = 0 exactly, batch norm; with every option combination.
* tight limits ``r_max=1.001, d_max=0.001`` with ``momentum=0``: the corrections are in
  force (r = 1.001 or 1/1.001 and d = +-0.001: the output differs from batch norm by ~100
  times the float32 tolerance of 1e-5) and clipped, so the layer's gradient, which holds r and
  d constant by design, is also the true derivative that ``gradcheck`` measures;
  ``momentum=0`` keeps the running statistics, and so r and d, the same across gradcheck's
  many training-mode calls. (For the seeded gradcheck inputs |sigma_B / sigma - 1| >= 0.06
  and |mu_B - mu| / sigma >= 0.009 in every channel; a case renamed, and so reseeded, could
  leave a channel unclipped and fail gradcheck for that reason alone.) Unclipped corrections,
  whose gradient differs from the true derivative on purpose, are checked against the
  reference in tests/layers/test_renorm.py.

torch.nn has no batch renorm (``has_torch=False``); tests/layers/test_renorm.py cross-loads state
dicts with torch's BatchNorm and compares with it where r = 1, d = 0.
"""

from __future__ import annotations

import numpy as np

from normlab import reference as ref
from normlab.layers import renorm

from .cases import LayerCase, RefStep, Snapshot, _flags, _grads

EQUAL_BN = dict(r_max=1.0, d_max=0.0)
CLIPPED = dict(r_max=1.001, d_max=0.001, momentum=0.0)


def renorm_adapters(r_max: float, d_max: float):
    """The reference forward and backward for fixed limits (the Snapshot does not carry them)."""

    def forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
        y, rm, rv, count = ref.batch_renorm(
            x, s.running_mean, s.running_var, s.weight, s.bias, training=training,
            momentum=s.momentum, eps=s.eps, r_max=r_max, d_max=d_max,
            num_batches_tracked=s.num_batches_tracked or 0, unbiased=s.unbiased,
        )
        return RefStep(y, rm, rv, None if s.num_batches_tracked is None else count)

    def backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> dict:
        dx, dw, db = ref.batch_renorm_backward(
            dy, x, s.running_mean, s.running_var, s.weight, s.eps, r_max=r_max, d_max=d_max,
            training=training,
        )
        return _grads(s, dx, dw, db)

    return forward, backward


def _builder(cls_name: str, **fixed):
    def build(lib, shape, **overrides):
        return getattr(renorm, cls_name)(shape[1], **{**fixed, **overrides})

    return build


_SHAPES = {
    "BatchRenorm1d-NC": ("BatchRenorm1d", ((8, 4), (300, 4)), (5, 3)),
    "BatchRenorm1d-NCL": ("BatchRenorm1d", ((4, 3, 5), (8, 3, 40)), (3, 2, 3)),
    "BatchRenorm2d": ("BatchRenorm2d", ((4, 3, 5, 5), (4, 3, 8, 8)), (2, 2, 2, 3)),
    "BatchRenorm3d": ("BatchRenorm3d", ((2, 3, 3, 4, 5), (4, 3, 4, 4, 4)), (2, 2, 2, 2, 2)),
}


def _cases() -> list[LayerCase]:
    cases = []
    for kind, (cls_name, shapes, tiny) in _SHAPES.items():
        options = [dict(EQUAL_BN), dict(CLIPPED)]
        if kind == "BatchRenorm2d":
            options += [
                dict(EQUAL_BN, affine=False),
                dict(EQUAL_BN, track_running_stats=False),
                dict(EQUAL_BN, momentum=None),
                dict(CLIPPED, affine=False),
                dict(CLIPPED, unbiased=False),
                dict(CLIPPED, bias=False),  # issue 15: a weight without a bias
            ]
        for opt in options:
            tracking = opt.get("track_running_stats", True)
            forward, backward = renorm_adapters(opt["r_max"], opt["d_max"])
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
                counts_batches=tracking,
                tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
            ))
    return cases


CASES = _cases()
