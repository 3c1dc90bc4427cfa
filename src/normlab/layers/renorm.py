"""Batch renormalization (Ioffe 2017): BatchRenorm1d/2d/3d, and the paper's r_max/d_max schedule.

Batch norm normalizes a training batch with its own statistics but an evaluated model with the
running ones; with small or non-i.i.d. batches the two differ and the model that was trained is
not the one that is evaluated. Batch renormalization corrects each training batch towards the
running statistics, per channel, with ``sigma_B = sqrt(var_B + eps)`` and
``sigma = sqrt(running_var + eps)``::

    r = clip(sigma_B / sigma, 1 / r_max, r_max)      d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

where r and d are constants for backpropagation. With ``r = 1, d = 0`` this is batch norm;
unclipped (``r_max, d_max`` large) it is the running-statistics (eval) transform itself, so
training and inference agree. In eval mode the layer is batch norm with running statistics,
and its state dict is a torch ``BatchNorm`` state dict (a BatchNorm checkpoint loads).

The running statistics are updated exactly as batch norm updates them (torch's ``momentum``,
unbiased ``running_var``, ``num_batches_tracked + 1``), after r and d are computed from their
values before the batch.

``r_max`` and ``d_max`` are numbers (constants) or schedules: callables ``step -> value``,
evaluated at ``num_batches_tracked`` (the training steps taken so far) at every training step.
The default is Ioffe's schedule (:func:`renorm_schedule`): batch norm (``r_max = 1, d_max = 0``)
for the first 5000 steps, while the running statistics settle, then both limits relaxed linearly
to ``r_max = 3`` at step 40000 and ``d_max = 5`` at step 25000. A short run should shorten it,
e.g. ``BatchRenorm2d(64, **renorm_schedule(warmup_steps=500, r_max_at=4000, d_max_at=2500))``.

Speed: in training, torch's statistics kernel (``torch.batch_norm_update_stats``, the passes
its training kernel makes first) gives the batch statistics, then torch's inference kernel
applies ``x_hat * (gamma r) + (gamma d + beta)`` in one pass, and the backward is torch's
batch-norm backward with weight ``gamma r``: torch's own work, plus a few per-channel ops.
Channel-innermost CPU input with ``stable_stats`` (2-D, channels_last) gets normlab's accurate
statistics instead, as normlab's BatchNorm does. Figures in ``benchmarks/bench_variants.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import functional as NF
from .batch import _BatchNormMixin

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "LinearRamp", "renorm_schedule"]


@dataclass(frozen=True)
class LinearRamp:
    """A schedule over training steps: ``start`` up to step ``begin``, then linear to ``end`` at
    step ``finish``, and ``end`` after it.

    ``ramp(step)`` takes an int (and returns a float) or an int64 tensor such as
    ``num_batches_tracked`` (and returns a float32 tensor on its device, so that accelerators
    need no host synchronization). A frozen dataclass, so layers holding one pickle and deepcopy.

    >>> ramp = LinearRamp(start=1.0, end=3.0, begin=5000, finish=40000)
    >>> ramp(0), ramp(5000), ramp(22500), ramp(40000), ramp(10**6)
    (1.0, 1.0, 2.0, 3.0, 3.0)
    """

    start: float
    end: float
    begin: int
    finish: int

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"LinearRamp: {name} must be a finite number, got {value!r}.")
        for name in ("begin", "finish"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LinearRamp: {name} must be an int >= 0 (a training step), got {value!r}.")
        if self.finish < self.begin:
            raise ValueError(
                f"LinearRamp: finish (the step where the ramp reaches its end value) must be >= begin, "
                f"got begin={self.begin}, finish={self.finish}."
            )

    def __call__(self, step: int | Tensor) -> float | Tensor:
        span = max(self.finish - self.begin, 1)
        if isinstance(step, Tensor):
            frac = ((step.to(torch.float32) - self.begin) / span).clamp(0.0, 1.0)
            return self.start + (self.end - self.start) * frac
        if step <= self.begin:
            return float(self.start)
        if step >= self.finish:
            return float(self.end)
        return self.start + (self.end - self.start) * (step - self.begin) / span


def renorm_schedule(
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    warmup_steps: int = 5000,
    r_max_at: int = 40000,
    d_max_at: int = 25000,
) -> dict[str, LinearRamp]:
    """Ioffe's (2017) r_max/d_max schedule, as keyword arguments for :class:`BatchRenorm2d` & co.

    ``r_max = 1, d_max = 0`` (batch norm) for the first ``warmup_steps`` steps, then linear
    ramps to ``r_max`` at step ``r_max_at`` and to ``d_max`` at step ``d_max_at``. The defaults
    are the paper's (section 4.1: "r_max = 1, d_max = 0 for the first 5000 training steps, after
    which these were gradually relaxed to reach r_max = 3 at 40k steps, and d_max = 5 at 25k
    steps"; "gradually" is taken as linear). Scale the steps to the length of your training.

    >>> s = renorm_schedule()
    >>> s["r_max"](5000), s["r_max"](40000), s["d_max"](15000), s["d_max"](25000)
    (1.0, 3.0, 2.5, 5.0)
    >>> from normlab.layers.renorm import BatchRenorm2d
    >>> BatchRenorm2d(8, **renorm_schedule(warmup_steps=100, r_max_at=800, d_max_at=500)).r_max
    LinearRamp(start=1.0, end=3.0, begin=100, finish=800)
    """
    if not r_max >= 1.0:
        raise ValueError(f"renorm_schedule: r_max must be >= 1, got {r_max!r}.")
    if not d_max >= 0.0:
        raise ValueError(f"renorm_schedule: d_max must be >= 0, got {d_max!r}.")
    return {
        "r_max": LinearRamp(1.0, float(r_max), warmup_steps, r_max_at),
        "d_max": LinearRamp(0.0, float(d_max), warmup_steps, d_max_at),
    }


Limit = float | Callable[[int], float]
_PAPER = renorm_schedule()


def _check_limit(owner: str, name: str, value: object, low: float) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{owner}: {name} must be a number >= {low:g} or a schedule (a callable step -> value, "
            f"e.g. normlab.LinearRamp), got {type(value).__name__} {value!r}."
        )
    if not value >= low:
        raise ValueError(
            f"{owner}: {name} must be >= {low:g} ({name} = {low:g} turns the correction off), got {value!r}."
        )


class _BatchRenormMixin(_BatchNormMixin):
    """What BatchRenorm1d/2d/3d add to batch norm (they differ only in the input check): the
    limits and their schedules, and :func:`normlab.functional.batch_renorm`."""

    _functional = staticmethod(NF.batch_renorm)

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
        r_max: Limit = _PAPER["r_max"],
        d_max: Limit = _PAPER["d_max"],
        **options,
    ) -> None:
        owner = type(self).__name__
        _check_limit(owner, "r_max", r_max, 1.0)
        _check_limit(owner, "d_max", d_max, 0.0)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.r_max = r_max
        self.d_max = d_max

    def limits(self, step: int | Tensor | None = None) -> tuple[float | Tensor, float | Tensor]:
        """``(r_max, d_max)`` at ``step`` (default: ``num_batches_tracked``, the next training step).

        Constants come back as given; a :class:`LinearRamp` on an accelerator gets the count as a
        tensor (no host synchronization); any other schedule gets it as an int.
        """
        if step is None:
            step = self._buffers.get("num_batches_tracked")
            if step is None:
                step = 0
        values = []
        for name, schedule, low in (("r_max", self.r_max, 1.0), ("d_max", self.d_max, 0.0)):
            if not callable(schedule):
                values.append(schedule)
                continue
            on_device = isinstance(step, Tensor) and step.device.type != "cpu"
            at = step if on_device and isinstance(schedule, LinearRamp) else int(step)
            value = schedule(at)
            if isinstance(value, Tensor):
                values.append(value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(
                    f"{self._label()}: the {name} schedule {schedule!r} returned {value!r} at step {at}; "
                    f"it must return a number >= {low:g} (or a 0-dim tensor)."
                )
            values.append(float(value))
        return values[0], values[1]

    def forward(self, input: Tensor) -> Tensor:
        return self._batch_norm_forward(input)

    def _variant_options(self, update: bool) -> dict:
        # The limits at this step, for a training step with running statistics to correct towards
        # (elsewhere batch renorm is batch norm, and a schedule is not called). Inside
        # normlab.accumulate each micro-batch is corrected towards the running statistics as
        # they stand, which move once, at the optimizer step.
        if not update:
            return {}
        r_max, d_max = self.limits(self._buffers["num_batches_tracked"])
        return {"r_max": r_max, "d_max": d_max}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max!r}, d_max={self.d_max!r}"


class BatchRenorm1d(_BatchRenormMixin, nn.BatchNorm1d):
    """Batch renormalization over ``(N, C)`` or ``(N, C, L)`` input (Ioffe 2017).

    Training: ``y = gamma * (x_hat * r + d) + beta`` with the batch's ``x_hat`` and the
    corrections ``r = clip(sigma_B / sigma, 1/r_max, r_max)``,
    ``d = clip((mu_B - running_mean) / sigma, -d_max, d_max)`` (constants in backprop; see
    :mod:`normlab.layers.renorm`). Eval: batch norm with the running statistics.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`normlab.BatchNorm1d` (torch's). Without running statistics
            (``track_running_stats=False``) there is nothing to correct towards: batch norm.
        r_max: the largest scale correction, a number >= 1 or a schedule ``step -> value``;
            default Ioffe's schedule, 1 until step 5000, then linear to 3 at step 40000.
        d_max: the largest shift correction, a number >= 0 or a schedule; default 0 until step
            5000, then linear to 5 at step 25000. See :func:`renorm_schedule`.
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): as
            :class:`normlab.BatchNorm1d`.

    Inside ``normlab.accumulate`` each micro-batch is corrected towards the running statistics
    as they stand, which move once per optimizer step; the schedules then count optimizer steps.

    >>> import torch
    >>> from normlab.layers.renorm import BatchRenorm1d
    >>> layer = BatchRenorm1d(3, r_max=3.0, d_max=5.0)
    >>> layer(torch.randn(16, 3)).shape
    torch.Size([16, 3])
    """


class BatchRenorm2d(_BatchRenormMixin, nn.BatchNorm2d):
    """Batch renormalization over ``(N, C, H, W)`` input; arguments as :class:`BatchRenorm1d`.

    >>> import torch
    >>> from normlab.layers.renorm import BatchRenorm2d
    >>> layer = BatchRenorm2d(64)  # Ioffe's schedule: batch norm for 5000 steps first
    >>> layer.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
    <All keys matched successfully>
    """


class BatchRenorm3d(_BatchRenormMixin, nn.BatchNorm3d):
    """Batch renormalization over ``(N, C, D, H, W)`` input; arguments as :class:`BatchRenorm1d`."""
