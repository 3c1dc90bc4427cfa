"""Import from Keras and Flax: the frameworks' formulas written out in NumPy, and the real libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
from normlab.surgery import batchnorm_from_flax, batchnorm_from_keras


def arrays(c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.2, 3, c)


def keras_inference(x, gamma, beta, mean, var, epsilon):
    """keras.layers.BatchNormalization.call(training=False), per channel (axis 1 here)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = 1 / np.sqrt(var + epsilon)
    if gamma is not None:
        inv = inv * gamma
    out = x * inv.reshape(shape) - (mean * inv).reshape(shape)
    return out + beta.reshape(shape) if beta is not None else out


def framework_update(moving, batch, decay):
    """Keras's and Flax's moving average: the decay weights the old value."""
    return moving * decay + batch * (1 - decay)


@pytest.mark.parametrize("scale, center", [(True, True), (False, True), (True, False), (False, False)])
def test_keras_inference_and_training_update_match_keras_formulas(scale, center):
    gamma, beta, mean, var = arrays()
    gamma, beta = (gamma if scale else None), (beta if center else None)
    bn = batchnorm_from_keras(gamma, beta, mean, var, momentum=0.9, epsilon=1e-3).double()
    x = np.random.default_rng(1).normal(2, 3, size=(5, 4, 3, 3))
    expected = keras_inference(x, gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert bn.affine == (scale or center)

    bn.train()(torch.from_numpy(x))
    axes = (0, 2, 3)
    np.testing.assert_allclose(bn.running_mean.numpy(), framework_update(mean, x.mean(axes), 0.9), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), framework_update(var, x.var(axes), 0.9), rtol=1e-6)


def test_flax_inference_and_update_match_flax_formulas():
    scale, bias, mean, var = arrays(3, seed=2)
    bn = batchnorm_from_flax(scale=scale, bias=bias, mean=mean, var=var, momentum=0.95, dim=1).double()
    assert type(bn) is normlab.BatchNorm1d and bn.eps == 1e-5 and not bn.training
    x = np.random.default_rng(3).normal(-1, 2, size=(8, 3))
    flax_y = (x - mean) * (1 / np.sqrt(var + 1e-5)) * scale + bias  # flax.linen.BatchNorm, use_running_average
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), flax_y, rtol=1e-6, atol=1e-6)
    bn.train()(torch.from_numpy(x))
    flax_var = (x * x).mean(0) - x.mean(0) ** 2  # Flax's batch variance: E[x^2] - E[x]^2 (biased)
    np.testing.assert_allclose(bn.running_var.numpy(), framework_update(var, flax_var, 0.95), rtol=1e-6)


def test_import_errors():
    g, b, m, v = arrays()
    with pytest.raises(ValueError, match=r"batchnorm_from_keras: every array needs one value per channel, got sizes"):
        batchnorm_from_keras(g, b, m[:3], v)
    with pytest.raises(ValueError, match=r"the moving variance has negative values \(-1\); a variance is >= 0"):
        batchnorm_from_keras(g, b, m, -np.ones(4))
    with pytest.raises(ValueError, match=r"batchnorm_from_flax: dim must be 1, 2 or 3 \(BatchNorm1d/2d/3d\), got 4"):
        batchnorm_from_flax(g, b, m, v, dim=4)
    with pytest.raises(ValueError, match=r"gamma must be a 1-D array with one value per channel, got shape \(2, 2\)"):
        batchnorm_from_keras(np.ones((2, 2)), None, m, v)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        batchnorm_from_keras(g, b, m, v, momentum=1.5)
    with pytest.raises(ValueError, match=r"mean has NaN or infinite values"):
        batchnorm_from_flax(g, b, np.full(4, np.nan), v)


def test_against_real_keras_if_installed():
    keras = pytest.importorskip("keras")
    gamma, beta, mean, var = arrays()
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    layer.build((None, 4))
    layer.set_weights([gamma, beta, mean, var])
    x = np.random.default_rng(4).normal(2, 3, size=(6, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x, training=False))
    bn = batchnorm_from_keras(*layer.get_weights(), momentum=layer.momentum, epsilon=layer.epsilon, dim=1)
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    layer(x, training=True)  # one training step moves Keras's moving statistics ...
    bn.train()(torch.from_numpy(x))  # ... and the converted layer's the same way
    _, _, moving_mean, moving_var = layer.get_weights()
    np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), moving_var, rtol=1e-5, atol=1e-6)


def test_against_real_flax_if_installed():
    flax_nn = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")
    x = np.random.default_rng(5).normal(size=(6, 4)).astype("float32")
    module = flax_nn.BatchNorm(use_running_average=False, momentum=0.9)
    import jax

    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    _, updates = module.apply(variables, jnp.asarray(x * 2 + 1), mutable=["batch_stats"])
    params, stats = variables["params"], updates["batch_stats"]
    expected = np.asarray(flax_nn.BatchNorm(use_running_average=True).apply(
        {"params": params, "batch_stats": stats}, jnp.asarray(x)))
    bn = batchnorm_from_flax(**params, **stats, momentum=0.9, dim=1)
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    # The same training step from Flax's initial statistics moves them as Flax did.
    start = batchnorm_from_flax(**params, **variables["batch_stats"], momentum=0.9, dim=1).train()
    start(torch.from_numpy(x * 2 + 1))
    np.testing.assert_allclose(start.running_mean.numpy(), np.asarray(stats["mean"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(start.running_var.numpy(), np.asarray(stats["var"]), rtol=1e-5, atol=1e-6)
