"""The layer registry of the conformance harness: one :class:`LayerCase` per layer configuration.

A case says how to build the normlab layer (and its ``torch.nn`` counterpart) for an input
shape, which input shapes to try, and how :mod:`normlab.reference` computes what the layer
must return: the forward pass with the running-statistics update, and the gradients. The
generic checks in ``test_conformance.py`` run over :data:`CASES`; a new layer joins the
harness by appending a case here.

The reference side never looks at a layer directly: :func:`snapshot` turns the layer's state
into float64 NumPy (:class:`Snapshot`) and the case's ``forward``/``backward`` compute from
that alone, so the oracle is independent of the code under test.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
from device_switch import generator, to_numpy
from torch import nn

import normlab
from normlab import reference as ref
from normlab.layers.base import TORCH_NORM_HAS_BIAS

Shape = tuple[int, ...]
Grads = dict[str, np.ndarray]  # "input", and "weight"/"bias" where the layer has them


# --------------------------------------------------------------------------------------------
# Layer state as the reference sees it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A layer's parameters, running statistics and options as float64 NumPy / Python values."""

    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: int | None
    eps: float
    momentum: float | None
    num_groups: int | None = None
    normalized_shape: Shape | None = None
    unbiased: bool = True

    def after(self, step: RefStep) -> Snapshot:
        """The state after a reference step: its running statistics and count."""
        return replace(
            self,
            running_mean=step.running_mean,
            running_var=step.running_var,
            num_batches_tracked=step.num_batches_tracked,
        )


@dataclass(frozen=True)
class RefStep:
    """What the reference says one forward call returns and leaves behind."""

    y: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: int | None


def snapshot(layer: nn.Module, input_dtype: torch.dtype = torch.float32) -> Snapshot:
    """The reference's view of ``layer`` now (take it *before* calling the layer).

    ``input_dtype`` resolves ``eps=None`` (RMSNorm): torch uses the input dtype's machine epsilon.
    """
    eps = layer.eps
    if eps is None:
        eps = float(torch.finfo(input_dtype).eps)
    count = getattr(layer, "num_batches_tracked", None)
    shape = getattr(layer, "normalized_shape", None)
    return Snapshot(
        weight=to_numpy(getattr(layer, "weight", None)),
        bias=to_numpy(getattr(layer, "bias", None)),
        running_mean=to_numpy(getattr(layer, "running_mean", None)),
        running_var=to_numpy(getattr(layer, "running_var", None)),
        num_batches_tracked=None if count is None else int(count),
        eps=float(eps),
        momentum=getattr(layer, "momentum", None),
        num_groups=getattr(layer, "num_groups", None),
        normalized_shape=None if shape is None else tuple(shape),
        unbiased=getattr(layer, "unbiased", True),
    )


def _grads(s: Snapshot, dx: np.ndarray, dw: np.ndarray | None, db: np.ndarray | None = None) -> Grads:
    """Keep only the gradients of parameters the layer has."""
    out = {"input": dx}
    if s.weight is not None:
        out["weight"] = dw
    if s.bias is not None:
        out["bias"] = db
    return out


# --------------------------------------------------------------------------------------------
# Reference adapters: (Snapshot, x, training) -> RefStep and (Snapshot, x, dy, training) -> Grads
# --------------------------------------------------------------------------------------------


def batch_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    y, rm, rv, count = ref.batch_norm(
        x, s.running_mean, s.running_var, s.weight, s.bias, training=training,
        momentum=s.momentum, eps=s.eps, num_batches_tracked=s.num_batches_tracked or 0,
        unbiased=s.unbiased,
    )
    return RefStep(y, rm, rv, None if s.num_batches_tracked is None else count)


def batch_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> Grads:
    dx, dw, db = ref.batch_norm_backward(
        dy, x, s.weight, s.eps, training=training,
        running_mean=s.running_mean, running_var=s.running_var,
    )
    return _grads(s, dx, dw, db)


def _instance_uses_input_stats(s: Snapshot, training: bool) -> bool:
    # torch: use_input_stats = training or not track_running_stats
    return training or s.running_mean is None


def instance_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    # torch's instance norm reads momentum=None as 0 (the running statistics never move).
    momentum = 0.0 if s.momentum is None else s.momentum
    y, rm, rv = ref.instance_norm(
        x, s.running_mean, s.running_var, s.weight, s.bias,
        use_input_stats=_instance_uses_input_stats(s, training), momentum=momentum, eps=s.eps,
    )
    # Instance norm never counts batches (torch leaves num_batches_tracked at its value).
    return RefStep(y, rm, rv, s.num_batches_tracked)


def instance_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> Grads:
    if _instance_uses_input_stats(s, training):
        dx, dw, db = ref.instance_norm_backward(dy, x, s.weight, s.eps)
    else:
        # With running statistics the layer is the per-channel affine map of batch norm in eval.
        dx, dw, db = ref.batch_norm_backward(
            dy, x, s.weight, s.eps, training=False,
            running_mean=s.running_mean, running_var=s.running_var,
        )
    return _grads(s, dx, dw, db)


def group_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    return RefStep(ref.group_norm(x, s.num_groups, s.weight, s.bias, s.eps), None, None, None)


def group_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> Grads:
    return _grads(s, *ref.group_norm_backward(dy, x, s.num_groups, s.weight, s.eps))


def layer_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    y = ref.layer_norm(x, s.normalized_shape, s.weight, s.bias, s.eps)
    return RefStep(y, None, None, None)


def layer_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> Grads:
    return _grads(s, *ref.layer_norm_backward(dy, x, s.normalized_shape, s.weight, s.eps))


def rms_forward(s: Snapshot, x: np.ndarray, training: bool) -> RefStep:
    return RefStep(ref.rms_norm(x, s.normalized_shape, s.weight, s.eps), None, None, None)


def rms_backward(s: Snapshot, x: np.ndarray, dy: np.ndarray, training: bool) -> Grads:
    dx, dw = ref.rms_norm_backward(dy, x, s.normalized_shape, s.weight, s.eps)
    return _grads(s, dx, dw)


# --------------------------------------------------------------------------------------------
# The case type
# --------------------------------------------------------------------------------------------

Builder = Callable[..., nn.Module]  # (lib, shape, **constructor overrides) -> layer


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration and everything the generic checks need to test it.

    Attributes:
        name: the test id.
        family: "batch", "instance", "group", "layer" or "rms".
        build: ``build(lib, shape, **overrides)`` makes the layer of module ``lib`` (``normlab``
            or ``torch.nn``, whose classes share names) for inputs shaped ``shape``.
        shapes: sample input shapes; every one is tried; 4-D/5-D ones also in channels_last.
        forward / backward: the reference, see the adapters above.
        gradcheck_shape: a tiny input for ``torch.autograd.gradcheck``.
        has_torch: torch.nn has this configuration (same numbers and state-dict keys).
        has_running_stats: the layer keeps running_mean / running_var.
        counts_batches: training moves num_batches_tracked (batch norm does, instance norm not).
        tunable: constructor options the property tests may draw ("eps", "momentum").
        channels_ok / shape_ok: which random channel counts and shapes are valid.
        empty_batch: what an N=0 batch does: "empty" (empty output, state untouched) or "error".
    """

    name: str
    family: str
    build: Builder
    shapes: tuple[Shape, ...]
    forward: Callable[[Snapshot, np.ndarray, bool], RefStep]
    backward: Callable[[Snapshot, np.ndarray, np.ndarray, bool], Grads]
    gradcheck_shape: Shape
    has_torch: bool = True
    has_running_stats: bool = False
    counts_batches: bool = False
    tunable: tuple[str, ...] = ("eps",)
    channels_ok: Callable[[int], bool] = lambda c: True
    shape_ok: Callable[[Shape], bool] = lambda shape: True
    empty_batch: Literal["empty", "error"] = "empty"

    def make(self, shape: Shape, **overrides) -> nn.Module:
        """The normlab layer for inputs shaped ``shape``."""
        return self.build(normlab, shape, **overrides)

    def make_torch(self, shape: Shape, **overrides) -> nn.Module | None:
        """The torch.nn counterpart, or None where torch lacks the configuration."""
        return self.build(nn, shape, **overrides) if self.has_torch else None

    @property
    def channels_last_shapes(self) -> tuple[Shape, ...]:
        return tuple(s for s in self.shapes if len(s) in (4, 5))

    @property
    def supports_channels_last(self) -> bool:
        return bool(self.channels_last_shapes)


def _per_channel_builder(cls_name: str, **fixed) -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        return getattr(lib, cls_name)(shape[1], **{**fixed, **overrides})

    return build


def _group_builder(groups: Callable[[int], int], **fixed) -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        return lib.GroupNorm(groups(shape[1]), shape[1], **{**fixed, **overrides})

    return build


def _trailing_builder(cls_name: str, trailing: int, **fixed) -> Builder:
    def build(lib, shape: Shape, **overrides) -> nn.Module:
        return getattr(lib, cls_name)(tuple(shape[-trailing:]), **{**fixed, **overrides})

    return build


def _flags(**kw) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

# Shapes per batch-norm input kind. The larger ones have >= 256 values per channel, which sends
# channel-innermost layouts ((N, C), channels_last) through normlab's blocked statistics path.
_BATCH_SHAPES: dict[str, tuple[tuple[Shape, ...], Shape]] = {
    "BatchNorm1d-NC": (((8, 4), (300, 4)), (5, 3)),
    "BatchNorm1d-NCL": (((4, 3, 5), (8, 3, 40)), (3, 2, 3)),
    "BatchNorm2d": (((4, 3, 5, 5), (4, 3, 8, 8)), (2, 2, 2, 3)),
    "BatchNorm3d": (((2, 3, 3, 4, 5), (4, 3, 4, 4, 4)), (2, 2, 2, 2, 2)),
}

_INSTANCE_SHAPES: dict[str, tuple[tuple[Shape, ...], Shape]] = {
    "InstanceNorm1d": (((3, 4, 7),), (2, 2, 4)),
    "InstanceNorm2d": (((3, 4, 5, 6), (2, 4, 16, 16)), (2, 2, 2, 3)),
    "InstanceNorm3d": (((2, 4, 3, 4, 5),), (2, 2, 2, 2, 2)),
}


def _batch_cases() -> list[LayerCase]:
    cases = []
    for kind, (shapes, tiny) in _BATCH_SHAPES.items():
        cls_name = kind.split("-")[0]
        options = [
            dict(affine=a, track_running_stats=t) for a in (True, False) for t in (True, False)
        ] + [dict(affine=True, track_running_stats=True, momentum=None)]
        # Issue 15: a weight without a bias (torch 2.13's bias=False; normlab's on every torch).
        options.append(dict(affine=True, track_running_stats=True, bias=False))
        if kind == "BatchNorm2d":
            options.append(dict(affine=True, track_running_stats=False, bias=False))
        for opt in options:
            tracking = opt["track_running_stats"]
            cases.append(LayerCase(
                name=f"{kind}-{_flags(**opt)}",
                family="batch",
                build=_per_channel_builder(cls_name, **opt),
                shapes=shapes,
                forward=batch_forward,
                backward=batch_backward,
                gradcheck_shape=tiny,
                has_torch=TORCH_NORM_HAS_BIAS or "bias" not in opt,
                has_running_stats=tracking,
                counts_batches=tracking,
                tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
            ))
    # normlab's Keras/Flax convention (biased running variance): torch has no such option.
    cases.append(LayerCase(
        name="BatchNorm2d-unbiased=False",
        family="batch",
        build=_per_channel_builder("BatchNorm2d", unbiased=False),
        shapes=_BATCH_SHAPES["BatchNorm2d"][0],
        forward=batch_forward,
        backward=batch_backward,
        gradcheck_shape=(2, 2, 2, 3),
        has_torch=False,
        has_running_stats=True,
        counts_batches=True,
        tunable=("eps", "momentum"),
    ))
    return cases


def _spatial_values(shape: Shape) -> int:
    return math.prod(shape[2:])


def _instance_cases() -> list[LayerCase]:
    cases = []
    for cls_name, (shapes, tiny) in _INSTANCE_SHAPES.items():
        options = [dict(affine=a, track_running_stats=t) for a in (False, True) for t in (False, True)]
        if cls_name == "InstanceNorm2d":  # torch: momentum=None means the statistics never move
            options.append(dict(affine=True, track_running_stats=True, momentum=None))
            options.append(dict(affine=True, track_running_stats=False, bias=False))
        options.append(dict(affine=True, track_running_stats=True, bias=False))  # issue 15
        for opt in options:
            cases.append(LayerCase(
                name=f"{cls_name}-{_flags(**opt)}",
                family="instance",
                build=_per_channel_builder(cls_name, **opt),
                shapes=shapes,
                forward=instance_forward,
                backward=instance_backward,
                gradcheck_shape=tiny,
                has_torch=TORCH_NORM_HAS_BIAS or "bias" not in opt,
                has_running_stats=opt["track_running_stats"],
                tunable=("eps",) if "momentum" in opt else ("eps", "momentum"),
                shape_ok=lambda shape: _spatial_values(shape) > 1,
            ))
    return cases


def _group_cases() -> list[LayerCase]:
    specs = [
        # (name, groups(C), channels_ok, shapes, tiny, fixed kwargs)
        ("GroupNorm-groups=1", lambda c: 1, lambda c: True,
         ((4, 6, 5), (3, 6, 4, 4)), (2, 3, 3), {}),
        ("GroupNorm-groups=C", lambda c: c, lambda c: True,
         ((3, 6, 4, 5), (2, 6, 3, 3, 3)), (2, 3, 3), {}),
        ("GroupNorm-groups=2", lambda c: 2, lambda c: c % 2 == 0,
         ((4, 6, 5, 5), (2, 4, 3, 4, 4)), (2, 4, 3), {}),
        ("GroupNorm-groups=3-NC", lambda c: 3, lambda c: c % 3 == 0,
         ((5, 12), (4, 18)), (2, 6), {}),
        ("GroupNorm-groups=2-affine=False", lambda c: 2, lambda c: c % 2 == 0,
         ((4, 6, 5), (2, 4, 4, 4)), (2, 4, 3), dict(affine=False)),
        ("GroupNorm-groups=2-bias=False", lambda c: 2, lambda c: c % 2 == 0,  # issue 15
         ((4, 6, 5), (2, 4, 4, 4)), (2, 4, 3), dict(bias=False)),
    ]
    return [
        LayerCase(
            name=name,
            family="group",
            build=_group_builder(groups, **fixed),
            shapes=shapes,
            forward=group_forward,
            backward=group_backward,
            gradcheck_shape=tiny,
            has_torch=TORCH_NORM_HAS_BIAS or "bias" not in fixed,
            channels_ok=ok,
            # a group of one value is refused (its output would be the bias whatever the input)
            shape_ok=lambda shape, groups=groups: shape[1] // groups(shape[1]) * _spatial_values(shape) > 1,
        )
        for name, groups, ok, shapes, tiny, fixed in specs
    ]


def _trailing_cases() -> list[LayerCase]:
    specs = [
        # (name, class, family, trailing dims, shapes, tiny, fixed kwargs, tunable)
        ("LayerNorm-last1", "LayerNorm", "layer", 1, ((4, 6), (2, 3, 6)), (3, 4), {}, ("eps",)),
        ("LayerNorm-last2", "LayerNorm", "layer", 2, ((4, 3, 5), (2, 3, 4, 5)), (2, 2, 3), {}, ("eps",)),
        ("LayerNorm-elementwise_affine=False", "LayerNorm", "layer", 1, ((4, 6), (2, 3, 4, 5)),
         (3, 4), dict(elementwise_affine=False), ("eps",)),
        ("LayerNorm-bias=False", "LayerNorm", "layer", 1, ((4, 6), (2, 3, 6)), (3, 4),
         dict(bias=False), ("eps",)),
        ("RMSNorm-eps=None", "RMSNorm", "rms", 1, ((4, 6), (2, 3, 4, 5)), (3, 4), {}, ()),
        ("RMSNorm-last2-eps=1e-5", "RMSNorm", "rms", 2, ((4, 3, 5), (2, 3, 4, 5)), (2, 2, 3),
         dict(eps=1e-5), ("eps",)),
        ("RMSNorm-elementwise_affine=False", "RMSNorm", "rms", 1, ((4, 6),), (3, 4),
         dict(elementwise_affine=False, eps=1e-6), ("eps",)),
    ]
    ref_fns = {"layer": (layer_forward, layer_backward), "rms": (rms_forward, rms_backward)}
    return [
        LayerCase(
            name=name,
            family=family,
            build=_trailing_builder(cls_name, trailing, **fixed),
            shapes=shapes,
            forward=ref_fns[family][0],
            backward=ref_fns[family][1],
            gradcheck_shape=tiny,
            tunable=tunable,
            # the normalized dims must be all but the batch: rank >= trailing + 1
            shape_ok=lambda shape, k=trailing: len(shape) > k,
        )
        for name, cls_name, family, trailing, shapes, tiny, fixed, tunable in specs
    ]


def _cases_from_sibling_modules() -> list[LayerCase]:
    """Cases of later layers: each ``tests/conformance/cases_<topic>.py`` defines ``CASES``
    (a list of :class:`LayerCase`) and joins every generic check without editing this file."""
    import importlib
    import pkgutil
    from pathlib import Path

    found: list[LayerCase] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            found += list(importlib.import_module(f"{__package__}.{info.name}").CASES)
    return found


CASES: tuple[LayerCase, ...] = tuple(
    _batch_cases() + _instance_cases() + _group_cases() + _trailing_cases() + _cases_from_sibling_modules()
)


def cases_where(predicate: Callable[[LayerCase], bool]) -> list[LayerCase]:
    return [c for c in CASES if predicate(c)]


# --------------------------------------------------------------------------------------------
# Inputs and parameter values
# --------------------------------------------------------------------------------------------


def seed_of(*key) -> int:
    """A stable seed from any printable key (a case name, a shape, a step)."""
    return zlib.crc32(repr(key).encode())


def sample_input(shape: Shape, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-scale data with a different mean and spread per channel (dimension 1)."""
    g = generator(seed)  # on the test device (NORMLAB_TEST_DEVICE); torch.Generator() on the CPU
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) >= 2:
        view = (1, shape[1]) + (1,) * (len(shape) - 2)
        mean = torch.randn(shape[1], generator=g, dtype=torch.float64).mul(0.5).view(view)
        std = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5).view(view)
        x = x * std + mean
    return x.to(dtype)


def randomize_(layer: nn.Module, seed: int) -> nn.Module:
    """Give parameters and running statistics non-trivial values (weights != 1, biases != 0)."""
    g = generator(seed)  # on the test device (NORMLAB_TEST_DEVICE); torch.Generator() on the CPU

    def fill(t: torch.Tensor | None, make) -> None:
        if t is not None:
            t.copy_(make(t.shape).to(t.dtype))

    with torch.no_grad():
        fill(getattr(layer, "weight", None), lambda s: torch.rand(s, generator=g) * 1.5 + 0.5)
        fill(getattr(layer, "bias", None), lambda s: torch.randn(s, generator=g) * 0.5)
        fill(getattr(layer, "running_mean", None), lambda s: torch.randn(s, generator=g) * 0.5)
        fill(getattr(layer, "running_var", None), lambda s: torch.rand(s, generator=g) * 1.5 + 0.5)
        count = getattr(layer, "num_batches_tracked", None)
        if count is not None:
            count.fill_(4)
    return layer
