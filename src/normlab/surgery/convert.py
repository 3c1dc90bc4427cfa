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
from ..layers.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormActMixin
from ..layers.base import TORCH_NORM_HAS_BIAS
from ..layers.batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    _FrozenBatchNormAct,
)
from ..layers.kinds import NormKind, activation_spec, is_batchnorm, norm_kind
from ..layers.registry import get_norm, norm_names
from .walk import Match, _predicate, replace_modules

__all__ = ["convert_norm", "freeze_bn", "unfreeze_bn"]

_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_FROZEN_ACT = {1: FrozenBatchNormAct1d, 2: FrozenBatchNormAct2d, 3: FrozenBatchNormAct3d}
_NORMLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_NORMLAB_BN_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_PER_CHANNEL = ("batch", "frozen", "group", "instance")


def _label(name: str, module: nn.Module) -> str:
    return f"'{name or '<model>'}' ({type(module).__name__})"


def _known(where: str, name: str, module: nn.Module) -> NormKind:
    """The module's kind, or a TypeError when normlab cannot tell what it computes."""
    kind = norm_kind(module)
    if kind is not None and kind.unknown:
        raise TypeError(
            f"{where}: {_label(name, module)}: {kind.unknown}. Leave it out with match=..., or replace it "
            f"by hand with a layer whose formula is known."
        )
    return kind


def _followed_by(norm: nn.Module, activation: nn.Module | None) -> nn.Module:
    """``norm`` then ``activation``: one module (``norm`` itself when nothing follows it)."""
    return norm if activation is None else nn.Sequential(norm, activation)


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


def _build_target(name: str, old: nn.Module, kind: NormKind, to: str, kw: dict) -> nn.Module:
    """The new norm; a norm-act of the target kind when one holds the old activation exactly."""
    channels = kind.channels
    dim = kw.pop("dim", None) or kind.dim
    where = f"convert_norm: {_label(name, old)}"
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
    if to in ("batch", "instance", "frozen", "batch_act", "renorm", "ghost"):  # registry families taking dim
        if dim is None:
            raise ValueError(f"{where}: to={to!r} needs the input rank; pass dim=1, 2 or 3.")
        if kind.activation is not None and to in ("batch", "batch_act"):
            spec = activation_spec(kind.activation)
            if spec is not None:
                return _NORMLAB_BN_ACT[dim](channels, **{**spec, **kw})
        if kind.activation is not None and to == "frozen":
            return _FROZEN_ACT[dim](channels, act=kind.activation, **kw)
        return get_norm(to, channels, dim=dim, **kw)
    return get_norm(to, channels, **kw)


# Targets whose layers take bias= (RMSNorm has no bias; a user's registered norm may not take it).
_TAKES_BIAS = ("batch", "instance", "frozen", "batch_act", "renorm", "ghost", "group", "layer")


def _weight_without_bias(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and getattr(module, "bias", None) is None


def _holds_activation(new: nn.Module) -> bool:
    return isinstance(new, (_BatchNormActMixin, _FrozenBatchNormAct))


def _carry(name: str, old: nn.Module, new: nn.Module, channels: int) -> None:
    where = f"convert_norm: '{name or '<model>'}' ({type(old).__name__} -> {type(new).__name__})"
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
    device, dtype and mode. A norm with a weight and no bias (``bias=False``) becomes one too
    (unless ``kw`` says ``bias=``), so the new model learns no shift the old one did not.

    >>> import torch, normlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> convert_norm(net, "group", num_groups=4)[1]  # doctest: +ELLIPSIS
    GroupNorm(4, 8, eps=1e-05, affine=True...)
    """
    if not isinstance(to, str) or to not in norm_names():
        raise ValueError(f"convert_norm: unknown target norm {to!r}; valid names are {norm_names()}.")
    selected = (lambda name, m: is_batchnorm(m)) if match is None else _predicate(model, match, "convert_norm")

    def make(name: str, old: nn.Module) -> nn.Module:
        kind = _known("convert_norm", name, old)
        if kind is None or kind.family not in _PER_CHANNEL:
            raise TypeError(
                f"convert_norm: match picked '{name or '<model>'}', a {type(old).__name__}; only per-channel norms (batch, frozen batch, "
                f"group, instance, with or without an activation) can be converted."
            )
        if to == "none":
            return (kind.activation or nn.Identity()).train(old.training)
        options = dict(kw)
        if "bias" not in options and to in _TAKES_BIAS and _weight_without_bias(old):
            options["bias"] = False  # the source shifts by nothing; so does the new layer
        new = _build_target(name, old, kind, to, options)
        if "eps" not in kw and hasattr(new, "eps") and hasattr(old, "eps"):
            new.eps = old.eps
        if "momentum" not in kw and hasattr(new, "momentum") and hasattr(old, "momentum"):
            new.momentum = old.momentum
        ref = _ref_tensor(old)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        _carry(name, old, new, kind.channels)
        if not _holds_activation(new):
            new = _followed_by(new, kind.activation)
        return new.train(old.training)

    return replace_modules(model, selected, make)


def _family(family: str):
    def test(module: nn.Module) -> bool:
        kind = norm_kind(module)
        return kind is not None and kind.family == family

    return test


def freeze_bn(model: nn.Module, *, match: Match | None = None) -> nn.Module:
    """A copy of ``model`` whose batch norms are :class:`~normlab.layers.frozen.FrozenBatchNorm2d`
    (1d/3d by rank): statistics, γ, β, eps and momentum kept, nothing learned or updated.

    Every module that computes batch norm is frozen (:func:`normlab.layers.kinds.norm_kind`):
    torch's and normlab's batch norms, batch renorm, ghost and synchronized batch norms, and
    batch norms fused with an activation (normlab's ``BatchNormAct2d``, timm's
    ``BatchNormAct2d``), which become :class:`~normlab.layers.frozen.FrozenBatchNormAct2d` with
    the same activation module, so the eval output is unchanged.

    Args:
        model: the model (left untouched).
        match: restrict to some batch norms (predicate, class, or qualified names).

    Raises:
        ValueError: a picked batch norm has no running statistics (nothing to freeze).
        TypeError: a batch norm whose forward normlab cannot verify (another library's subclass
            whose eval output is not batch norm's formula followed by its ``.act``): leave it
            out with ``match``.

    >>> import torch, normlab
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
    ...                           normlab.BatchNormAct1d(4, act="silu"))
    >>> [type(m).__name__ for m in freeze_bn(net)]
    ['Linear', 'FrozenBatchNorm1d', 'FrozenBatchNormAct1d']
    """
    selected = _restricted(model, match, _family("batch"), "freeze_bn")

    def make(name: str, bn: nn.Module) -> nn.Module:
        kind = _known("freeze_bn", name, bn)
        if bn.running_mean is None:
            raise ValueError(
                f"freeze_bn: '{name or '<model>'}' ({type(bn).__name__}) has no running statistics "
                f"(track_running_stats=False), so there is nothing to freeze; leave it out with "
                f"match=..., or recalibrate it with track_running_stats=True first."
            )
        dim = kind.dim or 2
        if kind.activation is None:
            return _FROZEN[dim].from_batchnorm(bn)
        return _FROZEN_ACT[dim].from_batchnorm(bn, act=kind.activation)

    return replace_modules(model, selected, make)


def unfreeze_bn(
    model: nn.Module,
    *,
    match: Match | None = None,
    momentum: float | None | Literal["keep"] = "keep",
    layer: Literal["normlab", "torch"] = "normlab",
) -> nn.Module:
    """A copy of ``model`` whose frozen batch norms are trainable batch norms again, state kept.

    normlab's frozen norms and other libraries' (torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``) are unfrozen. A frozen norm with an activation becomes normlab's
    ``BatchNormAct`` when that holds the activation exactly (ReLU, LeakyReLU, ELU, SiLU,
    Identity) and ``layer="normlab"``; otherwise the batch norm followed by the same activation
    module, in an ``nn.Sequential`` (its state-dict keys gain a ``0.``).

    Args:
        model: the model (left untouched).
        match: restrict to some frozen norms.
        momentum: the new layers' momentum; ``"keep"`` (default) restores the one saved when
            freezing (0.1 for a frozen norm that saved none).
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
    selected = _restricted(model, match, _family("frozen"), "unfreeze_bn")

    def make(name: str, frozen: nn.Module) -> nn.Module:
        kind = _known("unfreeze_bn", name, frozen)
        dim = kind.dim or 2
        ref = frozen.running_mean
        weight, bias = getattr(frozen, "weight", None), getattr(frozen, "bias", None)
        spec = activation_spec(kind.activation) if kind.activation is not None and layer == "normlab" else None
        cls, extra = (_NORMLAB_BN_ACT[dim], spec) if spec is not None else (classes[dim], {})
        if weight is not None and bias is None:  # a weight without a bias: the layer keeps none
            if layer == "torch" and not TORCH_NORM_HAS_BIAS:
                raise ValueError(
                    f"unfreeze_bn: '{name or '<model>'}' ({type(frozen).__name__}) has a weight and no bias, and "
                    f"torch {torch.__version__}'s {cls.__name__} cannot leave its bias out (bias=False came with "
                    f"torch 2.13); use layer='normlab', whose batch norms take bias=False on every torch version."
                )
            extra = {**extra, "bias": False}
        bn = cls(
            kind.channels, frozen.eps, getattr(frozen, "momentum", 0.1) if momentum == "keep" else momentum,
            affine=weight is not None or bias is not None, device=ref.device,
            dtype=weight.dtype if weight is not None else ref.dtype, **extra,
        )
        with torch.no_grad():
            if weight is not None:
                bn.weight.copy_(weight)
            if bias is not None:  # (γ alone: no bias; β alone: γ stays 1)
                bn.bias.copy_(bias)
            bn.running_mean.copy_(ref)
            bn.running_var.copy_(frozen.running_var)
            count = getattr(frozen, "num_batches_tracked", None)
            if isinstance(count, Tensor):
                bn.num_batches_tracked.copy_(count)
        bn.train(frozen.training)
        if spec is None and kind.activation is not None:
            return _followed_by(bn, kind.activation).train(frozen.training)
        return bn

    return replace_modules(model, selected, make)
