"""Santurkar et al.'s noisy BN: StepNoise (per-unit shift and scale redrawn every training step)
and its wiring after each norm (model.norm_noise)."""

from __future__ import annotations

import pytest
import torch

from normlab.lab.config import ConfigError, ModelConfig
from normlab.lab.models import build_model, check_model_config
from normlab.lab.noise import StepNoise


def _affine_per_unit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit y = a_c x + b_c per channel c by least squares in float64 (an independent oracle)."""
    c = x.shape[1]
    xs = x.transpose(0, 1).reshape(c, -1).double()
    ys = y.transpose(0, 1).reshape(c, -1).double()
    a = ((xs - xs.mean(1, keepdim=True)) * (ys - ys.mean(1, keepdim=True))).sum(1) / ((xs - xs.mean(1, keepdim=True)) ** 2).sum(1)
    b = ys.mean(1) - a * xs.mean(1)
    resid = (ys - (a[:, None] * xs + b[:, None])).abs().max()
    assert resid < 1e-5  # the same shift and scale for every example and position of a channel
    return a, b


def test_step_noise_is_a_per_unit_shift_and_scale_within_the_declared_ranges():
    torch.manual_seed(0)
    noise = StepNoise(0.5).train()
    x = torch.randn(16, 6, 4, 4)
    a, b = _affine_per_unit(x, noise(x))
    assert ((a >= 1) & (a <= 1.5)).all() and ((b >= -0.5) & (b <= 0.5)).all()
    assert a.std() > 0 and b.abs().sum() > 0  # drawn per unit, not one number


def test_step_noise_changes_every_step_and_is_reproducible_from_the_seed():
    x = torch.randn(32, 5)
    noise = StepNoise(1.0).train()
    torch.manual_seed(3)
    first, second = noise(x), noise(x)
    assert not torch.equal(first, second)  # a new distribution at every step
    torch.manual_seed(3)
    assert torch.equal(noise(x), first)


def test_step_noise_is_the_identity_in_eval_mode():
    x = torch.randn(8, 3)
    state = torch.get_rng_state()
    assert torch.equal(StepNoise(0.5).eval()(x), x)
    assert torch.equal(torch.get_rng_state(), state)  # and draws nothing


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "0.5"])
def test_step_noise_rejects_a_bad_strength(bad):
    with pytest.raises(ValueError, match=r"strength must be a positive finite number .* got"):
        StepNoise(bad)


def test_step_noise_rejects_a_one_dimensional_input():
    with pytest.raises(ValueError, match=r"expects \(N, C\) or \(N, C, \.\.\.\) input, got shape \(4,\)"):
        StepNoise(0.5)(torch.randn(4))


@pytest.mark.parametrize("kind,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8))])
def test_norm_noise_follows_each_norm_and_feeds_the_activation(kind, shape):
    torch.manual_seed(0)
    net = build_model(ModelConfig(kind=kind, widths=[8, 8], activation="relu", norm="batch", norm_noise=0.5), shape, 3)
    for block in net.blocks:
        slot = block.pre_activation
        assert isinstance(slot.norm, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) or "Batch" in type(slot.norm).__name__
        assert isinstance(slot.noise, StepNoise) and slot.noise.strength == 0.5
    torch.manual_seed(0)
    plain = build_model(ModelConfig(kind=kind, widths=[8, 8], activation="relu", norm="batch"), shape, 3)
    x = torch.randn(10, *shape)
    # Same weights (the noise has none); in eval mode the noisy network is the plain one.
    assert torch.equal(net.eval()(x), plain.eval()(x))
    assert not torch.equal(net.train()(x), plain.train()(x))


def test_norm_noise_needs_a_norm_and_a_valid_strength():
    with pytest.raises(ConfigError, match=r"model.norm_noise=0.5 perturbs the output of each block's norm, but "
                                          r"model.norm='none'"):
        check_model_config(ModelConfig(norm="none", norm_noise=0.5))
    with pytest.raises(ConfigError, match=r"model.norm_noise must be a finite number >= 0 \(0: no noise\), got -1.0"):
        check_model_config(ModelConfig(norm="batch", norm_noise=-1.0))
    with pytest.raises(ConfigError, match=r"model.norm='batch_act' before the activation computes both in one layer"):
        check_model_config(ModelConfig(norm="batch_act", activation="relu", norm_noise=0.5))
    check_model_config(ModelConfig(norm="none", norm_noise=0.0))
