"""Convert normalization layers in a model, freeze and unfreeze batch norms.

All three model tools go through :func:`normlab.surgery.walk.replace_modules` and return a
changed copy; the input model is left as it was.

* :func:`convert_norm` swaps each per-channel norm (batch norm by default) for another kind by
  registry name, carrying what the two share: γ and β always, running statistics when both
  keep them, eps and momentum unless given.
* :func:`freeze_bn` / :func:`unfreeze_bn` turn batch norms into
  :class:`~normlab.layers.frozen.FrozenBatchNorm2d` (and 1d/3d) and back, keeping every buffer.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import stats as _stats
from ..layers.batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm
from ..layers.registry import get_norm, norm_names
from .fold import computes_batchnorm
from .walk import Match, _predicate, replace_modules

__all__ = ["convert_norm", "freeze_bn", "unfreeze_bn"]

_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_NORMLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _is_per_channel_norm(module: nn.Module) -> bool:
    return _is_batchnorm(module) or isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))


def _channels(module: nn.Module) -> int:
    return getattr(module, "num_features", None) or module.num_channels


def _dim_of(module: nn.Module) -> int | None:
    """The spatial rank a per-channel norm expects (1 for (N, C) / (N, C, L)), if its class says."""
    for dim, classes in ((1, (nn.BatchNorm1d, FrozenBatchNorm1d, nn.InstanceNorm1d)),
                         (2, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.InstanceNorm2d)),
                         (3, (nn.BatchNorm3d, FrozenBatchNorm3d, nn.InstanceNorm3d))):
        if isinstance(module, classes):
            return dim
    return None


def _restricted(model: nn.Module, match: Match | None, default, where: str):
    """``default`` and the user's ``match`` (if any) together."""
    if match is None:
        return lambda name, m: default(m)
    user = _predicate(model, match, where)
    return lambda name, m: user(name, m) and default(m)


def _ref_tensor(module: nn.Module) -> Tensor | None:
    for t in (getattr(module, "weight", None), getattr(module, "running_mean", None)):
        if t is not None:
            return t
    return None


def _build_target(name: str, old: nn.Module, to: str, kw: dict) -> nn.Module:
    channels = _channels(old)
    dim = kw.pop("dim", None) or _dim_of(old)
    where = f"convert_norm: '{name or '<model>'}' ({type(old).__name__})"
    if to == "layer":
        # Layer norm over (C, *) with per-channel γ and β, valid for every input rank (the
        # registry's LayerNorm(C) would normalize the last dimension, which is not C for (N, C, H, W)).
        return get_norm("group", channels, num_groups=1, **kw)
    if to == "rms":
        if dim != 1:
            raise ValueError(
                f"{where}: 'rms' normalizes the trailing dimension, which is the channel dimension only "
                f"for (N, C) input (a BatchNorm1d's); this layer's input has its channels in dimension 1 of "
                f"a {dim + 2 if dim else 'higher'}-D tensor. Use to='layer' or to='group' instead."
            )
        return get_norm("rms", channels, **kw)
    if to in ("batch", "instance", "frozen"):  # the registry's families that take dim
        if dim is None:
            raise ValueError(f"{where}: to={to!r} needs the input rank; pass dim=1, 2 or 3.")
        return get_norm(to, channels, dim=dim, **kw)
    return get_norm(to, channels, **kw)


def _carry(name: str, old: nn.Module, new: nn.Module) -> None:
    where = f"convert_norm: '{name or '<model>'}' ({type(old).__name__} -> {type(new).__name__})"
    channels = _channels(old)
    gamma, beta = getattr(old, "weight", None), getattr(old, "bias", None)
    new_weight, new_bias = getattr(new, "weight", None), getattr(new, "bias", None)
    with torch.no_grad():
        for attr, label, value, target, identity in (("weight", "γ (weight)", gamma, new_weight, 1.0),
                                                     ("bias", "β (bias)", beta, new_bias, 0.0)):
            if target is None:
                if value is not None and not bool((value == identity).all()):
                    raise ValueError(
                        f"{where}: the new layer has no {attr} to carry the old {label} into, "
                        f"which is not all {identity:g}; convert to a norm that has one (e.g. to='group' or "
                        f"'layer', or pass affine=True / bias=True)."
                    )
                continue
            if tuple(target.shape) != (channels,):
                raise ValueError(f"{where}: the new layer's {label} has shape {tuple(target.shape)}, not ({channels},).")
            if value is not None:
                target.copy_(value)
        if getattr(new, "running_mean", None) is not None and getattr(old, "running_mean", None) is not None:
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
            count = getattr(old, "num_batches_tracked", None)
            if getattr(new, "num_batches_tracked", None) is not None and count is not None:
                new.num_batches_tracked.copy_(count)


def convert_norm(model: nn.Module, to: str = "group", *, match: Match | None = None, **kw: Any) -> nn.Module:
    """A copy of ``model`` with its batch norms (or the norms ``match`` picks) replaced by ``to``.

    Args:
        model: the model (left untouched).
        to: a :func:`normlab.norm_names` name. ``"group"`` (``num_groups`` defaults to the largest
            divisor of C up to 32), ``"layer"`` (``GroupNorm(1, C)``: layer norm over ``(C, *)``
            with per-channel γ and β, right for every input rank), ``"instance"`` / ``"batch"``
            (the source's rank, or ``dim``), ``"rms"`` (only for (N, C) input, from a
            BatchNorm1d, and β must be 0), ``"none"`` (``nn.Identity``), or any other name.
        match: restrict to some norms: a predicate ``(name, module)``, a class or a collection of
            qualified names; the picked modules must be per-channel norms (batch, frozen, group,
            instance).
        **kw: passed to the new layers' constructor (e.g. ``num_groups=8``, ``affine=True``).

    Carried over: γ and β (an error when the new layer cannot hold a non-trivial one), the
    running statistics when both layers keep them, eps and momentum unless given in ``kw``,
    device, dtype and mode.

    >>> import torch, normlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> convert_norm(net, "group", num_groups=4)[1]  # doctest: +ELLIPSIS
    GroupNorm(4, 8, eps=1e-05, affine=True...)
    """
    if not isinstance(to, str) or to not in norm_names():
        raise ValueError(f"convert_norm: unknown target norm {to!r}; valid names are {norm_names()}.")
    selected = (lambda name, m: _is_batchnorm(m)) if match is None else _predicate(model, match, "convert_norm")

    def make(name: str, old: nn.Module) -> nn.Module:
        if not _is_per_channel_norm(old):
            raise TypeError(
                f"convert_norm: match picked '{name or '<model>'}', a {type(old).__name__}; only per-channel "
                f"norms (batch, frozen batch, group, instance) can be converted."
            )
        if to == "none":
            return nn.Identity()
        new = _build_target(name, old, to, dict(kw))
        if "eps" not in kw and hasattr(new, "eps") and hasattr(old, "eps"):
            new.eps = old.eps
        if "momentum" not in kw and hasattr(new, "momentum") and hasattr(old, "momentum"):
            new.momentum = old.momentum
        ref = _ref_tensor(old)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        _carry(name, old, new)
        return new.train(old.training)

    return replace_modules(model, selected, make)


def freeze_bn(model: nn.Module, *, match: Match | None = None) -> nn.Module:
    """A copy of ``model`` whose batch norms are :class:`~normlab.layers.frozen.FrozenBatchNorm2d`
    (1d/3d by rank): statistics, γ, β, eps and momentum kept, nothing learned or updated.

    Args:
        model: the model (left untouched).
        match: restrict to some batch norms (predicate, class, or qualified names).

    Raises:
        ValueError: a picked batch norm has no running statistics (nothing to freeze).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> type(freeze_bn(net)[1]).__name__
    'FrozenBatchNorm1d'
    """
    # A norm fused with an activation (BatchNormAct) is no plain batch norm: freezing it into
    # an affine map would drop the activation, so it is left as it is.
    selected = _restricted(model, match, computes_batchnorm, "freeze_bn")

    def make(name: str, bn: nn.Module) -> nn.Module:
        if bn.running_mean is None:
            raise ValueError(
                f"freeze_bn: '{name or '<model>'}' ({type(bn).__name__}) has no running statistics "
                f"(track_running_stats=False), so there is nothing to freeze; leave it out with "
                f"match=..., or recalibrate it with track_running_stats=True first."
            )
        dim = _dim_of(bn) or 2
        return _FROZEN[dim].from_batchnorm(bn)

    return replace_modules(model, selected, make)


def unfreeze_bn(
    model: nn.Module,
    *,
    match: Match | None = None,
    momentum: float | None | Literal["keep"] = "keep",
    layer: Literal["normlab", "torch"] = "normlab",
) -> nn.Module:
    """A copy of ``model`` whose frozen batch norms are trainable batch norms again, state kept.

    Args:
        model: the model (left untouched).
        match: restrict to some frozen norms.
        momentum: the new layers' momentum; ``"keep"`` (default) restores the one saved when freezing.
        layer: ``"normlab"`` (:class:`normlab.BatchNorm2d` etc.) or ``"torch"`` (``torch.nn``).

    >>> import torch
    >>> net = freeze_bn(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.01)))
    >>> unfreeze_bn(net)[1]  # doctest: +ELLIPSIS
    BatchNorm1d(4, eps=1e-05, momentum=0.01, affine=True, ...track_running_stats=True)
    """
    if layer not in ("normlab", "torch"):
        raise ValueError(f"unfreeze_bn: layer must be 'normlab' or 'torch', got {layer!r}.")
    if momentum != "keep":
        _stats.check_momentum(momentum, owner="unfreeze_bn")
    classes = _NORMLAB_BN if layer == "normlab" else _TORCH_BN
    selected = _restricted(model, match, lambda m: isinstance(m, _FrozenBatchNorm), "unfreeze_bn")

    def make(name: str, frozen: _FrozenBatchNorm) -> nn.Module:
        ref = frozen.running_mean
        bn = classes[_dim_of(frozen)](
            frozen.num_features, frozen.eps, frozen.momentum if momentum == "keep" else momentum,
            affine=frozen.affine, device=ref.device,
            dtype=frozen.weight.dtype if frozen.weight is not None else ref.dtype,
        )
        bn.load_state_dict(frozen.state_dict(), strict=True)
        return bn.train(frozen.training)

    return replace_modules(model, selected, make)
