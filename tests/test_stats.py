"""normlab.stats: the running-statistic estimators and the Keras/Flax conversions, held against
those frameworks' update rules written out in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
from normlab import stats


def keras_update(moving_mean, moving_var, batch, momentum):
    """keras.layers.BatchNormalization: moving = moving * momentum + batch_stat * (1 - momentum),
    with the biased batch variance (ops.moments)."""
    mean, var = batch.mean(0), batch.var(0)  # np.var: biased
    return moving_mean * momentum + mean * (1 - momentum), moving_var * momentum + var * (1 - momentum)


def flax_update(ra_mean, ra_var, batch, momentum):
    """flax.linen.BatchNorm: ra = momentum * ra + (1 - momentum) * stat, var = E[x^2] - E[x]^2."""
    mean = batch.mean(0)
    var = (batch**2).mean(0) - mean**2
    return momentum * ra_mean + (1 - momentum) * mean, momentum * ra_var + (1 - momentum) * var


@pytest.mark.parametrize("framework, update", [("keras", keras_update), ("flax", flax_update)])
def test_layer_built_from_framework_conventions_updates_like_the_framework(framework, update):
    kwargs = stats.from_keras() if framework == "keras" else stats.from_flax()
    layer = normlab.BatchNorm1d(3, **kwargs).double()
    rng = np.random.default_rng(0)
    ref_mean, ref_var = np.zeros(3), np.ones(3)
    for _ in range(5):
        batch = rng.normal(2.0, 3.0, size=(16, 3))
        layer(torch.from_numpy(batch))
        ref_mean, ref_var = update(ref_mean, ref_var, batch, 0.99)
    np.testing.assert_allclose(layer.running_mean.numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), ref_var, rtol=1e-6)
    assert layer.eps == stats.CONVENTIONS[framework].default_eps


def test_conventions_table():
    assert stats.CONVENTIONS["torch"].torch_momentum == 0.1
    assert stats.CONVENTIONS["keras"].torch_momentum == pytest.approx(0.01)
    assert stats.from_keras(momentum=0.9, epsilon=1e-4) == {"momentum": pytest.approx(0.1), "eps": 1e-4, "unbiased": False}
    assert stats.from_flax()["eps"] == 1e-5


def test_decay_and_momentum_are_inverse():
    assert stats.momentum_from_decay(0.99) == pytest.approx(0.01)
    assert stats.decay_from_momentum(stats.momentum_from_decay(0.7)) == pytest.approx(0.7)


def test_ema_and_cumulative_average():
    running, batch = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(stats.ema(running, batch, 0.25), torch.tensor([1.5, 3.0]))
    # the cumulative average of batches b1..bk equals their plain mean
    values = [torch.tensor([float(v)]) for v in (4, 8, 3, 1)]
    avg = torch.zeros(1)
    for count, v in enumerate(values):
        avg = stats.cumulative_average(avg, v, count)
    torch.testing.assert_close(avg, torch.tensor([4.0]))


def test_update_running_stats_biased_and_unbiased():
    rm, rv = torch.zeros(1), torch.ones(1)
    mean, var = stats.update_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([3.0]), n=4, momentum=1.0)
    torch.testing.assert_close(var, torch.tensor([4.0]))  # 3 * 4/3
    _, var = stats.update_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([3.0]), n=4, momentum=1.0, unbiased=False)
    torch.testing.assert_close(var, torch.tensor([3.0]))


@pytest.mark.parametrize(
    "value, error, match",
    [
        (1.5, ValueError, r"momentum must lie in \[0, 1\].*got 1.5.*momentum_from_decay"),
        (-0.1, ValueError, r"must lie in \[0, 1\]"),
        ("0.1", TypeError, r"momentum must be a float in \[0, 1\] or None.*got str '0.1'"),
        (True, TypeError, r"got bool True"),
    ],
)
def test_bad_momentum(value, error, match):
    with pytest.raises(error, match=match):
        stats.check_momentum(value)


def test_unbiased_var_needs_two_values():
    with pytest.raises(ValueError, match=r"at least 2 values per channel, got n=1"):
        stats.unbiased_var(torch.ones(2), 1)


@pytest.mark.parametrize("decay, momentum", [(0.99, 0.01), (0.9, 0.1), (0.999, 0.001), (0.7, 0.3), (0.0, 1.0), (1.0, 0.0)])
def test_item_8_momentum_from_decay_is_the_decimal_difference(decay, momentum):
    """Issue 15 item 8: 1 - 0.99 in floats is 0.010000000000000009; the README promises 0.01.
    The oracle is the decimal literal, exactly (no tolerance)."""
    assert stats.momentum_from_decay(decay) == momentum
    assert stats.decay_from_momentum(momentum) == decay
    assert repr(stats.from_keras()["momentum"]) == "0.01" and stats.CONVENTIONS["keras"].torch_momentum == 0.01
