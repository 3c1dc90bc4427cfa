"""Li et al. 2019's variance shift of every batch norm of a lab model, measured at test time.

For a batch norm with running variance ``r_c`` (channel ``c``) whose input, on the test set in
eval mode, has variance ``v_c`` (over the whole test set: every example, and every position of
a feature map; unbiased, as torch's running variance), the shift of channel ``c`` is

    shift_c = max(a_c, 1 / a_c),   a_c = (r_c + eps) / (v_c + eps)

(``eps`` the layer's own: the layer divides by ``sqrt(var + eps)``, so ``a_c`` is the squared
ratio of the scale it uses at test time to the scale the test data have; it also keeps a dead
channel finite). Li, Chen, Hu & Yang 2019 ("Understanding the disharmony between dropout and
batch normalization by variance shift") define the shift per neuron as
``max(moving_var / real_var, real_var / moving_var)`` and average it over a layer's channels;
so does :func:`variance_shift`. A shift of 1 means the running statistics match what the layer
sees at test time; dropout *before* a batch norm makes the running variance (gathered in training,
with dropout) larger than the test-time variance (no dropout), so ``a_c > 1`` and the shift grows.

Also recorded: the geometric mean over channels of ``a_c`` (the *direction*: above 1 when the
running variance exceeds the test-time one, Li et al.'s prediction).

>>> import torch
>>> from normlab.lab.config import ModelConfig
>>> from normlab.lab.models import build_model
>>> net = build_model(ModelConfig(widths=[8, 8], norm="batch", activation="relu"), (6,), 3).eval()
>>> values = variance_shift(net, torch.randn(500, 6))
>>> sorted(values)
['var_ratio_1', 'var_ratio_2', 'var_shift', 'var_shift_1', 'var_shift_2']
>>> values["var_shift_1"] >= 1.0
True
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["batch_norms", "variance_shift"]


def batch_norms(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``[(i, norm)]``: the blocks' norms that keep a running variance, ``i`` = 1 for the first block."""
    out = []
    for i, block in enumerate(getattr(model, "blocks", []), start=1):
        norm = getattr(block, "norm", None)
        if isinstance(getattr(norm, "running_var", None), torch.Tensor):
            out.append((i, norm))
    return out


@torch.no_grad()
def variance_shift(model: nn.Module, x: torch.Tensor, *, chunk: int = 2000, skip_first: bool = True) -> dict[str, float]:
    """Per batch norm of ``model.blocks`` (``i`` = 1..depth): ``var_shift_{i}``, the mean over
    channels of ``max(a_c, 1/a_c)``, and ``var_ratio_{i}``, the geometric mean over channels of
    ``a_c`` (module docstring); ``var_shift``: the mean of ``var_shift_{i}`` over the batch norms
    after the first (``skip_first``; the first sees the input, which dropout in a block never
    touches), or over all of them. ``{}`` for a model without batch norms.

    The model must be in eval mode (the running statistics are used and not updated); ``x`` (the
    test inputs, ``(N, ...)``) is fed in chunks of ``chunk``.
    """
    norms = batch_norms(model)
    if not norms:
        return {}
    if model.training:
        raise ValueError("variance_shift compares the running variance with the test-time variance, so the model "
                         "must be in eval mode (model.eval()); got a model in training mode.")
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i, _ in norms}
    hooks = [norm.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach()))
             for i, norm in norms]
    try:
        for start in range(0, len(x), chunk):
            model(x[start:start + chunk])
    finally:
        for hook in hooks:
            hook.remove()
    out: dict[str, float] = {}
    for i, norm in norms:
        h = torch.cat(inputs[i]).double()
        h = h.transpose(0, 1).reshape(h.shape[1], -1)  # (C, N * positions)
        eps = float(getattr(norm, "eps", 1e-5))
        ratio = (norm.running_var.double() + eps) / (h.var(dim=1, unbiased=True) + eps)
        out[f"var_shift_{i}"] = float(torch.maximum(ratio, 1.0 / ratio).mean())
        out[f"var_ratio_{i}"] = float(ratio.log().mean().exp())
    later = [out[f"var_shift_{i}"] for i, _ in norms[1 if skip_first and len(norms) > 1 else 0:]]
    out["var_shift"] = math.fsum(later) / len(later)
    return out
