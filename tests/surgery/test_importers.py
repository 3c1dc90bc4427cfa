"""Import from Keras and Flax: the frameworks' formulas written out in NumPy, and the real libraries.

Keras 3 runs on its torch backend and Flax on CPU JAX; the test extra installs both (they need
Python >= 3.11, where the tests below run them unconditionally: a missing library is an error,
not a skip). The ``test_real_*`` tests are issue 11 item 9, "real clients in CI".
"""

from __future__ import annotations

import os
import random
import sys

# Before Keras is imported: without it Keras picks TensorFlow, which is not installed.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

import normlab
from normlab.layers.renorm import BatchRenorm2d
from normlab.surgery import batchnorm_from_flax, batchnorm_from_keras

REAL_LIBS = sys.version_info >= (3, 11)
if REAL_LIBS:
    import jax
    import jax.numpy as jnp
    import keras
    from flax import linen, nnx

needs_libs = pytest.mark.skipif(
    not REAL_LIBS, reason="keras>=3.14 and flax need Python >= 3.11; the test extra installs them there"
)

pytestmark = [
    # Keras's own, on NumPy 2 (Variable.__array__ lacks copy=), and for a layer with nothing to train.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The model does not have any trainable weights:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _leave_global_rngs_alone():
    """Keras's fit draws from torch's global generator (and may from NumPy's and Python's): restore
    them, so that the modules that run after this one see what they would have seen without it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(np_state)
    random.setstate(py_state)


FLAGS = [(True, True), (False, True), (True, False), (False, False)]


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


def channels_last_data(seed: int, shape=(6, 5, 6, 3), loc=2.0, scale=3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype("float32")


def run_nhwc(bn: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """A channels-first normlab layer on channels-last data: permute in, permute back."""
    return bn(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).detach().numpy()


def close(actual, expected, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# --- the frameworks' formulas, arrays API ---------------------------------------------------------


@pytest.mark.parametrize("scale, center", FLAGS)
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


def test_arrays_api_keeps_the_older_signature():
    g, b, m, v = arrays()
    by_keyword = batchnorm_from_keras(g, b, m, v, momentum=0.9, epsilon=1e-2).state_dict()
    for bn in (batchnorm_from_keras(g, b, m, v, 0.9, 1e-2),  # momentum and epsilon positionally
               batchnorm_from_keras(g, b, moving_mean=m, moving_variance=v, momentum=0.9, epsilon=1e-2),
               batchnorm_from_keras(gamma=g, beta=b, moving_mean=m, moving_variance=v, momentum=0.9, epsilon=1e-2)):
        assert (bn.momentum, bn.eps) == pytest.approx((0.1, 1e-2))
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(value, by_keyword[key], rtol=0, atol=0)
    default = batchnorm_from_keras(g, b, m, v)  # Keras's defaults, as documented
    assert (default.momentum, default.eps) == pytest.approx((0.01, 1e-3))
    no_scale = batchnorm_from_keras(None, b, m, v)
    assert no_scale.affine and not no_scale.weight.requires_grad and no_scale.bias.requires_grad
    torch.testing.assert_close(no_scale.weight, torch.ones(4))
    assert not batchnorm_from_flax(mean=m, var=v).affine  # Flax params without scale and bias


def test_arrays_api_errors_name_the_rule():
    g, b, m, v = arrays()
    with pytest.raises(TypeError, match=r"got momentum both positionally \(0.9\) and as momentum=0.8"):
        batchnorm_from_keras(g, b, m, v, 0.9, momentum=0.8)
    with pytest.raises(TypeError, match=r"got gamma both positionally and as gamma=; pass it once"):
        batchnorm_from_keras(g, b, m, v, gamma=g)
    with pytest.raises(TypeError, match=r"got the number 0.5 among the arrays"):
        batchnorm_from_keras(g, 0.5, m, v)
    with pytest.raises(TypeError, match=r"give both scale= and center= \(missing center=\)"):
        batchnorm_from_keras(b, m, v, scale=False)
    with pytest.raises(ValueError, match=r"scale=True but no gamma was given"):
        batchnorm_from_keras(beta=b, moving_mean=m, moving_variance=v, scale=True)
    with pytest.raises(ValueError, match=r"use_bias=False but a bias was given"):
        batchnorm_from_flax(scale=g, bias=b, mean=m, var=v, use_bias=False)
    with pytest.raises(TypeError, match=r"scale must be True, False or None .* got str 'no'"):
        batchnorm_from_keras(m, v, scale="no", center=False)
    with pytest.raises(TypeError, match=r"expected arrays or the source layer \(batchnorm_from_keras\(layer\)\), "
                                        r"got torch.nn.modules.batchnorm.BatchNorm2d"):
        batchnorm_from_keras(torch.nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"variables= goes with a flax.linen.BatchNorm module"):
        batchnorm_from_flax(g, b, m, v, variables={})
    with pytest.raises(ValueError, match=r"renorm must be one of \['error', 'batchnorm', 'batchrenorm'\], got 'yes'"):
        batchnorm_from_keras(g, b, m, v, renorm="yes")


# --- real Keras (torch backend) -------------------------------------------------------------------


def trained_keras_bn(seed: int = 0, input_shape=(5, 6, 3), **config):
    """A BatchNormalization trained by Keras itself: four SGD steps of model.fit, so gamma, beta and
    the moving statistics all moved from their initial values."""
    layer = keras.layers.BatchNormalization(**config)
    model = keras.Sequential([keras.Input(input_shape), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = channels_last_data(seed, (32, *input_shape))
    target = np.random.default_rng(seed + 1).normal(1, 2, size=x.shape).astype("float32")
    model.fit(x, target, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return layer


def keras_weights(layer) -> dict[str, np.ndarray]:
    return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}


@needs_libs
@pytest.mark.parametrize("scale, center", FLAGS)
def test_real_keras_channels_last_4d_inference_and_training_step(scale, center):
    layer = trained_keras_bn(momentum=0.8, epsilon=1e-2, scale=scale, center=center)
    before = keras_weights(layer)
    assert np.abs(before["moving_mean"]).min() > 0.1  # the moving statistics are not the initial ones
    if scale:
        assert not np.allclose(before["gamma"], 1)  # the optimizer moved gamma
    bn = batchnorm_from_keras(layer)
    assert type(bn) is normlab.BatchNorm2d and not bn.training and not bn.unbiased
    assert (bn.momentum, bn.eps) == pytest.approx((0.2, 1e-2))
    assert bn.affine == (scale or center)
    if bn.affine:
        # center=False is a weight without a bias (issue 15); scale=False a weight frozen at 1.
        assert bn.weight.requires_grad == scale and (bn.bias is not None) == center
        assert bn.bias is None or bn.bias.requires_grad

    x = channels_last_data(10, (6, 5, 6, 3), loc=-1.0, scale=2.0)
    close(run_nhwc(bn, x), keras.ops.convert_to_numpy(layer(x, training=False)))

    # One training step: the same output (batch statistics) and the same moving statistics.
    keras_y = keras.ops.convert_to_numpy(layer(x, training=True))
    close(run_nhwc(bn.train(), x), keras_y)
    after = keras_weights(layer)
    close(bn.running_mean, after["moving_mean"])
    close(bn.running_var, after["moving_variance"])
    assert not np.allclose(after["moving_mean"], before["moving_mean"])


@needs_libs
def test_real_keras_reads_rank_and_axis_from_the_layer():
    cases = [  # (input shape without N, axis, normlab class, channels-last)
        ((4,), -1, normlab.BatchNorm1d, False),
        ((7, 4), -1, normlab.BatchNorm1d, True),
        ((4, 5, 6), 1, normlab.BatchNorm2d, False),  # Keras channels_first: no permute
        ((3, 4, 5, 4), 4, normlab.BatchNorm3d, True),  # the last axis, counted from the front
    ]
    for i, (shape, axis, cls, channels_last) in enumerate(cases):
        layer = keras.layers.BatchNormalization(axis=axis, momentum=0.7, epsilon=1e-4)
        layer.build((None, *shape))
        for step in range(2):
            layer(channels_last_data(i + step, (8, *shape)), training=True)
        bn = batchnorm_from_keras(layer)
        assert type(bn) is cls, shape
        x = channels_last_data(20 + i, (5, *shape), loc=1.0, scale=1.5)
        ours = run_nhwc(bn, x) if channels_last else bn(torch.from_numpy(x)).detach().numpy()
        close(ours, keras.ops.convert_to_numpy(layer(x, training=False)))


@needs_libs
@pytest.mark.parametrize("scale, center", FLAGS)
def test_real_keras_get_weights_positional_idiom(scale, center):
    layer = trained_keras_bn(seed=3, momentum=0.9, scale=scale, center=center)
    weights = layer.get_weights()
    assert len(weights) == 2 + scale + center
    expected = batchnorm_from_keras(layer).state_dict()
    # With center= and scale= given, get_weights() is read in its order, whatever its length.
    flagged = batchnorm_from_keras(*weights, center=center, scale=scale, momentum=0.9, epsilon=1e-3)
    for key, value in flagged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    if scale and center:  # the older idiom: four arrays are (gamma, beta, mean, variance)
        plain = batchnorm_from_keras(*weights, momentum=0.9)
        torch.testing.assert_close(plain.running_var, expected["running_var"], rtol=0, atol=0)
    else:  # 2 or 3 arrays would shift into the wrong names: refused, naming the layer way
        with pytest.raises(TypeError, match=rf"got {len(weights)} positional arrays, which cannot be told apart by "
                                            r"position.*Pass the layer itself: batchnorm_from_keras\(layer\)"):
            batchnorm_from_keras(*weights, momentum=0.9)
    with pytest.raises(TypeError, match=rf"the weights are \(.*\): {len(weights)} arrays, got {len(weights) - 1}"):
        batchnorm_from_keras(*weights[1:], center=center, scale=scale)


@needs_libs
def test_real_keras_renorm_weights_positionally_are_refused():
    layer = keras.layers.BatchNormalization(renorm=True, scale=False)
    layer.build((None, 3))
    weights = layer.get_weights()
    assert len(weights) == 6
    with pytest.raises(TypeError, match=r"got 6 positional arrays, which cannot be told apart by position"):
        batchnorm_from_keras(*weights)
    with pytest.raises(ValueError, match=r"the weights of a layer with renorm=True \(beta, moving_mean, "
                                         r"moving_variance, then moving_stddev, renorm_mean, renorm_stddev\).*"
                                         r"batchnorm_from_keras\(layer, renorm=\.\.\.\)"):
        batchnorm_from_keras(*weights, scale=False, center=True)


@needs_libs
def test_real_keras_renorm():
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 0.5}
    layer = keras.layers.BatchNormalization(
        momentum=0.9, renorm_momentum=0.9, epsilon=1e-3, renorm=True, renorm_clipping=clipping
    )
    layer.build((None, 5, 6, 3))
    for step in range(3):
        layer(channels_last_data(step, (8, 5, 6, 3), loc=0.0, scale=1.0), training=True)
    with pytest.raises(ValueError, match=r"uses batch renormalization \(renorm=True\).*Choose renorm='batchnorm'"):
        batchnorm_from_keras(layer)

    # A batch far from the statistics, per channel: r and d clipped (0), within the limits (1),
    # r clipped from below (2), so the limits are exercised both ways.
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(8, 5, 6, 3)) * [3.0, 1.2, 0.4] + [1.5, 0.2, -0.3]).astype("float32")
    expected_eval = keras.ops.convert_to_numpy(layer(x, training=False))
    as_bn = batchnorm_from_keras(layer, renorm="batchnorm")
    assert type(as_bn) is normlab.BatchNorm2d
    close(run_nhwc(as_bn, x), expected_eval)

    bn = batchnorm_from_keras(layer, renorm="batchrenorm")
    assert type(bn) is BatchRenorm2d and (bn.r_max, bn.d_max) == (2.0, 0.5)
    close(run_nhwc(bn, x), expected_eval)
    before = keras_weights(layer)
    # Keras keeps renorm_mean == moving_mean and renorm_stddev == sqrt(moving_variance + eps) here
    # (renorm_momentum == momentum, trained): the documented condition for equal training outputs.
    close(before["renorm_stddev"], np.sqrt(before["moving_variance"] + 1e-3))
    keras_y = keras.ops.convert_to_numpy(layer(x, training=True))
    close(run_nhwc(bn.train(), x), keras_y)
    after = keras_weights(layer)
    close(bn.running_mean, after["moving_mean"])
    # The documented difference: Keras averages the standard deviation, normlab the variance,
    # so normlab's running variance is larger by m (1 - m) (s_old - sqrt(var_B + eps))^2.
    x64 = x.astype(np.float64)
    s_batch = np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-3)
    gap = 0.9 * 0.1 * (before["moving_stddev"] - s_batch) ** 2
    assert gap.max() > 1e-2
    close(bn.running_var.numpy() - after["moving_variance"], gap, tol=1e-4)

    unclipped = keras.layers.BatchNormalization(renorm=True)  # no renorm_clipping: r, d unbounded
    unclipped.build((None, 3))
    assert (batchnorm_from_keras(unclipped, renorm="batchrenorm").r_max,) == (float("inf"),)


@needs_libs
def test_real_keras_renorm_settings_normlab_cannot_match_raise():
    def renorm_layer(**config):
        layer = keras.layers.BatchNormalization(renorm=True, **config)
        layer.build((None, 3))
        return layer

    with pytest.raises(ValueError, match=r"renorm_momentum to equal its momentum, got renorm_momentum=0.9 and "
                                         r"momentum=0.99"):
        batchnorm_from_keras(renorm_layer(renorm_momentum=0.9), renorm="batchrenorm")
    with pytest.raises(ValueError, match=r"clips r to \[rmin=0, rmax=3.0\] \(Keras's rmin is 0 when not given\).*"
                                         r"rmin must be 1/rmax = 0.333333"):
        batchnorm_from_keras(renorm_layer(renorm_clipping={"rmax": 3.0}), renorm="batchrenorm")
    with pytest.raises(ValueError, match=r"clips r to \[rmin=0.5, inf\)"):
        batchnorm_from_keras(renorm_layer(renorm_clipping={"rmin": 0.5}), renorm="batchrenorm")
    # renorm='batchnorm' takes any of them: inference is batch norm whatever the clipping.
    assert type(batchnorm_from_keras(renorm_layer(renorm_clipping={"rmax": 3.0}), renorm="batchnorm")) \
        is normlab.BatchNorm1d


@needs_libs
def test_real_keras_layer_errors():
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2, center=False)
    with pytest.raises(ValueError, match=r"is not built, so it has no weights yet; call it on an input"):
        batchnorm_from_keras(layer)
    layer.build((None, 4, 4, 3))
    same = batchnorm_from_keras(layer, momentum=0.9, epsilon=1e-2, center=False, scale=True, dim=2)
    assert (same.momentum, same.eps) == pytest.approx((0.1, 1e-2))
    with pytest.raises(ValueError, match=r"momentum=0.99 contradicts the Keras layer '.*', whose momentum "
                                         r"is 0.9; omit momentum="):
        batchnorm_from_keras(layer, momentum=0.99)
    with pytest.raises(ValueError, match=r"epsilon=0.001 contradicts the Keras layer .*, whose epsilon is 0.01"):
        batchnorm_from_keras(layer, epsilon=1e-3)
    with pytest.raises(ValueError, match=r"center=True contradicts the Keras layer .*, whose center is False"):
        batchnorm_from_keras(layer, center=True)
    with pytest.raises(ValueError, match=r"dim=1 contradicts the Keras layer .*, built for 4-D input \(dim 2\)"):
        batchnorm_from_keras(layer, dim=1)
    with pytest.raises(TypeError, match=r"pass either a Keras layer or arrays, not both"):
        batchnorm_from_keras(layer, moving_mean=np.zeros(3))
    over_height = keras.layers.BatchNormalization(axis=2)
    over_height.build((None, 4, 5, 3))
    with pytest.raises(ValueError, match=r"normalizes over axis=2 of its 4-D input, which is neither the channel "
                                         r"axis 1 nor the last axis"):
        batchnorm_from_keras(over_height)
    norm = keras.layers.LayerNormalization()
    norm.build((None, 3))
    with pytest.raises(TypeError, match=r"expected a keras.layers.BatchNormalization, got .*LayerNormalization"):
        batchnorm_from_keras(norm)
    with pytest.raises(TypeError, match=r"batchnorm_from_flax: got a Keras layer; use batchnorm_from_keras"):
        batchnorm_from_flax(layer)


# --- real Flax (CPU JAX) --------------------------------------------------------------------------


def trained_linen_bn(use_scale: bool, use_bias: bool, **config):
    """A flax.linen.BatchNorm, its variables after three training steps, and random scale/bias."""
    module = linen.BatchNorm(use_scale=use_scale, use_bias=use_bias, **config)
    variables = module.init(jax.random.key(0), jnp.asarray(channels_last_data(0)), use_running_average=False)
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.uniform(0.5, 2, 3).astype("float32")) for k in variables.get("params", {})}
    stats = variables["batch_stats"]
    for step in range(3):
        _, updates = module.apply({"params": params, "batch_stats": stats}, jnp.asarray(channels_last_data(step)),
                                  use_running_average=False, mutable=["batch_stats"])
        stats = updates["batch_stats"]
    return module, ({"params": params, "batch_stats": stats} if params else {"batch_stats": stats})


@needs_libs
@pytest.mark.parametrize("use_scale, use_bias", FLAGS)
def test_real_flax_linen_channels_last_inference_and_training_step(use_scale, use_bias):
    module, variables = trained_linen_bn(use_scale, use_bias, momentum=0.8, epsilon=1e-2)
    assert np.abs(np.asarray(variables["batch_stats"]["mean"])).min() > 0.1
    assert ("scale" in variables.get("params", {}), "bias" in variables.get("params", {})) == (use_scale, use_bias)
    bn = batchnorm_from_flax(module, variables)
    assert type(bn) is normlab.BatchNorm2d and not bn.unbiased
    assert (bn.momentum, bn.eps) == pytest.approx((0.2, 1e-2))
    assert bn.affine == (use_scale or use_bias)

    x = channels_last_data(10, loc=-1.0, scale=2.0)
    expected = module.apply(variables, jnp.asarray(x), use_running_average=True)
    close(run_nhwc(bn, x), expected)
    flax_y, updates = module.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    close(run_nhwc(bn.train(), x), flax_y)
    close(bn.running_mean, updates["batch_stats"]["mean"])
    close(bn.running_var, updates["batch_stats"]["var"])
    # The older idiom, Flax's variables spread by name, gives the same layer (momentum, epsilon given).
    spread = batchnorm_from_flax(**variables.get("params", {}), **variables["batch_stats"], momentum=0.8,
                                 epsilon=1e-2)
    assert spread.affine == bn.affine
    torch.testing.assert_close(spread.running_var, torch.from_numpy(np.array(variables["batch_stats"]["var"])))


@needs_libs
@pytest.mark.parametrize("use_scale, use_bias", FLAGS)
def test_real_flax_nnx_channels_last_inference_and_training_step(use_scale, use_bias):
    module = nnx.BatchNorm(3, momentum=0.8, epsilon=1e-2, use_scale=use_scale, use_bias=use_bias, rngs=nnx.Rngs(0))
    assert (module.scale is None, module.bias is None) == (not use_scale, not use_bias)
    rng = np.random.default_rng(2)
    for param in (module.scale, module.bias):
        if param is not None:
            param[...] = jnp.asarray(rng.uniform(0.5, 2, 3).astype("float32"))
    module.train()
    for step in range(3):
        module(jnp.asarray(channels_last_data(step)))
    bn = batchnorm_from_flax(module)
    assert type(bn) is normlab.BatchNorm2d and (bn.momentum, bn.eps) == pytest.approx((0.2, 1e-2))

    x = channels_last_data(11, loc=-1.0, scale=2.0)
    module.eval()
    close(run_nhwc(bn, x), module(jnp.asarray(x)))
    module.train()
    flax_y = module(jnp.asarray(x))
    close(run_nhwc(bn.train(), x), flax_y)
    close(bn.running_mean, module.mean[...])
    close(bn.running_var, module.var[...])


@needs_libs
def test_real_flax_errors():
    module, variables = trained_linen_bn(True, True, momentum=0.9)
    with pytest.raises(TypeError, match=r"a flax.linen.BatchNorm holds no values; pass its variables too"):
        batchnorm_from_flax(module)
    bound = batchnorm_from_flax(module.bind(variables))  # a bound module carries its variables
    torch.testing.assert_close(bound.running_mean, batchnorm_from_flax(module, variables=variables).running_mean)
    model_variables = {"params": {"bn": variables["params"]}, "batch_stats": {"bn": variables["batch_stats"]}}
    with pytest.raises(ValueError, match=r"variables\['batch_stats'\] must hold 'mean' and 'var', got \['bn'\]; "
                                         r"pass this BatchNorm's own variables"):
        batchnorm_from_flax(module, model_variables)
    no_scale, _ = trained_linen_bn(False, True)
    with pytest.raises(ValueError, match=r"has use_scale=False but its variables have 'scale'; are these this "
                                         r"module's variables\?"):
        batchnorm_from_flax(no_scale, variables)
    with pytest.raises(ValueError, match=r"momentum=0.99 contradicts the flax.linen.BatchNorm, whose momentum is 0.9"):
        batchnorm_from_flax(module, variables, momentum=0.99)
    with pytest.raises(ValueError, match=r"use_bias=False contradicts the flax.linen.BatchNorm, whose use_bias is "
                                         r"True"):
        batchnorm_from_flax(module, variables, use_bias=False)
    with pytest.raises(ValueError, match=r"normalizes over axis=\[1, 2\]: several feature axes"):
        batchnorm_from_flax(linen.BatchNorm(axis=(1, 2)), variables)
    with pytest.raises(ValueError, match=r"normalizes over axis=2, and its input rank is not recorded.*axis must "
                                         r"be -1 or 1"):
        batchnorm_from_flax(linen.BatchNorm(axis=2), variables)
    with pytest.raises(TypeError, match=r"expected a flax.linen.BatchNorm or flax.nnx.BatchNorm, got "
                                        r"flax.linen.linear.Dense"):
        batchnorm_from_flax(linen.Dense(3), variables)
    nnx_module = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"a flax.nnx.BatchNorm holds its own values; pass it alone"):
        batchnorm_from_flax(nnx_module, variables)
    with pytest.raises(TypeError, match=r"batchnorm_from_keras: got a Flax module .*; use batchnorm_from_flax"):
        batchnorm_from_keras(nnx_module)
    channels_first = batchnorm_from_flax(nnx.BatchNorm(3, axis=1, rngs=nnx.Rngs(0)), dim=3)
    assert type(channels_first) is normlab.BatchNorm3d
