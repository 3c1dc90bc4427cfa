"""Every normalization layer by name: ``get_norm(name, channels, **kw)``.

The lab and the model tools build norms from a name in a config. Names ending in ``1d``/``2d``/
``3d`` pick the input rank; ``batch`` and ``instance`` without a suffix take ``dim`` (default 1).
``none`` gives ``torch.nn.Identity``. Later layers register themselves with :func:`register_norm`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .group import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer import LayerNorm, RMSNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["NORMS", "get_norm", "norm_names", "register_norm", "default_groups"]

NORMS: dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str, make: Callable[..., nn.Module]) -> None:
    """Make ``get_norm(name, channels, **kw)`` call ``make(channels, **kw)``."""
    if name in NORMS:
        raise ValueError(f"register_norm: the name {name!r} is taken by {NORMS[name]!r}; choose another.")
    NORMS[name] = make


def norm_names() -> list[str]:
    """The names :func:`get_norm` accepts, sorted."""
    return sorted(NORMS)


def default_groups(channels: int, target: int = 32) -> int:
    """The largest divisor of ``channels`` not above ``target`` (Wu & He use 32 groups)."""
    return max(d for d in range(1, min(channels, target) + 1) if channels % d == 0)


def get_norm(name: str, channels: int, **kw) -> nn.Module:
    """Build a normalization layer for ``channels`` channels by registry name.

    Args:
        name: one of :func:`norm_names` (e.g. ``"batch2d"``, ``"group"``, ``"layer"``, ``"none"``).
        channels: the number of channels / features C.
        **kw: passed to the layer's constructor (e.g. ``momentum=0.01``, ``num_groups=8``);
            ``batch`` and ``instance`` also take ``dim`` = 1, 2 or 3.

    >>> import normlab
    >>> normlab.get_norm("group", 64)  # doctest: +ELLIPSIS
    GroupNorm(32, 64, eps=1e-05, affine=True...)
    >>> type(normlab.get_norm("batch", 16, dim=2)).__name__
    'BatchNorm2d'
    """
    if not isinstance(name, str) or name not in NORMS:
        raise ValueError(f"get_norm: unknown norm {name!r}; valid names are {norm_names()}.")
    return NORMS[name](channels, **kw)


def _by_dim(classes: tuple[type, type, type], family: str) -> Callable[..., nn.Module]:
    def make(channels: int, dim: int = 1, **kw) -> nn.Module:
        if dim not in (1, 2, 3):
            raise ValueError(f"get_norm({family!r}): dim must be 1, 2 or 3 (spatial rank of the input), got {dim!r}.")
        return classes[dim - 1](channels, **kw)

    return make


def _group(channels: int, num_groups: int | None = None, **kw) -> nn.Module:
    return GroupNorm(default_groups(channels) if num_groups is None else num_groups, channels, **kw)


def _none(channels: int, **kw) -> nn.Module:
    return nn.Identity()


for _family, _classes in (("batch", (BatchNorm1d, BatchNorm2d, BatchNorm3d)),
                          ("instance", (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)),
                          ("frozen", (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)),
                          ("batch_act", (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)),
                          ("renorm", (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)),
                          ("ghost", (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d))):
    register_norm(_family, _by_dim(_classes, _family))
    for _d, _cls in enumerate(_classes, start=1):
        register_norm(f"{_family}{_d}d", _cls)
register_norm("group", _group)
register_norm("layer", LayerNorm)
register_norm("rms", RMSNorm)
register_norm("none", _none)
