"""What kind of norm a module is: the one place every model tool asks.

Folding, conversion, freezing, recalibration, sync conversion and the diagnostics all need to
know, for a module of someone else's model, whether it is a batch norm, what its eval output
is, and whether an activation follows the normalization inside the module. :func:`norm_kind`
answers for

* torch's norms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``, ``InstanceNorm*``,
  ``LayerNorm``, ``RMSNorm``) and normlab's (every layer in :mod:`normlab.layers`);
* subclasses that add an activation after the norm, as timm's ``BatchNormAct2d`` and
  ``GroupNormAct`` do (``.act`` and ``.drop`` modules, ``y = act(drop(norm(x)))``), and
  normlab's ``BatchNormAct``;
* frozen batch norms that are plain ``nn.Module``s with buffers, as torchvision's
  ``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d``: ``weight``, ``bias``,
  ``running_mean``, ``running_var`` and ``eps``, computing ``x * scale + shift`` in both modes.

A lazy norm (torch's or normlab's ``LazyBatchNorm2d`` etc.) before its first forward has no
channels, parameters or statistics yet: its kind says so in ``unknown``.

A class normlab does not know is never taken on trust: its eval output is compared, on a random
input with a copy of the module, with the formula it claims (its torch base class's forward,
or the frozen affine map), followed by its ``.drop`` and ``.act`` if it has them. When the two
differ, or the module cannot run on such an input, the kind says so in ``unknown``, and every
tool refuses or reports that module instead of guessing.

Families (``NormKind.family``):

============ ====================================================================================
``batch``    batch statistics in training, running statistics (if tracked) in eval
``frozen``   a fixed per-channel affine map from buffers, in training and in eval
``group``    ``GroupNorm`` (timm's ``GroupNormAct`` too)
``instance`` ``InstanceNorm1d/2d/3d``
``layer``    ``LayerNorm``
``rms``      ``RMSNorm``
``other``    a norm the tools do not transform (``LocalResponseNorm``, recurrent batch norm)
============ ====================================================================================

>>> import torch, normlab
>>> from normlab.layers.kinds import norm_kind
>>> kind = norm_kind(normlab.BatchNormAct2d(8, act="leaky_relu", negative_slope=0.2))
>>> kind.family, kind.dim, kind.channels, kind.activation, kind.unknown
('batch', 2, 8, LeakyReLU(negative_slope=0.2), None)
>>> norm_kind(torch.nn.Conv2d(3, 8, 3)) is None
True
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..stats import statistics_dtype
from .act import _BatchNormActMixin
from .base import NormLayer
from .batch import _BatchNormMixin
from .frozen import _FrozenBatchNorm
from .ghost import _GhostBatchNormMixin
from .group import GroupNorm, _InstanceNormMixin
from .layer import LayerNorm, RMSNorm
from .renorm import _BatchRenormMixin
from .sync import _SyncMixin

__all__ = ["NormKind", "activation_spec", "is_batchnorm", "norm_kind"]

_TORCH_RMS = getattr(nn, "RMSNorm", None)
# torch base classes whose forward defines the formula a subclass claims, most specific first.
_TORCH_BASES: tuple[tuple[type, str], ...] = tuple(
    (cls, family) for cls, family in (
        (nn.SyncBatchNorm, "batch"), (nn.BatchNorm1d, "batch"), (nn.BatchNorm2d, "batch"),
        (nn.BatchNorm3d, "batch"), (nn.InstanceNorm1d, "instance"), (nn.InstanceNorm2d, "instance"),
        (nn.InstanceNorm3d, "instance"), (nn.GroupNorm, "group"), (nn.LayerNorm, "layer"),
        (_TORCH_RMS, "rms"), (nn.LocalResponseNorm, "other"), (nn.modules.batchnorm._BatchNorm, "batch"),
    ) if cls is not None
)
_RANKED = {
    1: (nn.BatchNorm1d, nn.InstanceNorm1d), 2: (nn.BatchNorm2d, nn.InstanceNorm2d),
    3: (nn.BatchNorm3d, nn.InstanceNorm3d),
}
_FROZEN_BUFFERS = ("running_mean", "running_var")


@dataclass(frozen=True)
class NormKind:
    """What a normalization module computes, as far as normlab's model tools need to know.

    Attributes:
        family: ``"batch"``, ``"frozen"``, ``"group"``, ``"instance"``, ``"layer"``, ``"rms"``
            or ``"other"`` (see the module docstring).
        channels: C, the number of channels (None where the module does not say).
        dim: the spatial rank the module expects (1 for ``(N, C)``/``(N, C, L)``, 2 for
            ``(N, C, H, W)``, 3), or None where its class does not fix it (``SyncBatchNorm``).
        activation: a fresh copy of what the module applies after the normalization (its
            ``.drop`` then its ``.act``, or normlab's ``act=``), None when nothing follows it.
        source: ``"torch"``, ``"normlab"`` or ``"other"`` (another library's class).
        variant: for normlab's batch norms, ``"renorm"``, ``"ghost"`` or ``"sync"`` (already
            synchronized); ``"plain"`` for every other norm.
        unknown: why normlab cannot tell what the module computes, or None. Tools refuse or
            report such a module.
    """

    family: str
    channels: int | None
    dim: int | None
    activation: nn.Module | None = None
    source: str = "torch"
    unknown: str | None = None
    variant: str = "plain"

    @property
    def is_batchnorm(self) -> bool:
        """A batch norm, trainable or frozen, known or not."""
        return self.family in ("batch", "frozen")

    @property
    def eval_is_affine(self) -> bool:
        """Whether the eval output is ``activation(x * scale + shift)`` with per-channel
        constants from ``running_mean``, ``running_var``, ``eps``, ``weight`` and ``bias``: what
        folding and freezing need (a batch norm that tracks running statistics, or a frozen one)."""
        return self.unknown is None and self.family in ("batch", "frozen")


def activation_spec(module: nn.Module | None) -> dict | None:
    """The ``act=`` options of :class:`normlab.BatchNormAct2d` that compute ``module`` exactly,
    or None when none do (``None`` and ``nn.Identity`` give ``{"act": "identity"}``).

    Exact classes only: a subclass may override the forward.

    >>> activation_spec(nn.LeakyReLU(0.2))
    {'act': 'leaky_relu', 'negative_slope': 0.2}
    >>> activation_spec(nn.Hardswish()) is None
    True
    """
    kind = type(module)
    if module is None or kind is nn.Identity:
        return {"act": "identity"}
    if kind is nn.ReLU:
        return {"act": "relu"}
    if kind is nn.SiLU:
        return {"act": "silu"}
    if kind is nn.LeakyReLU:
        return {"act": "leaky_relu", "negative_slope": float(module.negative_slope)}
    if kind is nn.ELU and module.alpha > 0:
        return {"act": "elu", "alpha": float(module.alpha)}
    if kind is nn.Sequential and len(module) == 1:
        return activation_spec(module[0])
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm of any kind (torch's, normlab's, frozen, fused with an
    activation, another library's): what fold, freeze, recalibrate and the diagnostics look at.

    >>> import torch
    >>> is_batchnorm(torch.nn.BatchNorm2d(3)), is_batchnorm(torch.nn.GroupNorm(1, 3))
    (True, False)
    """
    kind = norm_kind(module)
    return kind is not None and kind.is_batchnorm


def norm_kind(module: nn.Module) -> NormKind | None:
    """What kind of norm ``module`` is, or None when it is no normalization layer.

    See the module docstring for what is recognized and how an unknown class is checked.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"norm_kind: expected a torch.nn.Module, got {type(module).__name__}.")
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return _lazy_kind(module)
    if isinstance(module, NormLayer):
        known = _normlab_kind(module)
        if known is not None:
            return known
    for base, family in _TORCH_BASES:
        if isinstance(module, base):
            return _torch_subclass_kind(module, base, family)
    if _has_running_stats(module):
        if "weight" not in module._parameters and isinstance(getattr(module, "eps", None), (int, float)):
            return _frozen_like_kind(module)
        return NormKind("batch", _channels(module), _dim(module), None, "other",
                        f"{type(module).__name__} keeps running statistics but derives from no torch norm and "
                        f"has learnable parameters: normlab cannot tell what it computes")
    return None


# --------------------------------------------------------------------------------------------
# Known classes
# --------------------------------------------------------------------------------------------


def _channels(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    for attr in ("running_mean", "weight"):
        value = getattr(module, attr, None)
        if isinstance(value, Tensor) and value.dim() == 1:
            return value.shape[0]
    return None


def _dim(module: nn.Module) -> int | None:
    for dim, classes in _RANKED.items():
        if isinstance(module, classes):
            return dim
    ranks = getattr(type(module), "_ranks", None)
    if ranks:
        return max(ranks) - 2
    match = re.search(r"([123])[dD]$", type(module).__name__)
    return int(match.group(1)) if match else None


def _normlab_kind(module: NormLayer) -> NormKind | None:
    """normlab's own classes, when their forward is normlab's (a user's subclass that overrides
    it is checked like any other class)."""
    cls = type(module)
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if owner is None or not owner.__module__.startswith("normlab."):
        return None
    channels, dim = _channels(module), _dim(module)
    if isinstance(module, _FrozenBatchNorm):
        act = module.act if isinstance(getattr(module, "act", None), nn.Module) else None
        return NormKind("frozen", channels, dim, _fresh(act), "normlab")
    if isinstance(module, _BatchNormMixin):
        variant = ("sync" if isinstance(module, _SyncMixin) else "renorm" if isinstance(module, _BatchRenormMixin)
                   else "ghost" if isinstance(module, _GhostBatchNormMixin) else "plain")
        activation = module._activation.module() if isinstance(module, _BatchNormActMixin) else None
        return NormKind("batch", channels, dim, activation, "normlab", None, variant)
    if isinstance(module, _InstanceNormMixin):
        return NormKind("instance", channels, dim, None, "normlab")
    for cls_, family in ((GroupNorm, "group"), (LayerNorm, "layer"), (RMSNorm, "rms")):
        if isinstance(module, cls_):
            return NormKind(family, channels, None, None, "normlab")
    return NormKind("other", channels, dim, None, "normlab")


def _lazy_kind(module: nn.Module) -> NormKind | None:
    """A lazy norm (torch's or normlab's) before its first forward: its family, and why no tool
    can use it yet (it has no channels, parameters or statistics)."""
    family = next((family for base, family in _TORCH_BASES if isinstance(module, base)), None)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # torch's lazy ones derive from no InstanceNormNd
        family = "instance"
    if family is None:
        return None
    source = "normlab" if type(module).__module__.startswith("normlab.") else "torch"
    return NormKind(family, None, _dim(module), None, source,
                    f"{type(module).__name__} is a lazy layer whose parameters and statistics do not exist yet "
                    f"(they are created from the shape of its first input); run the model once on an input first")


def _fresh(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else copy.deepcopy(module)


def _attached_activation(module: nn.Module) -> nn.Module | None:
    """A subclass's ``.drop`` then ``.act`` (timm's norm-act layers), as one fresh module."""
    parts = [getattr(module, name, None) for name in ("drop", "act")]
    parts = [copy.deepcopy(p) for p in parts if isinstance(p, nn.Module) and type(p) is not nn.Identity]
    if not parts:  # no activation, or nn.Identity (timm's apply_act=False): nothing follows the norm
        return None
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


_WORDS = {"batch": "batch norm", "frozen": "frozen batch norm", "group": "group norm", "instance": "instance norm",
          "layer": "layer norm", "rms": "RMS norm", "other": "the norm"}


def _torch_subclass_kind(module: nn.Module, base: type, family: str) -> NormKind:
    source = "torch" if type(module).__module__.startswith("torch.") else "other"
    channels, dim = _channels(module), _dim(module)
    if type(module).forward is base.forward:
        return NormKind(family, channels, dim, None, source)
    activation = _attached_activation(module)
    problem = _eval_differs(module, lambda probe, x: base.forward(probe, x), activation, dim, family)
    return NormKind(family, channels, dim, activation, source, problem)


# --------------------------------------------------------------------------------------------
# Frozen batch norms that are plain modules (torchvision, timm)
# --------------------------------------------------------------------------------------------


def _has_running_stats(module: nn.Module) -> bool:
    return all(isinstance(module._buffers.get(key), Tensor) for key in _FROZEN_BUFFERS)


def _frozen_affine(probe: nn.Module, x: Tensor) -> Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(probe.running_var.double() + probe.eps)
    weight, bias = getattr(probe, "weight", None), getattr(probe, "bias", None)
    if isinstance(weight, Tensor):
        scale = scale * weight.double()
    shift = -probe.running_mean.double() * scale
    if isinstance(bias, Tensor):
        shift = shift + bias.double()
    return x.double() * scale.reshape(view) + shift.reshape(view)


def _frozen_like_kind(module: nn.Module) -> NormKind:
    channels, dim = _channels(module), _dim(module)
    activation = _attached_activation(module)
    problem = _eval_differs(module, _frozen_affine, activation, dim, "frozen")
    if problem is None and _updates_in_training(module, dim):
        problem = (f"{type(module).__name__} has running statistics and no learnable γ/β, but a forward in "
                   f"training mode changes its buffers: it is no frozen batch norm normlab knows")
    return NormKind("frozen", channels, dim, activation, "other", problem)


def _updates_in_training(module: nn.Module, dim: int | None) -> bool:
    """Whether a training-mode forward changes the module's buffers (a frozen norm's never do)."""
    probe = copy.deepcopy(module).train()
    before = {key: t.clone() for key, t in probe.named_buffers()}
    try:
        with torch.no_grad():
            probe(_probe_input(probe, dim or 2))
    except Exception:
        return False  # _eval_differs ran it in eval; a train-only failure is no update
    return any(not torch.equal(t, before[key]) for key, t in probe.named_buffers() if key in before)


# --------------------------------------------------------------------------------------------
# The probe: a copy's eval output against the formula the class claims
# --------------------------------------------------------------------------------------------


def _probe_input(probe: nn.Module, dim: int) -> Tensor:
    ref = next((t for t in (*probe.parameters(), *probe.buffers()) if t.is_floating_point()), None)
    channels = _channels(probe) or 1
    x = torch.randn((3, channels) + (3,) * dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x.to(device=None if ref is None else ref.device, dtype=torch.float32 if ref is None else ref.dtype)


def _eval_differs(module: nn.Module, formula, activation: nn.Module | None, dim: int | None,
                  family: str) -> str | None:
    """None when ``module``'s eval output equals ``activation(formula(x))`` on a random input,
    else why not (in words a report can show)."""
    name = type(module).__name__
    probe = copy.deepcopy(module).eval()
    after = copy.deepcopy(activation).eval() if activation is not None else None
    for rank in ([dim] if dim else [2, 0, 1, 3]):
        x = _probe_input(probe, rank)
        try:
            with torch.no_grad():
                got = probe(x)
                expected = formula(probe, x)
                if after is not None:
                    expected = after(expected.to(x.dtype))
        except Exception:  # the wrong rank for this class, or a forward that needs more
            continue
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return f"{name}'s output has another shape than the norm it derives from"
        tol = 1e-5 if statistics_dtype(x.dtype) == x.dtype else 1e-3  # 16-bit input: rounded statistics
        expected = expected.double()
        if bool(((got.double() - expected).abs() <= tol * (1 + expected.abs())).all()):
            return None
        word = _WORDS[family]
        what = f"{word}'s formula" + (" followed by its .drop/.act" if activation is not None else "")
        return (f"{name} overrides {word}'s forward, and its eval output differs from {what} "
                f"(checked on a random input): normlab cannot tell what it computes")
    return f"{name} could not be run on a test input of its channels, so normlab cannot check what it computes"
