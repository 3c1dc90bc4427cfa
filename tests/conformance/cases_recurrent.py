"""Conformance cases of ``RecurrentBatchNorm`` (normlab.layers.recurrent) against
:func:`normlab.reference.batch_norm`, one time step at a time.

Two things separate the layer from what the generic checks expect, and this module bridges
both without changing the layer's API:

* **The call.** The layer is called ``layer(x, step, mask=None)``; the checks call
  ``layer(x)``. Each case's builder registers a forward pre-hook (:func:`_fixed_step`) that
  turns a bare ``layer(x)`` into ``layer(x, step, mask)`` with the case's step (and, for the
  masked case, a mask computed from N). Every check therefore runs the layer's own
  ``forward`` on an unmodified ``RecurrentBatchNorm`` (type, buffers, state dict, ``.to()``,
  ``deepcopy`` and ``torch.func.functional_call`` all as a user sees them); a call that passes
  a step itself is left alone. The hook lives here and not as a ``step=0`` default in the
  layer because a forgotten step in a time loop would then silently share one row of
  statistics over every step, the very thing the layer exists to prevent.
* **The statistics' shape.** Running statistics are ``(max_steps, C)`` and the count
  ``(max_steps,)``, while :func:`~tests.conformance.cases.snapshot` reads the count with
  ``int(...)``. The cases use ``max_steps=1``: one row, shapes ``(1, C)`` and ``(1,)``. The
  reference adapters read row 0 of the snapshot, run the float64 reference on it, and return
  ``(1, C)`` statistics, so the generic checks compare the layer's whole buffers. One case
  calls with ``step=4``, beyond ``max_steps - 1``, which must use (and update) the last row.
  Several rows, steps beyond ``max_steps`` and untouched rows are checked in
  tests/layers/test_recurrent.py.

The masked case marks every third row (index 2, 5, ...) as padding: the reference is batch
norm over the valid rows, zeros at padded rows (outputs and input gradients), parameter
gradients summed over the valid rows only. Any N >= 2 leaves at least two valid rows.

torch.nn has no per-step batch norm (``has_torch=False``): its statistics are ``(C,)``, so
the state-dict key/shape and cross-loading checks cannot apply; the numbers of one row equal
``torch.nn.BatchNorm1d``'s, which the reference here stands for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from normlab import reference as ref
from normlab.layers.recurrent import RecurrentBatchNorm

from .cases import Builder, LayerCase, RefStep, Shape, Snapshot, _flags, _grads


def _valid_rows(n: int) -> np.ndarray:
    """The masked case's valid rows: every row but indices 2, 5, 8, ..."""
    return np.arange(n) % 3 != 2


def _fixed_step(step: int, masked: bool):
    """A forward pre-hook making ``layer(x)`` call ``layer(x, step, mask)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if len(args) != 1 or kwargs:  # an explicit step (or mask): the caller's call stands
            return None
        x = args[0]
        mask = torch.as_tensor(_valid_rows(x.shape[0])).to(x.device) if masked else None
        return (x, step, mask), {}

    return hook


def _builder(step: int, masked: bool, **fixed) -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        layer = RecurrentBatchNorm(shape[1], max_steps=1, **{**fixed, **overrides})
        layer.register_forward_pre_hook(_fixed_step(step, masked), with_kwargs=True)
        return layer

    return build


def _row0(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a[0]


def _as_rows(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a[None, :]


def recurrent_adapters(masked: bool):
    """The reference forward and backward of a ``max_steps=1`` layer, row 0 of its statistics."""

    def valid(x: np.ndarray) -> np.ndarray:
        return _valid_rows(x.shape[0]) if masked else np.ones(x.shape[0], dtype=bool)

    def forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
        rows = valid(x)
        y_valid, rm, rv, count = ref.batch_norm(
            x[rows], _row0(s.running_mean), _row0(s.running_var), s.weight, s.bias,
            training=training, momentum=s.momentum, eps=s.eps,
            num_batches_tracked=s.num_batches_tracked or 0, unbiased=s.unbiased,
        )
        y = np.zeros_like(x)
        y[rows] = y_valid
        return RefStep(y, _as_rows(rm), _as_rows(rv), None if s.num_batches_tracked is None else count)

    def backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> dict:
        rows = valid(x)
        dx_valid, dw, db = ref.batch_norm_backward(
            dy[rows], x[rows], s.weight, s.eps, training=training,
            running_mean=_row0(s.running_mean), running_var=_row0(s.running_var),
        )
        dx = np.zeros_like(x)
        dx[rows] = dx_valid
        return _grads(s, dx, dw, db)

    return forward, backward


# (step, masked, constructor options). (N, C) input only: (300, 4) and (400, 4)
# have >= 256 (valid) rows per channel, normlab's blocked statistics path; (8, 4) the kernel's.
_SPECS: list[tuple[int, bool, dict]] = [
    (0, False, {}),
    (4, False, {}),  # a step beyond max_steps - 1 uses the last row
    (0, False, dict(affine=False)),
    (0, False, dict(bias=False)),
    (0, False, dict(track_running_stats=False)),
    (0, False, dict(momentum=None)),
    (0, False, dict(unbiased=False)),
    (2, True, {}),
]


def _cases() -> list[LayerCase]:
    cases = []
    for step, masked, opt in _SPECS:
        tracking = opt.get("track_running_stats", True)
        forward, backward = recurrent_adapters(masked)
        flags = _flags(max_steps=1, step=step, **({"mask": "every-third-padded"} if masked else {}), **opt)
        cases.append(LayerCase(
            name=f"RecurrentBatchNorm-{flags}",
            family="batch",
            build=_builder(step, masked, **opt),
            shapes=((8, 4), (400, 4)) if masked else ((8, 4), (300, 4)),
            forward=forward,
            backward=backward,
            gradcheck_shape=(5, 3),
            has_torch=False,
            has_running_stats=tracking,
            counts_batches=tracking,
            tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
        ))
    return cases


CASES = _cases()
