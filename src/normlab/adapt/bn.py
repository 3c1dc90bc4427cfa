"""Batch norms that follow the test data: statistics mixed from the source and each test batch.

Schneider et al. 2020 ("Improving robustness against common corruptions by covariate shift
adaptation") treat the source statistics a batch norm learned in training as a prior worth
``N`` samples and each test batch of ``n`` samples as new evidence. Every adapted batch norm
normalizes each test batch with ::

    w_s = N / (N + n),    w_t = n / (N + n)
    mean = w_s * running_mean + w_t * batch_mean
    var  = w_s * running_var  + w_t * batch_var          (batch_var biased, as in training)
    y    = act((x - mean) / sqrt(var + eps) * weight + bias)

``n`` is the number of samples in the batch (``x.shape[0]``), not of values per channel, as in
the paper. ``N = 0`` is the test batch's statistics alone (what the layer computes in training
mode, without updating anything); ``N -> inf`` gives back the source model. The variances are
mixed like the means, as the paper does, without the between-means term
``w_s * w_t * (running_mean - batch_mean)^2`` that the variance of the pooled sample would have:
the published method, whose numbers the lab compares against, is the one implemented.

Which modules: every batch norm :func:`normlab.layers.kinds.norm_kind` recognizes and can vouch
for (``unknown is None``): torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, normlab's batch
norms of every variant (plain, ``BatchNormAct`` with its activation, ``GhostBatchNorm``,
``BatchRenorm``, the synchronized ones), other libraries' norm-act subclasses whose formula
checks out, and frozen batch norms (normlab's, torchvision's ``FrozenBatchNorm2d``):

* frozen norms are adapted too (``include_frozen=True``, the default): their buffers are source
  statistics like any other, and a detection backbone whose norms are all frozen could not be
  adapted otherwise. Their affine map stays fixed (it is buffers, not parameters).
* the test statistics are those of the whole test batch for every variant: ghost batch norm's
  virtual batches and batch renorm's corrections are training devices, and both layers
  normalize with running statistics at inference, which is what is replaced here.
* synchronized norms use the local batch (no collective at inference): each process adapts to
  its own test batch.
* a norm called with a ``mask`` (normlab's ``forward(input, mask)``) takes its test statistics
  from the valid positions and outputs zeros at the padded ones, as the layer does in training.
* a batch norm without running statistics (``track_running_stats=False``) already normalizes
  with the test batch: it gets ``N = 0`` whatever the prior.
* batch norms normlab cannot vouch for (a subclass with its own forward whose eval output
  differs from its formula) are left as they are, with a warning naming them.

The adapted module's own forward runs first (it checks the input and mask as usual); a forward
hook then replaces its output. No state of the model changes: the running statistics stay the
source's, and every batch is mixed with them afresh.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.kinds import norm_kind
from ..stats import statistics_dtype
from ..surgery.recalibrate import call_mask, mask_position_of
from ..surgery.walk import find_modules

__all__ = ["adapt_bn", "adapted_norms", "adapting_bn", "mixed_statistics"]


def mixed_statistics(source_mean: Tensor, source_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                     prior: float, n: int) -> tuple[Tensor, Tensor]:
    """Schneider et al.'s mixed ``(mean, var)``: the source statistics weighted ``N / (N + n)``,
    the batch's ``n / (N + n)`` (see the module docstring); ``(C,)`` tensors in, ``(C,)`` out.

    >>> m, v = mixed_statistics(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([4.0]),
    ...                         torch.tensor([3.0]), prior=16, n=16)
    >>> m, v
    (tensor([2.]), tensor([2.]))
    """
    w_source = prior / (prior + n)
    return (w_source * source_mean + (1 - w_source) * batch_mean,
            w_source * source_var + (1 - w_source) * batch_var)


def _check_prior(prior: object, where: str) -> float:
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise TypeError(f"{where}: prior must be a number >= 0 (the source statistics' weight in samples, e.g. "
                        f"16; 0 = the test batch's statistics alone), got {type(prior).__name__} {prior!r}.")
    if not (prior >= 0 and math.isfinite(prior)):
        raise ValueError(f"{where}: prior must be a finite number >= 0 (the source statistics' weight in samples, "
                         f"e.g. 16; 0 = the test batch's statistics alone), got {prior!r}; to keep the source "
                         f"statistics, use the model itself.")
    return float(prior)


def _picks(include_frozen: bool):
    def pick(name: str, module: nn.Module) -> bool:
        kind = norm_kind(module)
        if kind is None or kind.unknown is not None:
            return False
        return kind.family == "batch" or (include_frozen and kind.family == "frozen")
    return pick


def adapted_norms(model: nn.Module, *, include_frozen: bool = True) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs :func:`adapt_bn` and :class:`~normlab.adapt.Tent` adapt, in
    ``named_modules`` order (found by :func:`normlab.surgery.find_modules`).

    >>> import normlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), normlab.BatchNormAct2d(4),
    ...                           normlab.FrozenBatchNorm2d(4), torch.nn.GroupNorm(2, 4))
    >>> [name for name, _ in adapted_norms(net)], [name for name, _ in adapted_norms(net, include_frozen=False)]
    (['1', '2'], ['1'])
    """
    return find_modules(model, _picks(include_frozen))


def _unverified(model: nn.Module) -> list[str]:
    return [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
            if (kind := norm_kind(m)) is not None and kind.is_batchnorm and kind.unknown]


class _MixedNorm:
    """The forward hook (and pre-hook) of one adapted norm: its output, recomputed with the mixed
    statistics. A picklable object, not a closure, so that ``copy.deepcopy`` of an adapted model
    copies it with the model."""

    def __init__(self, module: nn.Module, name: str, prior: float, where: str, what: str) -> None:
        kind = norm_kind(module)
        self.activation = None if kind.activation is None else kind.activation.eval()
        self.mask_position = mask_position_of(module)
        self.name, self.prior, self.where, self.what = name, prior, where, what

    def check(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        label = f"{self.where}: the batch norm '{self.name}' ({type(module).__name__})"
        if module.training:
            raise ValueError(
                f"{label} is in training mode; {self.what} normalizes every batch itself and must not update the "
                f"running statistics. Call .eval() on the adapted model (model.eval()) before running it.")
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == 1 and self._prior(module) == 0:
            raise ValueError(
                f"{label} got a batch of one sample, but {self.what} normalizes with the test batch's statistics "
                f"alone (prior=0), and one sample's statistics are its own: its features would be normalized "
                f"away. Use batches of several samples, or a prior > 0 (e.g. prior=16) to mix in the source "
                f"statistics.")

    def _prior(self, module: nn.Module) -> float:
        # A norm without running statistics has no source to mix in: the test batch alone.
        return self.prior if getattr(module, "running_mean", None) is not None else 0.0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
        x = args[0] if args else kwargs["input"]
        mask = call_mask(args, kwargs, self.mask_position)
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(module.running_mean.dtype)  # an integer image, as the frozen layers take it
        acc = statistics_dtype(x.dtype)
        xs = x.to(acc)
        axes = [0, *range(2, x.dim())]
        view = (1, -1) + (1,) * (x.dim() - 2)
        valid = None
        if mask is None:
            var_t, mean_t = torch.var_mean(xs, dim=axes, correction=0)
        else:
            valid = mask.to(x.device).unsqueeze(1).expand(x.shape[0], 1, *x.shape[2:])
            count = valid.sum()
            if int(count) < (2 if self._prior(module) == 0 else 1):
                raise ValueError(
                    f"{self.where}: the batch norm '{self.name}' got {int(count)} valid position(s) per channel "
                    f"under its mask; the test statistics need at least 2 with prior=0 (1 with a prior > 0). "
                    f"Use batches with more valid positions.")
            # torch.where, not a product with the mask: the padding may hold NaN or inf.
            mean_t = torch.where(valid, xs, 0).sum(axes) / count
            var_t = torch.where(valid, (xs - mean_t.view(view)) ** 2, 0).sum(axes) / count
        prior = self._prior(module)
        if prior > 0:
            mean, var = mixed_statistics(module.running_mean.to(acc), module.running_var.to(acc), mean_t, var_t,
                                         prior, x.shape[0])
        else:
            mean, var = mean_t, var_t
        scale = torch.rsqrt(var + module.eps)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None:
            scale = scale * weight.to(acc)
        out = (xs - mean.view(view)) * scale.view(view)
        if bias is not None:
            out = out + bias.to(acc).view(view)
        out = out.to(x.dtype)
        if self.activation is not None:
            out = self.activation(out)
        if valid is not None:
            out = torch.where(valid, out, 0)
        return out


def _install(model: nn.Module, prior: float, include_frozen: bool, where: str, what: str) -> list:
    """Hooks on every adapted norm of ``model``; their handles. Raises if there is none."""
    unverified = _unverified(model)
    if unverified:
        warnings.warn(
            f"{where}: left {', '.join(unverified)} as they are: normlab cannot tell what they compute "
            f"(norm_kind's check of their eval formula failed), so they keep the source statistics.",
            UserWarning, stacklevel=3)
    norms = adapted_norms(model, include_frozen=include_frozen)
    if not norms:
        frozen = "" if include_frozen else " (include_frozen=False leaves frozen batch norms out)"
        raise ValueError(
            f"{where}: the model has no batch norm to adapt{frozen}: {what} changes the statistics batch norms "
            f"normalize with (torch.nn.BatchNorm*d, normlab's batch norms, frozen batch norms). A model with only "
            f"group, layer or instance norm (or none) computes its statistics per sample already.")
    handles = []
    for name, module in norms:
        hook = _MixedNorm(module, name, prior, where, what)
        handles.append(module.register_forward_pre_hook(hook.check, with_kwargs=True))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def _check_model(model: object, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if model.training:
        raise ValueError(
            f"{where}: the model is in training mode; test-time adaptation runs a trained model at inference. Call "
            f"model.eval() first (the adapted norms then normalize with the test batches' statistics, and dropout "
            f"and the like stay off).")


def adapt_bn(model: nn.Module, prior: float = 16, *, include_frozen: bool = True) -> nn.Module:
    """A copy of ``model`` whose batch norms normalize each batch with statistics mixed from the
    source's and the batch's own (Schneider et al. 2020; formula in the module docstring).

    Args:
        model: a trained model in eval mode, with batch norms (left untouched).
        prior: ``N``, the source statistics' weight in samples (default 16); a batch of ``n``
            samples gets weight ``n / (N + n)``. ``0``: the batch's statistics alone.
        include_frozen: adapt frozen batch norms too (default True).

    Returns:
        A deep copy of ``model`` (same class, parameters and buffers) whose adapted norms carry
        forward hooks; its state never changes as it runs. Keep it in eval mode.

    Raises:
        TypeError: ``model`` is not a module, or ``prior`` not a number.
        ValueError: the model is in training mode, has no batch norm, or ``prior`` is negative
            or infinite. When run: a norm in training mode, or a batch of one sample with
            ``prior=0``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    >>> x = torch.randn(8, 3) * 5 + 2
    >>> y = adapt_bn(net, prior=0)(x)
    >>> torch.allclose(y, net[1].train()(net[0](x)), atol=1e-5)  # the batch's own statistics
    True
    """
    where = "adapt_bn"
    _check_model(model, where)
    prior = _check_prior(prior, where)
    adapted = copy.deepcopy(model)
    _install(adapted, prior, include_frozen, where, "adapt_bn")
    return adapted


@contextmanager
def adapting_bn(model: nn.Module, prior: float = 16, *, include_frozen: bool = True) -> Iterator[nn.Module]:
    """:func:`adapt_bn` as a context manager, on ``model`` itself: inside the block its batch norms
    follow each batch; on leaving it (an exception included) the hooks are removed. No parameter
    or buffer changes, so the model is afterwards as it was. Yields ``model``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    >>> x = torch.randn(8, 3) + 3
    >>> with adapting_bn(net, prior=0):
    ...     inside = net(x)
    >>> torch.allclose(inside, net(x))
    False
    """
    where = "adapting_bn"
    _check_model(model, where)
    prior = _check_prior(prior, where)
    handles = _install(model, prior, include_frozen, where, "adapting_bn")
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
