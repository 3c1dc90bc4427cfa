"""Running-statistics estimators, and the momentum conventions of torch, Keras and Flax.

A batch-norm layer keeps a running mean and variance that it uses at inference. normlab
keeps torch's conventions by default, so that torch checkpoints load unchanged:

* ``momentum`` is the weight of the *new* batch: ``running = (1 - momentum) * running + momentum * batch``.
  ``momentum=None`` is the cumulative (equal-weight) average of every batch seen so far.
* ``running_var`` holds the *unbiased* batch variance (divisor ``n - 1``), while the batch is
  normalized with the biased one (divisor ``n``).

Keras and Flax call the same number a *decay*: the weight of the *old* value
(``running = decay * running + (1 - decay) * batch``, default 0.99), and their running variance
is biased. :func:`momentum_from_decay` and :data:`CONVENTIONS` convert between them.

Example::

    >>> import torch
    >>> from normlab import stats
    >>> rm, rv = stats.update_running_stats(torch.zeros(2), torch.ones(2),
    ...     batch_mean=torch.tensor([1.0, 2.0]), batch_var=torch.tensor([4.0, 4.0]), n=5, momentum=0.1)
    >>> rm, rv  # running_var uses the unbiased 4 * 5/4 = 5
    (tensor([0.1000, 0.2000]), tensor([1.4000, 1.4000]))
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import torch
from torch import Tensor

__all__ = [
    "Convention",
    "CONVENTIONS",
    "check_momentum",
    "statistics_dtype",
    "ema",
    "cumulative_average",
    "unbiased_var",
    "update_running_stats",
    "combine_moments",
    "Moments",
    "momentum_from_decay",
    "decay_from_momentum",
    "from_keras",
    "from_flax",
]


@dataclass(frozen=True)
class Convention:
    """How a framework defines its batch-norm running statistics.

    Attributes:
        framework: its name.
        momentum_meaning: ``"new"`` when momentum weights the new batch (torch), ``"old"`` when it
            weights the running value (Keras, Flax: a decay).
        default_momentum: the framework's default, in its own meaning.
        default_eps: the framework's default epsilon.
        running_var: ``"unbiased"`` (divisor n - 1) or ``"biased"`` (divisor n).
    """

    framework: str
    momentum_meaning: str
    default_momentum: float
    default_eps: float
    running_var: str

    @property
    def torch_momentum(self) -> float:
        """The default momentum expressed in torch's meaning (weight of the new batch)."""
        if self.momentum_meaning == "new":
            return self.default_momentum
        return momentum_from_decay(self.default_momentum)


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", "new", 0.1, 1e-5, "unbiased"),
    # keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3); moving_variance from ops.moments.
    "keras": Convention("keras", "old", 0.99, 1e-3, "biased"),
    # flax.linen.BatchNorm(momentum=0.99, epsilon=1e-5); var = mean(x^2) - mean(x)^2 over the batch.
    "flax": Convention("flax", "old", 0.99, 1e-5, "biased"),
}


def check_momentum(momentum: float | None, *, owner: str = "momentum") -> None:
    """Raise a ``ValueError``/``TypeError`` unless ``momentum`` is None or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(
            f"{owner}: momentum must be a float in [0, 1] or None (cumulative average), "
            f"got {type(momentum).__name__} {momentum!r}."
        )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{owner}: momentum must lie in [0, 1] (torch's meaning: the weight of the new batch), "
            f"got {momentum!r}. A Keras/Flax-style decay d converts as momentum = 1 - d "
            f"(normlab.stats.momentum_from_decay)."
        )


# 16-bit floating types: their 8- and 11-bit mantissas lose a moving average's small updates and
# the small terms of long sums.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype normlab computes and keeps statistics in for data of ``dtype``: float32 for
    float16 and bfloat16, ``dtype`` itself otherwise. Batch statistics of 16-bit input are
    accumulated in it, and running statistics stay in it when a module is cast to 16 bits
    (``model.half()``); outputs keep the input's dtype.

    >>> statistics_dtype(torch.bfloat16), statistics_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def ema(running: Tensor, batch: Tensor, momentum: float | Tensor) -> Tensor:
    """Exponential moving average, torch's meaning: ``(1 - momentum) * running + momentum * batch``.

    Computed as one ``lerp`` (``running + momentum * (batch - running)``), equal up to rounding.
    """
    return torch.lerp(running, batch, momentum)


def cumulative_average(running: Tensor, batch: Tensor, count_before: Tensor | int) -> Tensor:
    """Equal-weight average of all batches: ``running + (batch - running) / (count_before + 1)``.

    ``count_before`` is the number of batches already averaged into ``running``; a tensor keeps
    the update free of host synchronization on accelerators.
    """
    return running + (batch - running) / (count_before + 1)


def unbiased_var(biased_var: Tensor, n: int) -> Tensor:
    """Bessel's correction: the variance with divisor ``n - 1`` from the one with divisor ``n``."""
    if n < 2:
        raise ValueError(
            f"the unbiased variance needs at least 2 values per channel, got n={n}; "
            "use a larger batch or unbiased=False."
        )
    return biased_var * (n / (n - 1))


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    n: int,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | int = 0,
    unbiased: bool = True,
) -> tuple[Tensor, Tensor]:
    """New running mean and variance after one batch (the arguments are not modified).

    Args:
        running_mean, running_var: current running statistics, shape ``(C,)``.
        batch_mean, batch_var: the batch's mean and *biased* variance, shape ``(C,)``.
        n: values per channel in the batch (``N * prod(spatial)``).
        momentum: weight of the new batch; ``None`` for the cumulative average.
        num_batches_tracked: batches already in the running statistics (used when momentum is None).
        unbiased: store the unbiased batch variance (torch's convention) rather than the biased one.

    Returns:
        ``(new_running_mean, new_running_var)`` in the running statistics' dtype.
    """
    var = unbiased_var(batch_var, n) if unbiased else batch_var
    if batch_mean.dtype != running_mean.dtype:
        batch_mean = batch_mean.to(running_mean.dtype)
    if var.dtype != running_var.dtype:
        var = var.to(running_var.dtype)
    if momentum is None:
        return (
            cumulative_average(running_mean, batch_mean, num_batches_tracked),
            cumulative_average(running_var, var, num_batches_tracked),
        )
    return ema(running_mean, batch_mean, momentum), ema(running_var, var, momentum)


class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), merged part by part.

    Merging uses Chan, Golub & LeVeque's pairwise rule, stable where ``E[x^2] - E[x]^2`` is not::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + delta^2 * n_a n_b / n

    >>> import torch
    >>> m = Moments()
    >>> m.merge(2, torch.tensor([1.0]), torch.tensor([0.0]))   # values 1, 1
    >>> m.merge(2, torch.tensor([3.0]), torch.tensor([2.0]))   # values 2, 4
    >>> m.count, m.mean, m.var                                  # of 1, 1, 2, 4
    (4, tensor([2.]), tensor([1.5000]))
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything merged so far."""
        self.count: int = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Merge a part of ``count`` values per channel with this mean and M2 (no-op for 0)."""
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> Tensor | None:
        """The biased variance ``M2 / count`` (None before anything was merged)."""
        return None if self.count == 0 else self.m2 / self.count


def combine_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool per-part statistics into those of the whole (Chan, Golub & LeVeque's parallel formula).

    Args:
        counts: ``(P,)`` or ``(P, 1)`` values per channel in each part (0 for an empty part).
        means: ``(P, C)`` each part's mean (any value where the count is 0).
        m2s: ``(P, C)`` each part's sum of squared deviations from its own mean.

    Returns:
        ``(n, mean, m2)``: the total count, and the mean and sum of squared deviations of all
        parts together: ``mean = sum(n_p mean_p) / n``,
        ``m2 = sum(m2_p) + sum(n_p (mean_p - mean)^2)``, the between-part term included.

    >>> import torch
    >>> parts = [torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0], [5.0], [6.0]])]
    >>> n, mean, m2 = combine_moments(torch.tensor([2.0, 3.0]),
    ...     torch.stack([p.mean(0) for p in parts]), torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts]))
    >>> n, mean, m2 / n  # as the mean and biased variance of [1, 2, 4, 5, 6]
    (tensor(5.), tensor([3.6000]), tensor([3.4400]))
    """
    counts = counts.reshape(-1, 1).to(means.dtype)
    total = counts.sum()
    weights = counts / total.clamp_min(1)
    mean = (weights * torch.where(counts > 0, means, torch.zeros_like(means))).sum(0)
    between = counts * torch.square(torch.where(counts > 0, means - mean, torch.zeros_like(means)))
    return total, mean, m2s.sum(0) + between.sum(0)


def momentum_from_decay(decay: float) -> float:
    """torch's momentum from a Keras/Flax decay (weight of the old value): ``1 - decay``.

    Computed on the decimal numbers the floats stand for, so ``0.99`` gives exactly ``0.01``
    (float subtraction gives 0.010000000000000009).

    >>> momentum_from_decay(0.99), momentum_from_decay(0.9), momentum_from_decay(0.999)
    (0.01, 0.1, 0.001)
    """
    check_momentum(decay, owner="decay")
    return _one_minus(decay)


def decay_from_momentum(momentum: float) -> float:
    """Keras/Flax decay from torch's momentum: ``1 - momentum`` (decimal, like :func:`momentum_from_decay`).

    >>> decay_from_momentum(0.01), decay_from_momentum(0.1)
    (0.99, 0.9)
    """
    check_momentum(momentum)
    return _one_minus(momentum)


def _one_minus(value: float) -> float:
    # repr gives the shortest decimal that reads back as the same float: the number the user
    # wrote. 1 minus it is exact in decimal, then rounded once to the nearest float.
    return float(Decimal(1) - Decimal(repr(float(value))))


def _layer_kwargs(convention: Convention, decay: float | None, eps: float | None) -> dict:
    decay = convention.default_momentum if decay is None else decay
    return {
        "momentum": momentum_from_decay(decay),
        "eps": convention.default_eps if eps is None else float(eps),
        "unbiased": convention.running_var == "unbiased",
    }


def from_keras(momentum: float | None = None, epsilon: float | None = None) -> dict:
    """Keyword arguments that make a normlab batch norm update like Keras's ``BatchNormalization``.

    >>> from normlab import stats
    >>> stats.from_keras()  # doctest: +ELLIPSIS
    {'momentum': 0.01..., 'eps': 0.001, 'unbiased': False}
    """
    return _layer_kwargs(CONVENTIONS["keras"], momentum, epsilon)


def from_flax(momentum: float | None = None, epsilon: float | None = None) -> dict:
    """Keyword arguments that make a normlab batch norm update like Flax's ``nn.BatchNorm``."""
    return _layer_kwargs(CONVENTIONS["flax"], momentum, epsilon)
