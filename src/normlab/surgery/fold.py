"""Fold batch norms into the Conv / Linear layers before them, for inference.

In eval mode a batch norm is a per-channel affine map, so after a layer ``y = W x + b`` it can
be absorbed into that layer's weights (:func:`fold_weights`, the only place the math lives)::

    s  = gamma / sqrt(running_var + eps)          per output channel
    W' = W * s   (along the output-channel axis)
    b' = (b - running_mean) * s + beta           (b = 0 when the layer has no bias)

:func:`fold_batchnorm` finds the pairs, checks that folding keeps the model's outputs, and
returns a copy with each folded norm replaced by ``nn.Identity`` (the model's class, attributes
and other submodules stay as they were), with a :class:`FoldReport` of what was folded and why
every other batch norm was not. A norm fused with an activation (normlab's or timm's
``BatchNormAct2d``, timm's ``FrozenBatchNormAct2d``) is replaced by its activation module.

Which pairs: a batch norm, as :func:`normlab.layers.kinds.norm_kind` recognizes it (torch's,
``SyncBatchNorm``, normlab's, frozen ones including torchvision's, other libraries' norm-act
subclasses whose eval formula checks out), whose input is the output of a ``Linear``,
``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` (grouped and depthwise included) and of nothing
else. The dataflow comes from ``torch.fx`` (normalization layers and torch.nn layers are leaves
of the trace). A model that does not trace falls back to a structural walk, a norm right after
such a layer inside an ``nn.Sequential``, and folds such a pair only when a run on
``example_inputs`` shows that the Sequential alone calls the two and the norm's input is the
layer's output at every call (the model's own forward could otherwise use that output
elsewhere); without ``example_inputs`` it folds nothing there and says why. A Linear is assumed
to produce ``(N, features)`` (BatchNorm1d normalizes dimension 1); pass ``example_inputs`` to
check this, and the folded outputs, on real data.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..layers.base import NormLayer
from ..layers.kinds import NormKind, is_batchnorm, norm_kind
from .walk import check_model, find_modules, replace_modules

__all__ = ["FoldReport", "FoldResult", "FoldedPair", "SkippedNorm", "fold_batchnorm", "fold_weights", "is_batchnorm"]

log = logging.getLogger("normlab.surgery")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = (nn.Linear, *_CONVS, *_CONV_TRANSPOSES)


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``norm(layer(x))`` as one layer (a pure function; inputs untouched).

    ``s = gamma / sqrt(running_var + eps)``, ``W' = W * s`` on the output-channel axis,
    ``b' = (b - running_mean) * s + beta``; computed in float64 and returned in the weight's dtype.

    Args:
        weight: ``(out, in)`` (Linear), ``(out, in / groups, *k)`` (Conv), or
            ``(in, out / groups, *k)`` (ConvTranspose, with ``transpose=True``).
        bias: ``(out,)`` or None (zero).
        running_mean, running_var, eps: the norm's statistics, ``(out,)``.
        gamma, beta: the norm's affine parameters, ``(out,)`` or None (1 and 0).
        transpose: the weight has ConvTranspose's layout.
        groups: the ConvTranspose's groups (a Conv's or Linear's layout does not depend on it).

    Returns:
        ``(weight', bias')`` with ``weight'.shape == weight.shape`` and ``bias'.shape == (out,)``.

    >>> import torch
    >>> lin, bn = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2).eval()
    >>> bn.running_mean.fill_(0.5); bn.running_var.fill_(4.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> w, b = fold_weights(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(torch.nn.functional.linear(x, w, b), bn(lin(x)), atol=1e-6)
    True
    """
    out = weight.shape[1] * groups if transpose else weight.shape[0]
    if transpose and weight.shape[0] % groups:
        raise ValueError(
            f"fold_weights: a ConvTranspose weight (in, out / groups, *k) needs in divisible by "
            f"groups, got weight {tuple(weight.shape)} and groups={groups}."
        )
    for name, t in (("bias", bias), ("running_mean", running_mean), ("running_var", running_var),
                    ("gamma", gamma), ("beta", beta)):
        if t is not None and tuple(t.shape) != (out,):
            raise ValueError(
                f"fold_weights: {name} must have one value per output channel, shape ({out},), "
                f"for a weight of shape {tuple(weight.shape)}{' (transposed)' if transpose else ''}; "
                f"got {tuple(t.shape)}. Is the norm applied to this layer's output?"
            )
    f64 = dict(dtype=torch.float64, device=weight.device)
    scale = torch.rsqrt(running_var.detach().to(**f64) + eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(**f64)
    b = bias.detach().to(**f64) if bias is not None else torch.zeros(out, **f64)
    new_bias = (b - running_mean.detach().to(**f64)) * scale
    if beta is not None:
        new_bias = new_bias + beta.detach().to(**f64)
    w = weight.detach().to(**f64)
    kernel = (1,) * (w.dim() - 2)
    if transpose:
        # (in, out/groups, *k) -> (groups, in/groups, out/groups, *k): output channel g*(out/groups)+j
        # lives in group g, column j.
        per_group = out // groups
        grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        w = (grouped * scale.reshape(groups, 1, per_group, *kernel)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *((1,) * (w.dim() - 1)))
    return w.to(weight.dtype), new_bias.to(bias.dtype if bias is not None else weight.dtype)


# --------------------------------------------------------------------------------------------
# What can be folded
# --------------------------------------------------------------------------------------------


def _norm_problem(norm: nn.Module, kind: NormKind) -> str | None:
    """Why this batch norm cannot be folded by itself, or None."""
    if kind.unknown:
        return kind.unknown
    if norm._forward_hooks or norm._forward_pre_hooks:
        return "it has forward hooks, which would no longer see its input and output"
    if not kind.eval_is_affine or getattr(norm, "running_mean", None) is None or norm.running_var is None:
        return ("it has no running statistics (track_running_stats=False): it normalizes with the "
                "statistics of each batch even in eval, which no fixed weights can reproduce")
    return None


def _layer_problem(layer: nn.Module, channels: int | None) -> str | None:
    """Why this layer cannot absorb the norm, or None."""
    kind = type(layer).__name__
    base = next(c for c in _LAYERS if isinstance(layer, c))
    if type(layer).forward is not base.forward:
        return f"the {kind} before it overrides {base.__name__}.forward, so its output is not W x + b"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"the {kind} before it has a parametrized weight (remove_parametrizations first)"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"the {kind} before it is lazy and not initialized yet (run one batch first)"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"the {kind} before it has forward hooks, which would see the folded output"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != channels:
        return f"the {kind} before it has {out} outputs but the norm has {channels} channels"
    return None


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldedPair:
    """A norm (``norm``) folded into the layer named ``layer``; the norm is now ``nn.Identity``,
    or the activation it applied after normalizing (``activation``, its repr), kept in its place."""

    layer: str
    norm: str
    activation: str | None = None


@dataclass(frozen=True)
class SkippedNorm:
    """A batch norm left in place, and why."""

    norm: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes:
        method: ``"fx"`` (dataflow from a torch.fx trace) or ``"structural"`` (nn.Sequential order).
        folded: the folded pairs.
        skipped: every other batch norm of the model, with the reason.
        trace_error: why torch.fx could not trace the model (structural method), else None.
        max_abs_diff: max |folded - original| output on ``example_inputs``, when given.
    """

    method: str
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    trace_error: str | None = None
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), skipped {len(self.skipped)} (method: {self.method})"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        lines += [f"  folded  '{p.norm}' into '{p.layer}'" + (f", its activation {p.activation} kept in its place"
                                                            if p.activation else "") for p in self.folded]
        lines += [f"  skipped '{s.norm}': {s.reason}" for s in self.skipped]
        if self.max_abs_diff is not None:
            lines.append(f"  max |folded - original| on the example inputs: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


class FoldResult(NamedTuple):
    """``(model, report)``: the folded copy and its :class:`FoldReport`."""

    model: nn.Module
    report: FoldReport


# --------------------------------------------------------------------------------------------
# Finding the pairs: torch.fx dataflow, or nn.Sequential order
# --------------------------------------------------------------------------------------------


class _LeafTracer(torch.fx.Tracer):
    """torch.fx tracer keeping every norm and every foldable layer whole (normlab's layers live
    outside torch.nn, so the default tracer would trace into their forward)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or isinstance(m, (*_LAYERS, NormLayer)) or super().is_leaf_module(m, qualname)


def _pairs_by_fx(model: nn.Module, norms: dict[str, nn.Module]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    graph = _LeafTracer().trace(model)
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs, skipped = [], {}
    for name in norms:
        nodes = calls.get(name, [])
        if not nodes:
            skipped[name] = "it is not called in the model's traced forward"
            continue
        if len(nodes) > 1:
            skipped[name] = f"it is called at {len(nodes)} places in the forward (one set of weights cannot absorb it)"
            continue
        node = nodes[0]
        source = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(source, torch.fx.Node):
            skipped[name] = "it is called with other than one tensor argument"
            continue
        layer = model.get_submodule(source.target) if source.op == "call_module" else None
        if layer is None or not isinstance(layer, _LAYERS):
            what = f"'{source.target}' ({type(layer).__name__})" if layer is not None else _describe(source)
            skipped[name] = f"its input is not a Conv/ConvTranspose/Linear output but {what}"
            continue
        others = [u for u in source.users if u is not node]
        if others:
            used = ", ".join(sorted(_describe(u) for u in others))
            skipped[name] = f"the output of '{source.target}' is also used by {used}, which would see the folded values"
            continue
        if len(calls[source.target]) > 1:
            skipped[name] = f"'{source.target}' is called at {len(calls[source.target])} places in the forward"
            continue
        pairs.append((source.target, name))
    return pairs, skipped


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)} ({node.op})"
    return f"the {node.op} '{node.target}'"


def _pairs_by_structure(model: nn.Module, norms: dict[str, nn.Module], trace_error: str
                        ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        owners[id(module)] = owners.get(id(module), 0) + 1
    follows: dict[str, str] = {}  # norm name -> the name of the module before it in a Sequential
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = [n for n, _ in seq.named_children()]
        for before, after in zip(names, names[1:]):
            full = f"{prefix}.{after}" if prefix else after
            follows[full] = f"{prefix}.{before}" if prefix else before
    pairs, skipped = [], {}
    for name, norm in norms.items():
        if name not in follows:
            skipped[name] = ("torch.fx could not trace the model, and the structural fallback folds only a norm "
                             "right after a Conv/Linear inside an nn.Sequential; this one is not inside one "
                             "(make the model traceable to fold it)")
            continue
        prev_name = follows[name]
        prev = model.get_submodule(prev_name)
        if not isinstance(prev, _LAYERS):
            skipped[name] = f"it follows '{prev_name}' ({type(prev).__name__}), not a Conv/ConvTranspose/Linear"
            continue
        if owners[id(prev)] > 1 or owners[id(norm)] > 1:
            skipped[name] = "it or the layer before it is shared by several parts of the model"
            continue
        pairs.append((prev_name, name))
    return pairs, skipped


# --------------------------------------------------------------------------------------------
# The tool
# --------------------------------------------------------------------------------------------


def _checked_by_running(model: nn.Module, pairs: list[tuple[str, str]], skipped: dict[str, str],
                        example_inputs: Any) -> list[tuple[str, str]]:
    """The structural pairs that a run on ``example_inputs`` shows safe to fold: every call of the
    layer and of the norm is made by their nn.Sequential, and the norm's input is the layer's
    output each time, so that output goes nowhere else. The rest go to ``skipped``.

    Without a trace, the model's own forward may call the layer outside its nn.Sequential or use
    its output elsewhere; only running it can show that it does not."""
    if not pairs:
        return pairs
    if example_inputs is None:
        for layer_name, norm_name in pairs:
            skipped[norm_name] = (
                f"torch.fx could not trace the model, so nothing shows that the output of '{layer_name}' "
                f"goes to this norm only; pass example_inputs to fold_batchnorm to check it by running the "
                f"model (or make the model traceable)")
        return []
    probe = copy.deepcopy(model)
    layers, norms = {layer for layer, _ in pairs}, {norm for _, norm in pairs}
    stack: list[str] = []
    # (calling module, tensor) per call; the tensors are kept (compared by identity, not by id()).
    seen: dict[str, list[tuple[str | None, Any]]] = {name: [] for name in layers | norms}
    handles = []

    def enter(name: str):
        def hook(module, args):
            if name in norms:  # record the norm's input and who called it
                seen[name].append((stack[-1] if stack else None, args[0] if args else None))
            stack.append(name)
        return hook

    def leave(name: str):
        def hook(module, args, output):
            if stack and stack[-1] == name:
                stack.pop()
            if name in layers:  # record the layer's output and who called it
                seen[name].append((stack[-1] if stack else None, output))
        return hook

    for name, module in probe.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name)))
    try:
        with torch.no_grad():
            probe(*_as_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    safe = []
    for layer_name, norm_name in pairs:
        sequential = layer_name.rpartition(".")[0]
        layer_calls, norm_calls = seen[layer_name], seen[norm_name]
        if not layer_calls:
            skipped[norm_name] = f"'{layer_name}' is not called when the model runs on the example inputs"
        elif any(parent != sequential for parent, _ in layer_calls + norm_calls):
            skipped[norm_name] = (f"'{layer_name}' or this norm is also called outside their nn.Sequential "
                                  f"'{sequential or '<model>'}' (seen running the example inputs)")
        elif len(layer_calls) != len(norm_calls) or any(
                out is not inp for (_, out), (_, inp) in zip(layer_calls, norm_calls)):
            skipped[norm_name] = (f"its input is not the output of '{layer_name}' at every call (seen running the "
                                  f"example inputs)")
        else:
            safe.append((layer_name, norm_name))
    return safe


def _fused(layer: nn.Module, norm: nn.Module) -> nn.Module:
    weight, bias = fold_weights(
        layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps,
        getattr(norm, "weight", None), getattr(norm, "bias", None),
        transpose=isinstance(layer, _CONV_TRANSPOSES), groups=getattr(layer, "groups", 1),
    )
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return new


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _output_ranks(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    ranks: dict[str, int] = {}
    probe = copy.deepcopy(model)
    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            ranks.setdefault(name, output.dim())

        return hook

    for name in names:
        probe.get_submodule(name).register_forward_hook(record(name))
    with torch.no_grad():
        probe(*_as_tuple(example_inputs))
    return ranks


def _max_abs_diff(a: Any, b: Any) -> float:
    if isinstance(a, Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    return 0.0


def fold_batchnorm(model: nn.Module, example_inputs: Any = None) -> FoldResult:
    """A copy of ``model`` (in eval mode) with its batch norms folded into the layers before them.

    Each folded norm becomes ``nn.Identity`` and the layer before it gets the folded weight and
    bias (a bias is created when it had none); everything else is copied unchanged. The input
    model is not modified.

    Args:
        model: the model, with its batch norms in eval mode (``model.eval()``).
        example_inputs: optional input (or tuple of inputs) for ``model``: checks that each Linear
            before a norm outputs ``(N, features)``, measures the folded model's deviation
            (``report.max_abs_diff``), and lets a model that torch.fx cannot trace fold the pairs
            a run shows safe (nothing folds there without it).

    Returns:
        :class:`FoldResult` ``(model, report)``; the report is also logged (logger
        ``normlab.surgery``, INFO).

    Raises:
        ValueError: a batch norm is in training mode, where it normalizes with batch statistics.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    >>> folded, report = fold_batchnorm(net)
    >>> print(report)
    folded 1 batch norm(s), skipped 0 (method: fx)
      folded  '1' into '0'
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(folded(x), net(x), atol=1e-5), type(folded[1]).__name__
    (True, 'Identity')
    """
    check_model(model, "fold_batchnorm")
    norms = dict(find_modules(model, lambda name, m: is_batchnorm(m)))
    kinds = {name: norm_kind(m) for name, m in norms.items()}
    training = [name or "<model>" for name, m in norms.items() if m.training and kinds[name].family == "batch"]
    if training:
        raise ValueError(
            f"fold_batchnorm: batch norm(s) {', '.join(map(repr, training[:5]))}"
            f"{' ...' if len(training) > 5 else ''} are in training mode, where they normalize with "
            f"the statistics of each batch and no fixed weights can reproduce them; call model.eval() first."
        )
    report = FoldReport(method="fx")
    try:
        pairs, skipped = _pairs_by_fx(model, norms)
    except Exception as err:  # any tracing failure (control flow, unsupported ops) falls back
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report.method, report.trace_error = "structural", message
        pairs, skipped = _pairs_by_structure(model, norms, message)
        pairs = _checked_by_running(model, pairs, skipped, example_inputs)

    ranks = {}
    if example_inputs is not None:
        ranks = _output_ranks(model, [layer for layer, _ in pairs if isinstance(model.get_submodule(layer), nn.Linear)],
                              example_inputs)
    chosen: dict[str, nn.Module] = {}
    for layer_name, norm_name in pairs:
        layer, norm, kind = model.get_submodule(layer_name), norms[norm_name], kinds[norm_name]
        problem = _norm_problem(norm, kind) or _layer_problem(layer, kind.channels)
        if problem is None and ranks.get(layer_name, 2) != 2:
            problem = (f"the Linear '{layer_name}' before it outputs a {ranks[layer_name]}-D tensor, whose "
                       f"dimension 1 is not its features")
        if problem:
            skipped[norm_name] = problem
            continue
        chosen[layer_name] = _fused(layer, norm)
        # A norm fused with an activation leaves the activation where the norm was.
        chosen[norm_name] = kind.activation.eval() if kind.activation is not None else nn.Identity()
        report.folded.append(FoldedPair(layer_name, norm_name, None if kind.activation is None else repr(kind.activation)))
    for name in norms:
        if name in skipped:
            report.skipped.append(SkippedNorm(name or "<model>", skipped[name]))

    folded = replace_modules(model, set(chosen), lambda name, m: chosen[name])
    if example_inputs is not None:
        with torch.no_grad():
            inputs = _as_tuple(example_inputs)
            report.max_abs_diff = _max_abs_diff(folded(*inputs), model(*inputs))
    log.info("fold_batchnorm: %s", report)
    return FoldResult(folded, report)
