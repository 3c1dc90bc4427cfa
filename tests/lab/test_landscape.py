"""The loss landscape along the gradient (Santurkar et al.'s variation of the loss, gradient
change and effective beta-smoothness), against the closed form of a least-squares loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.landscape import landscape_along_gradient
from normlab.lab.noise import StepNoise


def _mse(out, y):
    return F.mse_loss(out.squeeze(1), y)


def test_landscape_matches_the_closed_form_of_least_squares():
    torch.manual_seed(0)
    n, d = 40, 5
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    net = torch.nn.Linear(d, 1).double()
    etas = (0.05, 0.1, 0.3)
    got = landscape_along_gradient(net, x, y, etas, loss_fn=_mse)
    # theta = (w, b); L = |X theta - y|^2 / n; H = 2 X^T X / n; g = H theta - 2 X^T y / n.
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()])
    h = 2 * xa.T @ xa / n
    g = h @ theta - 2 * xa.T @ y / n

    def loss(t):
        return float(((xa @ t - y) ** 2).mean())

    losses = [loss(theta - e * g) for e in etas]
    hg = float((h @ g).norm())
    assert got["loss"] == pytest.approx(loss(theta), rel=1e-10)
    assert got["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert got["loss_variation"] == pytest.approx(max(losses) - min(losses), rel=1e-8)
    assert got["grad_change"] == pytest.approx(max(etas) * hg, rel=1e-8)  # grad(theta - eta g) - g = -eta H g
    assert got["beta_smoothness"] == pytest.approx(hg / float(g.norm()), rel=1e-8)


def test_landscape_leaves_the_model_and_the_random_stream_alone():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), StepNoise(0.5), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    rng = torch.get_rng_state()
    with torch.no_grad():  # as the trainer calls measurements
        first = landscape_along_gradient(net, x, y, (0.5, 1.0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and not net.training
    assert landscape_along_gradient(net, x, y, (0.5, 1.0)) == first  # the noise is fixed by the seed


def test_landscape_moves_only_the_parameters_that_train():
    torch.manual_seed(2)
    net = torch.nn.Linear(3, 1).double()
    net.bias.requires_grad_(False)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    got = landscape_along_gradient(net, x, y, (0.1,), loss_fn=_mse)
    w = net.weight.detach().reshape(-1)
    g = 2 * x.T @ (x @ w + net.bias.detach() - y) / len(y)
    assert got["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)


def test_landscape_rejects_bad_step_sizes_and_frozen_models():
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=r"etas must be a non-empty list of positive finite step sizes .* got \[\]"):
        landscape_along_gradient(net, x, y, [])
    with pytest.raises(ValueError, match=r"etas must be .* got \[0.1, -1.0\]"):
        landscape_along_gradient(net, x, y, [0.1, -1.0])
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no parameter with requires_grad"):
        landscape_along_gradient(net, x, y, [0.1])
