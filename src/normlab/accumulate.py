"""Gradient accumulation that batch norm's running statistics understand.

Under gradient accumulation one optimizer step sees ``k`` micro-batches. torch's batch-norm
layers update their running statistics at every micro-batch: ``k`` moving-average steps per
optimizer step, each from a batch ``k`` times smaller (the running mean forgets ``k`` times
faster, the running variance averages small-batch estimates, ``num_batches_tracked`` counts
micro-batches). Inside ``with normlab.accumulate(model):`` every normlab batch-norm layer of
``model`` instead

* normalizes each micro-batch with that micro-batch's own statistics, exactly as without the
  block (so outputs and gradients are those of plain micro-batch training);
* leaves its running statistics alone, and pools the micro-batches' sufficient statistics
  (count ``n``, mean, ``M2 = n * biased variance``) by Chan, Golub & LeVeque's rule::

      n     = n_a + n_b
      delta = mean_b - mean_a
      mean  = mean_a + delta * n_b / n
      M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

* and at the end of the block (or at each :meth:`Accumulation.step`, for several optimizer
  steps inside one block) applies ONE update from the pooled statistics: mean, ``M2 / n`` as the
  batch variance, ``n`` values per channel. That is the update that one training step on the
  concatenated micro-batches would make (momentum, ``momentum=None``'s cumulative average,
  the unbiased correction ``n / (n - 1)`` with the full ``n``, ``num_batches_tracked + 1``).

Normalizing with the pooled statistics instead would need every micro-batch before the first
forward, which gradient accumulation does not have; it is not offered. Masked micro-batches pool
their valid positions. A micro-batch with non-finite statistics makes the pooled ones non-finite,
and the step's update is skipped as the layer's ``on_nonfinite`` says. When the block ends with an
exception, the pooled statistics are dropped and the running statistics stay as they were.
Under ``torch.utils.checkpoint`` a recomputed forward is not pooled again. Each process pools
its own micro-batches (under DDP, as torch's layers keep per-process statistics).

A layer joins by defining ``_apply_accumulated(mean, var, count)`` (one running-statistics
update from pooled statistics) and, in a training forward while its ``_accumulator`` attribute
is not None, calling ``self._accumulator.add(mean, biased_var, count)`` instead of updating.

Example::

    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), normlab.BatchNorm1d(3))
    >>> batch = torch.randn(32, 4)
    >>> from normlab.accumulate import accumulate
    >>> with accumulate(model):
    ...     for micro in batch.chunk(4):
    ...         model(micro).square().mean().backward()
    >>> int(model[1].num_batches_tracked)
    1
"""

from __future__ import annotations

import warnings
from types import TracebackType

from torch import Tensor, nn

from .stats import Moments

__all__ = ["Accumulation", "StatPool", "accumulate"]


class StatPool(Moments):
    """The pooled sufficient statistics (count, mean, M2) of the micro-batches one layer saw.

    >>> import torch
    >>> pool = StatPool()
    >>> pool.add(torch.tensor([1.0]), torch.tensor([0.0]), 2)   # values 1, 1
    >>> pool.add(torch.tensor([3.0]), torch.tensor([1.0]), 2)   # values 2, 4
    >>> pool.result()                                             # of 1, 1, 2, 4
    (tensor([2.]), tensor([1.5000]), 4)
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> None:
        # A copy of the model made inside the block (an EMA or SWA twin) is no part of the
        # block: it must not pool into a pool that no step() will ever apply.
        return None

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Pool a batch's per-channel mean and biased variance over ``count`` values."""
        self.merge(count, mean.detach(), var.detach() * count)

    def result(self) -> tuple[Tensor, Tensor, int] | None:
        """``(mean, biased variance, count)`` of everything pooled, or None when nothing was."""
        if self.count == 0:
            return None
        return self.mean, self.var, self.count


def _joins(module: nn.Module) -> bool:
    return callable(getattr(module, "_apply_accumulated", None))


class Accumulation:
    """The context manager that :func:`accumulate` returns; see :mod:`normlab.accumulate`."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"normlab.accumulate: expected the model (a torch.nn.Module), got "
                f"{type(model).__name__}; pass the module whose batch-norm layers should pool."
            )
        self.model = model
        self._layers: list[nn.Module] = []
        self._active = False

    def __enter__(self) -> Accumulation:
        if self._active:
            raise RuntimeError("normlab.accumulate: this block is already active; create a new one with "
                               "normlab.accumulate(model).")
        layers = [m for m in self.model.modules() if _joins(m)]
        for layer in layers:
            if layer.__dict__.get("_accumulator") is not None:
                raise RuntimeError(
                    f"normlab.accumulate: {type(layer).__name__} layer is already inside another "
                    f"normlab.accumulate block; nested blocks over the same layers are not supported "
                    f"(use one block and call .step() at each optimizer step)."
                )
        self._warn_foreign(layers)
        for layer in layers:
            layer._accumulator = StatPool()
        self._layers, self._active = layers, True
        return self

    def _warn_foreign(self, layers: list[nn.Module]) -> None:
        foreign = [
            name for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _joins(m)
            and m.training and m.track_running_stats
        ]
        if foreign:
            warnings.warn(
                f"normlab.accumulate: {len(foreign)} batch-norm layer(s) of the model are not "
                f"normlab layers and will update their running statistics at every micro-batch: "
                f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}. Replace them with "
                f"normlab.BatchNorm1d/2d/3d (they load torch's state dicts).",
                UserWarning,
                stacklevel=3,
            )

    def step(self) -> int:
        """Apply the pooled statistics (one update per layer that saw a training micro-batch),
        then start pooling afresh; returns the number of layers updated. Call it at each
        optimizer step when one block spans several; the end of the block calls it once more."""
        if not self._active:
            raise RuntimeError("normlab.accumulate: step() must be called inside the with block.")
        updated = 0
        for layer in self._layers:
            pool = layer._accumulator
            pooled = pool.result()
            pool.reset()
            if pooled is not None:
                layer._apply_accumulated(*pooled)
                updated += 1
        return updated

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.step()
        finally:
            for layer in self._layers:
                layer.__dict__.pop("_accumulator", None)
            self._layers, self._active = [], False


def accumulate(model: nn.Module) -> Accumulation:
    """A ``with`` block in which ``model``'s batch-norm layers update their running statistics
    once, from all micro-batches pooled, instead of once per micro-batch.

    See :mod:`normlab.accumulate` for the rule. Inside the block, training forwards pool; the
    end of the block (or ``.step()``) updates. Eval-mode forwards, and layers without running
    statistics, are as outside. torch.nn batch-norm layers in training mode cannot take part:
    entering warns and names them.

    Args:
        model: the module whose normlab batch-norm layers (at any depth) pool.

    Returns:
        an :class:`Accumulation`, whose ``step()`` applies the pooled update mid-block.

    >>> import torch, normlab
    >>> bn = normlab.BatchNorm1d(2)
    >>> x = torch.randn(12, 2)
    >>> from normlab.accumulate import accumulate
    >>> with accumulate(bn) as acc:
    ...     for step in range(2):            # two optimizer steps of 3 micro-batches each
    ...         for micro in x.chunk(3):
    ...             _ = bn(micro)
    ...         _ = acc.step()
    >>> int(bn.num_batches_tracked)
    2
    """
    return Accumulation(model)
