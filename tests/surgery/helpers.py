"""Shared helpers of the model-tool tests: seeded non-trivial norms, state comparison."""

from __future__ import annotations

import torch
from torch import nn

from normlab.layers.frozen import _FrozenBatchNorm


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm's γ, β and running statistics non-trivial values (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm)):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                    m.num_batches_tracked.fill_(10)
    return model


def snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    """Everything a tool must not change: tensors (cloned), module objects by name, modes."""
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = dict(model.named_modules())
    modes = {name: m.training for name, m in modules.items()}
    return state, modules, modes


def assert_untouched(model: nn.Module, before: tuple[dict, dict, dict]) -> None:
    state, modules, modes = before
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state), "the model's state-dict keys changed"
    for key, value in state.items():
        same = now[key].shape == value.shape and bool(
            (now[key] == value).all() or (now[key].is_floating_point() and torch.allclose(now[key], value, 0, 0, True)))
        assert same, f"{key} changed"
        assert now[key].requires_grad == value.requires_grad, f"{key}.requires_grad changed"
    assert dict(model.named_modules()) == modules, "the model's submodules changed"
    assert {name: m.training for name, m in model.named_modules()} == modes, "modes changed"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "hooks left behind"


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((actual.detach().double() - expected.detach().double()).abs().max())
    scale = float(expected.detach().double().abs().max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * max |expected| {scale:.3g}"
