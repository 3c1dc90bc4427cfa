"""Issue 13 item 2, inference-stats (a), as a library test: an example's output does not depend
on its batch-mates under eval-mode batch norm, group norm, layer norm and instance norm (normlab's
layers and torch's), and does under training-mode batch norm.

Tolerance: ``rtol=1e-5, atol=1e-6`` in float32 (outputs are O(1) after normalization). A
batch-independent layer computes each example's output from that example alone, so the outputs
agree bitwise when the kernel path is the same; a kernel that blocks its reductions differently
(another batch size, another position) may sum a group's 200 values in another order, which
moves the result by about sqrt(200) x 6e-8 ~ 1e-6 relative, below the tolerance. A
training-mode batch norm's change is the difference of two batches' statistics, over 0.01 here:
three orders of magnitude above it.
"""

from __future__ import annotations

import pytest
import torch
from device_switch import generator
from torch import nn

import normlab

RTOL, ATOL = 1e-5, 1e-6
C, H, W = 8, 5, 5
PROBES, MATES = 3, 13


def _data():
    g = generator(0)
    probes = torch.randn(PROBES, C, H, W, generator=g)
    mates_a = torch.randn(MATES, C, H, W, generator=g)
    # Batch-mates from another distribution: a batch statistic would move far.
    mates_b = 3 * torch.randn(MATES, C, H, W, generator=g) + 2
    return probes, mates_a, mates_b


def _randomized(layer: nn.Module) -> nn.Module:
    """Non-trivial affine parameters, and running statistics away from (0, 1) where kept."""
    g = generator(1)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(1 + 0.5 * torch.randn(layer.weight.shape, generator=g))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g))
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.randn(C, generator=g))
            layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return layer


LAYERS = {
    "normlab BatchNorm2d": lambda: normlab.BatchNorm2d(C),
    "torch BatchNorm2d": lambda: nn.BatchNorm2d(C),
    "normlab GroupNorm": lambda: normlab.GroupNorm(4, C),
    "torch GroupNorm": lambda: nn.GroupNorm(4, C),
    "normlab LayerNorm": lambda: normlab.LayerNorm([C, H, W]),
    "torch LayerNorm": lambda: nn.LayerNorm([C, H, W]),
    "normlab InstanceNorm2d": lambda: normlab.InstanceNorm2d(C, affine=True),
    "torch InstanceNorm2d": lambda: nn.InstanceNorm2d(C, affine=True),
    "normlab InstanceNorm2d, running statistics": lambda: normlab.InstanceNorm2d(C, affine=True, track_running_stats=True),
    "torch InstanceNorm2d, running statistics": lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True),
}
# Eval mode for every layer; training mode too for those that normalize per example in training.
CASES = [(name, "eval") for name in LAYERS] + [(name, "train") for name in LAYERS if "BatchNorm" not in name]


def _outputs(layer: nn.Module, probes: torch.Tensor, mates: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.cat([probes, mates]))[: len(probes)]


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_inference_stats_output_ignores_batch_mates(name, mode):
    layer = _randomized(LAYERS[name]())
    layer.train(mode == "train")
    probes, mates_a, mates_b = _data()
    out_a, out_b = _outputs(layer, probes, mates_a), _outputs(layer, probes, mates_b)
    torch.testing.assert_close(out_a, out_b, rtol=RTOL, atol=ATOL)
    # The same as each example alone, in a batch of one (another batch size: another kernel path).
    with torch.no_grad():
        alone = torch.cat([layer(x[None]) for x in probes])
    torch.testing.assert_close(out_a, alone, rtol=RTOL, atol=ATOL)
    assert out_a.abs().max() > 0.1  # a real output, not a constant that trivially agrees


@pytest.mark.parametrize("name", ["normlab BatchNorm2d", "torch BatchNorm2d"])
def test_inference_stats_training_mode_batch_norm_depends_on_batch_mates(name):
    layer = _randomized(LAYERS[name]()).train()
    probes, mates_a, mates_b = _data()
    out_a, out_b = _outputs(layer, probes, mates_a), _outputs(layer, probes, mates_b)
    change = float((out_a - out_b).abs().max() / out_a.square().mean().sqrt())
    assert change > 1e-2, f"{name} in training mode: relative change {change:.2e}, expected a batch dependence"
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out_a, out_b, rtol=RTOL, atol=ATOL)
