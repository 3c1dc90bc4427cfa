"""Helpers shared by the batch-norm variant tests (renorm, ghost): seeded layers and inputs on the
test device, and a scale-aware closeness check."""

from __future__ import annotations

import copy

import torch
from device_switch import generator
from torch import nn

import normlab

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
NORMLAB_BN = {1: normlab.BatchNorm1d, 2: normlab.BatchNorm2d, 3: normlab.BatchNorm3d}


def kind(shape) -> int:
    """1, 2 or 3: the BatchNorm{k}d that takes input of this shape."""
    return max(1, len(shape) - 2)


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give γ, β and the running statistics seeded, non-trivial values (count 3)."""
    g = generator(seed)
    c = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g) * 0.5)
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            layer.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            layer.num_batches_tracked.fill_(3)
    return layer


def sample(shape, seed, dtype=torch.float32, fmt=None) -> torch.Tensor:
    """Seeded data with a different mean and spread per channel (dimension 1)."""
    g = generator(seed)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape[1], generator=g, dtype=torch.float64)
                                                                 * 2 + 0.3).view(view)
    x = (x + torch.randn(shape[1], generator=g, dtype=torch.float64).view(view)).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def forward_backward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of ``layer`` on a fresh copy of ``x``: the output and the gradients
    of the input, weight and bias (the latter two when the layer has them)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = {"input": x.grad}
    if layer.weight is not None:
        grads.update(weight=layer.weight.grad, bias=layer.bias.grad)
    return y.detach(), grads


def check_16_bit_input(layer: nn.Module, x16: torch.Tensor, tol: float) -> None:
    """16-bit input: the output keeps the input's dtype and is within ``tol`` of the same layer
    run in float32 on the same rounded values; the running statistics stay float32 and match."""
    ref_layer = copy.deepcopy(layer)
    expected = ref_layer(x16.float())
    y = layer(x16)
    assert y.dtype == x16.dtype
    close(y, expected, tol, f"{x16.dtype} output")
    for name in ("running_mean", "running_var"):
        assert getattr(layer, name).dtype == torch.float32
        close(getattr(layer, name), getattr(ref_layer, name), 1e-5, name)


def check_state_dict_round_trip(ours: nn.Module, kind: int) -> None:
    """``ours`` has torch's batch-norm state dict: the same keys and version metadata, and strict
    loading both ways (torch's ``BatchNorm{kind}d`` -> ours -> a fresh torch layer) keeps every value."""
    theirs = randomize(TORCH_BN[kind](ours.num_features), seed=kind)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata[""] == theirs.state_dict()._metadata[""]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = TORCH_BN[kind](ours.num_features)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def close(actual, expected, tol, what):
    """Max abs error at most ``tol`` times the larger of 1 and the expected values' scale."""
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    err = float((a - e).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(e.abs().max()) if e.numel() else 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"
