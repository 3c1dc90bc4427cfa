"""Hold the float64 NumPy oracle ``normlab.reference`` against independent oracles.

* forward passes against ``torch.nn.functional`` / ``torch.nn`` in float64;
* backward passes against central finite differences of ``sum(dy * y)`` and
  against torch autograd in float64;
* running-statistics updates against torch and against the algebra written
  out with ``np.var(ddof=0/1)``;
* edge cases: constant channels, large shifts, the documented ValueErrors,
  and purity (arguments are never modified).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import reference as ref

FWD_TOL = dict(rtol=1e-12, atol=1e-12)
AUTOGRAD_TOL = dict(rtol=1e-10, atol=1e-10)
FD_TOL = dict(rtol=1e-6, atol=1e-6)
FD_STEP = 1e-6


def rng_for(*key) -> np.random.Generator:
    """A generator seeded deterministically from the test's parameters."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def t64(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.tensor(a, dtype=torch.float64)


def affine_params(rng, shape, affine: bool):
    if not affine:
        return None, None
    return rng.uniform(0.5, 1.5, size=shape), rng.normal(size=shape)


def channel_axes(ndim: int) -> tuple[int, ...]:
    return (0,) + tuple(range(2, ndim))


# ---------------------------------------------------------------------------
# Batch norm: forward and running statistics
# ---------------------------------------------------------------------------

BN_SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batch_norm_training_matches_torch(shape, affine, momentum):
    rng = rng_for("bn-train", shape, affine, momentum)
    C = shape[1]
    x = rng.normal(2.0, 3.0, size=shape)
    w, b = affine_params(rng, C, affine)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)

    y, new_rm, new_rv, count = ref.batch_norm(
        x, rm, rv, w, b, training=True, momentum=momentum, num_batches_tracked=4
    )

    trm, trv = t64(rm), t64(rv)
    ty = F.batch_norm(t64(x), trm, trv, t64(w), t64(b), training=True, momentum=momentum)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
    np.testing.assert_allclose(new_rm, trm.numpy(), **FWD_TOL)
    np.testing.assert_allclose(new_rv, trv.numpy(), **FWD_TOL)
    assert count == 5


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_matches_torch(shape, affine):
    rng = rng_for("bn-eval", shape, affine)
    C = shape[1]
    x = rng.normal(size=shape)
    w, b = affine_params(rng, C, affine)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)

    y, new_rm, new_rv, count = ref.batch_norm(x, rm, rv, w, b, training=False, num_batches_tracked=7)

    ty = F.batch_norm(t64(x), t64(rm), t64(rv), t64(w), t64(b), training=False)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
    np.testing.assert_array_equal(new_rm, rm)
    np.testing.assert_array_equal(new_rv, rv)
    assert count == 7


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_without_running_stats_uses_batch_stats(shape, training):
    """As a module with track_running_stats=False, in train and eval mode."""
    rng = rng_for("bn-norunning", shape, training)
    C = shape[1]
    x = rng.normal(size=shape)
    w, b = affine_params(rng, C, True)
    module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[len(shape)](C, track_running_stats=False, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(t64(w))
        module.bias.copy_(t64(b))
    module.train(training)

    y, new_rm, new_rv, count = ref.batch_norm(x, None, None, w, b, training=training)

    with torch.no_grad():
        ty = module(t64(x))
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
    assert new_rm is None and new_rv is None and count == 0


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_batch_norm_module_three_batches(shape, momentum):
    """Three successive training batches through torch's BatchNorm module,
    then one eval batch; momentum=None is the cumulative average."""
    rng = rng_for("bn-module", shape, momentum)
    C = shape[1]
    module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[len(shape)](C, momentum=momentum, dtype=torch.float64)
    w, b = affine_params(rng, C, True)
    with torch.no_grad():
        module.weight.copy_(t64(w))
        module.bias.copy_(t64(b))

    rm, rv, count = np.zeros(C), np.ones(C), 0
    module.train()
    for step in range(3):
        x = rng.normal(loc=step, scale=1.0 + step, size=shape)
        y, rm, rv, count = ref.batch_norm(
            x, rm, rv, w, b, training=True, momentum=momentum, num_batches_tracked=count
        )
        with torch.no_grad():
            ty = module(t64(x))
        np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
        np.testing.assert_allclose(rm, module.running_mean.numpy(), **FWD_TOL)
        np.testing.assert_allclose(rv, module.running_var.numpy(), **FWD_TOL)
        assert count == int(module.num_batches_tracked) == step + 1

    module.eval()
    x = rng.normal(size=shape)
    y, _, _, _ = ref.batch_norm(x, rm, rv, w, b, training=False)
    with torch.no_grad():
        ty = module(t64(x))
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)


def test_cumulative_average_is_plain_mean_of_batch_statistics():
    """momentum=None: after k batches the running mean is the plain average
    of the k batch means (from the initial value 0, the first factor is 1)."""
    rng = rng_for("cumulative")
    rm, rv, count = np.zeros(3), np.ones(3), 0
    batch_means, batch_unbiased_vars = [], []
    for _ in range(4):
        x = rng.normal(size=(5, 3, 2))
        batch_means.append(x.mean(axis=(0, 2)))
        batch_unbiased_vars.append(x.var(axis=(0, 2), ddof=1))
        _, rm, rv, count = ref.batch_norm(
            x, rm, rv, training=True, momentum=None, num_batches_tracked=count
        )
    np.testing.assert_allclose(rm, np.mean(batch_means, axis=0), **FWD_TOL)
    np.testing.assert_allclose(rv, np.mean(batch_unbiased_vars, axis=0), **FWD_TOL)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 2, 3)])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_variance_biased_and_unbiased_algebra(shape, momentum):
    rng = rng_for("biased", shape, momentum)
    C = shape[1]
    x = rng.normal(size=shape)
    axes = channel_axes(x.ndim)
    n = x.size // C
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)

    _, rm_b, rv_b, _ = ref.batch_norm(x, rm, rv, training=True, momentum=momentum, unbiased=False)
    _, rm_u, rv_u, _ = ref.batch_norm(x, rm, rv, training=True, momentum=momentum, unbiased=True)

    biased_var = np.var(x, axis=axes, ddof=0)
    unbiased_var = np.var(x, axis=axes, ddof=1)
    np.testing.assert_allclose(rm_b, (1 - momentum) * rm + momentum * x.mean(axis=axes), **FWD_TOL)
    np.testing.assert_allclose(rm_u, rm_b, **FWD_TOL)
    np.testing.assert_allclose(rv_b, (1 - momentum) * rv + momentum * biased_var, **FWD_TOL)
    np.testing.assert_allclose(rv_u, (1 - momentum) * rv + momentum * unbiased_var, **FWD_TOL)
    # The two differ by exactly the Bessel correction n / (n - 1).
    np.testing.assert_allclose(
        rv_u - rv_b, momentum * biased_var * (n / (n - 1) - 1), rtol=1e-9, atol=1e-14
    )


def test_update_running_stats_direct():
    rm, rv = np.array([1.0, -2.0]), np.array([4.0, 0.5])
    bm, bv = np.array([3.0, 0.0]), np.array([2.0, 8.0])
    m, n = 0.25, 5
    new_rm, new_rv = ref.update_running_stats(rm, rv, bm, bv, n, momentum=m, unbiased=True)
    np.testing.assert_allclose(new_rm, 0.75 * rm + 0.25 * bm, **FWD_TOL)
    np.testing.assert_allclose(new_rv, 0.75 * rv + 0.25 * bv * 5 / 4, **FWD_TOL)
    new_rm, new_rv = ref.update_running_stats(rm, rv, bm, bv, n, momentum=None,
                                              num_batches_tracked=3, unbiased=False)
    np.testing.assert_allclose(new_rm, 0.75 * rm + 0.25 * bm, **FWD_TOL)
    np.testing.assert_allclose(new_rv, 0.75 * rv + 0.25 * bv, **FWD_TOL)


# ---------------------------------------------------------------------------
# Layer, group, instance and RMS norm: forward
# ---------------------------------------------------------------------------

LN_CASES = [
    ((5, 6), 6),
    ((5, 6), (6,)),
    ((2, 3, 4), (4,)),
    ((2, 3, 4), (3, 4)),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((2, 2, 3, 2, 3), (2, 3)),
]


def _tuple_shape(ns):
    return (ns,) if isinstance(ns, int) else tuple(ns)


@pytest.mark.parametrize("shape, normalized_shape", LN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, normalized_shape, affine):
    rng = rng_for("ln", shape, normalized_shape, affine)
    x = rng.normal(1.0, 2.0, size=shape)
    w, b = affine_params(rng, _tuple_shape(normalized_shape), affine)
    y = ref.layer_norm(x, normalized_shape, w, b, eps=1e-5)
    ty = F.layer_norm(t64(x), _tuple_shape(normalized_shape), t64(w), t64(b), eps=1e-5)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)


GN_CASES = [((4, 6), 3), ((2, 6, 5), 1), ((2, 6, 5), 2), ((2, 6, 3, 4), 3),
            ((2, 6, 3, 4), 6), ((2, 6, 2, 3, 2), 2)]


@pytest.mark.parametrize("shape, num_groups", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(shape, num_groups, affine):
    rng = rng_for("gn", shape, num_groups, affine)
    x = rng.normal(-1.0, 2.0, size=shape)
    w, b = affine_params(rng, shape[1], affine)
    y = ref.group_norm(x, num_groups, w, b, eps=1e-5)
    ty = F.group_norm(t64(x), num_groups, t64(w), t64(b), eps=1e-5)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)


IN_SHAPES = [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_running", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_instance_norm_input_stats_matches_torch(shape, affine, with_running, momentum):
    rng = rng_for("in", shape, affine, with_running, momentum)
    C = shape[1]
    x = rng.normal(0.5, 1.5, size=shape)
    w, b = affine_params(rng, C, affine)
    rm, rv = (rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)) if with_running else (None, None)

    y, new_rm, new_rv = ref.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=momentum)

    trm, trv = t64(rm), t64(rv)
    ty = F.instance_norm(t64(x), trm, trv, t64(w), t64(b), use_input_stats=True, momentum=momentum)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
    if with_running:
        np.testing.assert_allclose(new_rm, trm.numpy(), **FWD_TOL)
        np.testing.assert_allclose(new_rv, trv.numpy(), **FWD_TOL)
    else:
        assert new_rm is None and new_rv is None


@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_running_stats_matches_torch(shape, affine):
    rng = rng_for("in-eval", shape, affine)
    C = shape[1]
    x = rng.normal(size=shape)
    w, b = affine_params(rng, C, affine)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)

    y, new_rm, new_rv = ref.instance_norm(x, rm, rv, w, b, use_input_stats=False)

    ty = F.instance_norm(t64(x), t64(rm), t64(rv), t64(w), t64(b), use_input_stats=False)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)
    np.testing.assert_array_equal(new_rm, rm)
    np.testing.assert_array_equal(new_rv, rv)


@pytest.mark.parametrize("shape", IN_SHAPES)
def test_instance_norm_is_group_norm_with_one_channel_per_group(shape):
    rng = rng_for("in-gn", shape)
    x = rng.normal(size=shape)
    w, b = affine_params(rng, shape[1], True)
    y, _, _ = ref.instance_norm(x, weight=w, bias=b)
    np.testing.assert_allclose(y, ref.group_norm(x, shape[1], w, b), **FWD_TOL)


RMS_CASES = [((5, 6), 6), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 4)), ((2, 3, 4, 5), (3, 4, 5))]


@pytest.mark.parametrize("shape, normalized_shape", RMS_CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_matches_torch(shape, normalized_shape, affine, eps):
    rng = rng_for("rms", shape, normalized_shape, affine, eps)
    x = rng.normal(0.3, 1.0, size=shape)
    w, _ = affine_params(rng, _tuple_shape(normalized_shape), affine)
    y = ref.rms_norm(x, normalized_shape, w, eps=eps)
    # torch's eps=None is finfo(input.dtype).eps; the oracle's is float32's.
    torch_eps = float(np.finfo(np.float32).eps) if eps is None else eps
    ty = F.rms_norm(t64(x), _tuple_shape(normalized_shape), t64(w), eps=torch_eps)
    np.testing.assert_allclose(y, ty.numpy(), **FWD_TOL)


def test_rms_norm_default_eps_matches_torch_float32():
    """eps=None agrees with torch's own default for float32 input."""
    rng = rng_for("rms-f32")
    x = rng.normal(size=(4, 8)).astype(np.float32) * 1e-3  # eps matters at this scale
    w = rng.uniform(0.5, 1.5, size=8).astype(np.float32)
    y = ref.rms_norm(x, 8, w)
    ty = F.rms_norm(torch.from_numpy(x), (8,), torch.from_numpy(w))
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-5, atol=1e-6)
    # ... and differs from a float64-epsilon normalization at this scale.
    y_tiny_eps = ref.rms_norm(x, 8, w, eps=float(np.finfo(np.float64).eps))
    assert np.max(np.abs(y - y_tiny_eps)) > 1e-3


# ---------------------------------------------------------------------------
# Backward: finite differences and torch autograd
# ---------------------------------------------------------------------------

BWD_SHAPE = (3, 4, 2, 2)
_RM = np.array([0.3, -0.2, 0.1, 0.5])
_RV = np.array([0.8, 1.3, 0.6, 2.0])

# name -> (param shape, reference forward, reference backward, torch forward)
# every reference backward returns (dx, dweight, dbias) (dbias None for RMS norm).
BACKWARD_CASES = {
    "batch_norm_train": (
        (4,),
        lambda x, w, b: ref.batch_norm(x, weight=w, bias=b, training=True)[0],
        lambda dy, x, w: ref.batch_norm_backward(dy, x, w, training=True),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    ),
    "batch_norm_eval": (
        (4,),
        lambda x, w, b: ref.batch_norm(x, _RM, _RV, w, b, training=False)[0],
        lambda dy, x, w: ref.batch_norm_backward(
            dy, x, w, training=False, running_mean=_RM, running_var=_RV
        ),
        lambda x, w, b: F.batch_norm(x, t64(_RM), t64(_RV), w, b, training=False),
    ),
    "layer_norm": (
        (2, 2),
        lambda x, w, b: ref.layer_norm(x, (2, 2), w, b),
        lambda dy, x, w: ref.layer_norm_backward(dy, x, (2, 2), w),
        lambda x, w, b: F.layer_norm(x, (2, 2), w, b),
    ),
    "layer_norm_3axes": (
        (4, 2, 2),
        lambda x, w, b: ref.layer_norm(x, (4, 2, 2), w, b),
        lambda dy, x, w: ref.layer_norm_backward(dy, x, (4, 2, 2), w),
        lambda x, w, b: F.layer_norm(x, (4, 2, 2), w, b),
    ),
    "group_norm": (
        (4,),
        lambda x, w, b: ref.group_norm(x, 2, w, b),
        lambda dy, x, w: ref.group_norm_backward(dy, x, 2, w),
        lambda x, w, b: F.group_norm(x, 2, w, b),
    ),
    "instance_norm": (
        (4,),
        lambda x, w, b: ref.instance_norm(x, weight=w, bias=b)[0],
        lambda dy, x, w: ref.instance_norm_backward(dy, x, w),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    ),
    "rms_norm": (
        (2, 2),
        lambda x, w, b: ref.rms_norm(x, (2, 2), w, eps=1e-6),
        lambda dy, x, w: (*ref.rms_norm_backward(dy, x, (2, 2), w, eps=1e-6), None),
        lambda x, w, b: F.rms_norm(x, (2, 2), w, eps=1e-6),
    ),
}


def _backward_inputs(name):
    param_shape = BACKWARD_CASES[name][0]
    rng = rng_for("bwd", name)
    x = rng.normal(0.5, 2.0, size=BWD_SHAPE)
    dy = rng.normal(size=BWD_SHAPE)
    w = rng.uniform(0.5, 1.5, size=param_shape)
    b = rng.normal(size=param_shape)
    return x, dy, w, b


def _central_difference(f, a):
    """Gradient of the scalar f at a (float64), by central differences."""
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[i] += FD_STEP
        minus[i] -= FD_STEP
        grad[i] = (f(plus) - f(minus)) / (2 * FD_STEP)
    return grad


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_matches_finite_differences(name):
    _, forward, backward, _ = BACKWARD_CASES[name]
    x, dy, w, b = _backward_inputs(name)

    dx, dw, db = backward(dy, x, w)

    fd_dx = _central_difference(lambda xx: np.sum(dy * forward(xx, w, b)), x)
    fd_dw = _central_difference(lambda ww: np.sum(dy * forward(x, ww, b)), w)
    np.testing.assert_allclose(dx, fd_dx, **FD_TOL)
    np.testing.assert_allclose(dw, fd_dw, **FD_TOL)
    if db is not None:
        fd_db = _central_difference(lambda bb: np.sum(dy * forward(x, w, bb)), b)
        np.testing.assert_allclose(db, fd_db, **FD_TOL)


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_matches_torch_autograd(name):
    _, _, backward, torch_forward = BACKWARD_CASES[name]
    x, dy, w, b = _backward_inputs(name)

    tx, tw, tb = (t64(a).requires_grad_() for a in (x, w, b))
    ty = torch_forward(tx, tw, tb)
    (ty * t64(dy)).sum().backward()

    dx, dw, db = backward(dy, x, w)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **AUTOGRAD_TOL)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **AUTOGRAD_TOL)
    if db is not None:
        np.testing.assert_allclose(db, tb.grad.numpy(), **AUTOGRAD_TOL)


@pytest.mark.parametrize("name", ["batch_norm_train", "layer_norm", "group_norm", "instance_norm"])
def test_backward_without_weight_equals_unit_weight(name):
    _, _, backward, _ = BACKWARD_CASES[name]
    x, dy, w, _ = _backward_inputs(name)
    for got, want in zip(backward(dy, x, None), backward(dy, x, np.ones_like(w))):
        np.testing.assert_allclose(got, want, **FWD_TOL)


# ---------------------------------------------------------------------------
# Constant channels and large shifts
# ---------------------------------------------------------------------------

# name -> (function returning y from (x, beta), the slice of x made constant)
# on x of shape (3, 4, 2, 2); beta has shape (4,) except for layer norm's (2, 2).
_GAMMA_C = np.array([1.5, 0.5, 2.0, 0.7])
_GAMMA_LN = np.array([[1.5, 0.5], [2.0, 0.7]])
CONSTANT_CASES = {
    "batch_norm_train": (lambda x, bt: ref.batch_norm(x, weight=_GAMMA_C, bias=bt, training=True)[0],
                         np.s_[:, 1], (4,)),
    "batch_norm_update": (lambda x, bt: ref.batch_norm(x, np.zeros(4), np.ones(4), _GAMMA_C, bt,
                                                       training=True)[0],
                          np.s_[:, 1], (4,)),
    "layer_norm": (lambda x, bt: ref.layer_norm(x, (2, 2), _GAMMA_LN, bt), np.s_[1, 2], (2, 2)),
    "group_norm": (lambda x, bt: ref.group_norm(x, 2, _GAMMA_C, bt), np.s_[1, 2:4], (4,)),
    "instance_norm": (lambda x, bt: ref.instance_norm(x, weight=_GAMMA_C, bias=bt)[0],
                      np.s_[1, 2], (4,)),
}


@pytest.mark.parametrize("name", list(CONSTANT_CASES))
@pytest.mark.parametrize("value", [3.0, -1.25, 0.0])
def test_constant_slice_gives_beta_exactly(name, value):
    """Constants whose sums are exact in float64: y must be beta, bit for bit."""
    forward, where, beta_shape = CONSTANT_CASES[name]
    rng = rng_for("const", name, value)
    x = rng.normal(size=BWD_SHAPE)
    x[where] = value
    beta = rng.normal(size=beta_shape)
    with np.errstate(all="raise"):
        y = forward(x, beta)
    assert np.all(np.isfinite(y))
    expected = np.broadcast_to(beta.reshape(beta.shape + (1,) * (2 if beta.ndim == 1 else 0)),
                               BWD_SHAPE)
    np.testing.assert_array_equal(y[where], expected[where])


@pytest.mark.parametrize("name", list(CONSTANT_CASES))
def test_constant_slice_inexact_value_is_finite_and_close_to_beta(name):
    forward, where, beta_shape = CONSTANT_CASES[name]
    rng = rng_for("const-inexact", name)
    x = rng.normal(size=BWD_SHAPE)
    x[where] = 0.1  # 0.1 * k is not exact, so mean - x may be a few ulps
    beta = rng.normal(size=beta_shape)
    with np.errstate(all="raise"):
        y = forward(x, beta)
    expected = np.broadcast_to(beta.reshape(beta.shape + (1,) * (2 if beta.ndim == 1 else 0)),
                               BWD_SHAPE)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[where], expected[where], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_with_constant_slice_is_finite(name):
    _, _, backward, _ = BACKWARD_CASES[name]
    x, dy, w, _ = _backward_inputs(name)
    x[:, 1] = 2.0
    x[1] = 2.0
    with np.errstate(all="raise"):
        grads = [g for g in backward(dy, x, w) if g is not None]
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_rms_norm_zero_slice_gives_zero():
    x = rng_for("rms-zero").normal(size=(3, 4))
    x[1] = 0.0
    with np.errstate(all="raise"):
        y = ref.rms_norm(x, 4, np.arange(1.0, 5.0))
        dx, dw = ref.rms_norm_backward(np.ones_like(x), x, 4, np.arange(1.0, 5.0))
    np.testing.assert_array_equal(y[1], 0.0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))


# name -> (function of x giving x_hat with eps=0, axes of one normalized slice)
SHIFT_CASES = {
    "batch_norm": (lambda x: ref.batch_norm(x, training=True, eps=0.0)[0], (0, 2, 3)),
    "layer_norm": (lambda x: ref.layer_norm(x, (4, 5, 6), eps=0.0), (1, 2, 3)),
    "group_norm": (lambda x: ref.group_norm(x, 2, eps=0.0).reshape(3, 2, 2, 5, 6), (2, 3, 4)),
    "instance_norm": (lambda x: ref.instance_norm(x, eps=0.0)[0], (2, 3)),
}


@pytest.mark.parametrize("name", list(SHIFT_CASES))
def test_large_shift_is_standardized(name):
    """Mean 1e6, std 1: a one-pass E[x^2]-E[x]^2 variance would be off by ~1e-4."""
    forward, axes = SHIFT_CASES[name]
    x = 1e6 + rng_for("shift", name).normal(size=(3, 4, 5, 6))
    y = forward(x)
    np.testing.assert_allclose(np.mean(y, axis=axes), 0.0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.std(y, axis=axes), 1.0, rtol=0, atol=1e-8)


def test_large_shift_would_break_a_one_pass_variance():
    """The shift test above can tell the two-pass variance from the one-pass one."""
    x = 1e6 + rng_for("shift", "batch_norm").normal(size=(3, 4, 5, 6))
    axes = (0, 2, 3)
    one_pass = np.mean(x * x, axis=axes) - np.mean(x, axis=axes) ** 2
    two_pass = np.mean((x - np.mean(x, axis=axes, keepdims=True)) ** 2, axis=axes)
    assert np.max(np.abs(one_pass - two_pass)) > 1e-6


# ---------------------------------------------------------------------------
# Errors and purity
# ---------------------------------------------------------------------------


def test_group_norm_channels_not_divisible():
    x = np.zeros((2, 6, 4))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        ref.group_norm(x, 4)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        ref.group_norm_backward(x, x, 4)


def test_instance_norm_momentum_none():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="momentum=None"):
        ref.instance_norm(x, np.zeros(3), np.ones(3), momentum=None)


def test_instance_norm_single_spatial_element():
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        ref.instance_norm(np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match="requires running_mean"):
        ref.instance_norm(np.ones((2, 3, 4)), use_input_stats=False)


def test_unbiased_update_needs_two_values():
    with pytest.raises(ValueError, match="n >= 2"):
        ref.update_running_stats(np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), n=1)
    # biased: n = 1 is fine
    ref.update_running_stats(np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), n=1, unbiased=False)


def test_batch_norm_single_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.batch_norm(np.ones((1, 3)), np.zeros(3), np.ones(3), training=True)
    # eval with running statistics is fine (as torch)
    ref.batch_norm(np.ones((1, 3)), np.zeros(3), np.ones(3), training=False)


def test_layer_norm_shape_mismatch():
    with pytest.raises(ValueError, match="normalized_shape"):
        ref.layer_norm(np.zeros((2, 3, 4)), (3,))


def test_functions_are_pure():
    rng = rng_for("pure")
    x, dy = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    w, b = rng.normal(size=3), rng.normal(size=3)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    w5, b5 = rng.normal(size=5), rng.normal(size=5)
    args = [x, dy, w, b, rm, rv, w5, b5]
    saved = [a.copy() for a in args]

    outputs = [
        *ref.batch_norm(x, rm, rv, w, b, training=True)[:3],
        *ref.batch_norm(x, rm, rv, w, b, training=False)[:3],
        *ref.batch_norm_backward(dy, x, w),
        *ref.update_running_stats(rm, rv, rm, rv, 10),
        ref.layer_norm(x, 5, w5, b5),
        *ref.layer_norm_backward(dy, x, 5, w5),
        ref.group_norm(x, 3, w, b),
        *ref.group_norm_backward(dy, x, 3, w),
        *ref.instance_norm(x, rm, rv, w, b),
        *ref.instance_norm(x, rm, rv, w, b, use_input_stats=False),
        *ref.instance_norm_backward(dy, x, w),
        ref.rms_norm(x, 5, w5),
        *ref.rms_norm_backward(dy, x, 5, w5),
    ]
    for a, s in zip(args, saved):
        np.testing.assert_array_equal(a, s)
    for out in outputs:
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
        assert not any(np.shares_memory(out, a) for a in args)


def test_inputs_are_converted_to_float64():
    x = [[1, 2, 3], [4, 6, 8]]  # nested list of ints
    y, _, _, _ = ref.batch_norm(x, training=True)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[:, 0], [-1.0, 1.0], atol=1e-5)
