"""Masked batch norm: statistics over the valid positions of padded sequences and point sets.

The oracle is batch norm over the concatenation of the valid parts (torch.nn and the float64
reference), and the reference's own masked formulas.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from device_switch import generator, to_numpy

import normlab
from normlab import functional as NF
from normlab import reference as R


def _lengths_mask(n: int, length: int, seed: int) -> torch.Tensor:
    g = generator(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    lengths[0] = length  # at least one full row, so every layout keeps >= 2 valid positions
    return torch.arange(length) < lengths[:, None]


def _random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = generator(seed)
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[:2] = True
    return mask


# (layer class, input shape, mask maker, channels_last)
LAYOUTS = {
    "NCL-lengths": ("BatchNorm1d", (5, 4, 9), lambda: _lengths_mask(5, 9, 0), False),
    "NC-rows": ("BatchNorm1d", (12, 4), lambda: _random_mask((12,), 1), False),
    "NCL-whole-samples": ("BatchNorm1d", (5, 4, 9), lambda: torch.tensor([True, False, True, True, False])[:, None], False),
    "NCHW-points": ("BatchNorm2d", (3, 4, 5, 6), lambda: _random_mask((3, 5, 6), 2), False),
    "NCHW-channels_last": ("BatchNorm2d", (3, 4, 5, 6), lambda: _random_mask((3, 5, 6), 3), True),
    "NCDHW-broadcast-D": ("BatchNorm3d", (2, 3, 3, 4, 5), lambda: _random_mask((2, 1, 4, 5), 4), False),
}


def _valid_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The valid positions of ``t`` (N, C, *) as rows (K, C): the concatenation of the valid parts."""
    full = mask.expand((t.shape[0],) + tuple(t.shape[2:]))
    return t.movedim(1, -1)[full]


def _sample(shape, seed, channels_last=False):
    g = generator(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.7
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_masked_batch_norm_equals_batch_norm_over_the_concatenated_valid_parts(layout, momentum):
    cls_name, shape, make_mask, channels_last = LAYOUTS[layout]
    ours = getattr(normlab, cls_name)(shape[1], momentum=momentum)
    torch_bn = torch.nn.BatchNorm1d(shape[1], momentum=momentum)
    with torch.no_grad():
        for layer in (ours, torch_bn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    mask = make_mask()
    for step in range(2):  # two steps: the running statistics and the count move together
        x = _sample(shape, seed=10 + step, channels_last=channels_last).requires_grad_()
        y = ours(x, mask)
        rows = _valid_rows(x.detach(), mask).clone().requires_grad_()
        y_rows = torch_bn(rows)
        torch.testing.assert_close(_valid_rows(y, mask), y_rows, rtol=1e-5, atol=1e-5)
        padded = ~mask.expand((shape[0],) + shape[2:])
        assert torch.count_nonzero(y.movedim(1, -1)[padded]) == 0  # padding comes out as 0

        dy = _sample(shape, seed=20 + step)
        ours.zero_grad()
        torch_bn.zero_grad()
        (y * dy).sum().backward()
        (y_rows * _valid_rows(dy, mask)).sum().backward()
        torch.testing.assert_close(_valid_rows(x.grad, mask), rows.grad, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(x.grad.movedim(1, -1)[padded]) == 0  # no gradient into padding
        torch.testing.assert_close(ours.weight.grad, torch_bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, torch_bn.bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(ours.num_batches_tracked) == int(torch_bn.num_batches_tracked) == step + 1


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["NCL-lengths", "NCDHW-broadcast-D"])
def test_masked_batch_norm_matches_the_float64_reference(layout, training, unbiased):
    _, shape, make_mask, _ = LAYOUTS[layout]
    mask = make_mask()
    x = _sample(shape, seed=5).double().requires_grad_()
    c = shape[1]
    rm, rv = torch.linspace(-0.5, 0.5, c, dtype=torch.float64), torch.linspace(0.5, 1.5, c, dtype=torch.float64)
    w = torch.linspace(0.5, 2.0, c, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).requires_grad_()
    out = NF.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3,
                        num_batches_tracked=torch.tensor(2), unbiased=unbiased, mask=mask)
    y_ref, rm_ref, rv_ref, count_ref = R.masked_batch_norm(
        to_numpy(x), mask.cpu().numpy(), to_numpy(rm), to_numpy(rv), to_numpy(w), to_numpy(b), training=training, momentum=0.3,
        eps=1e-3, num_batches_tracked=2, unbiased=unbiased,
    )
    np.testing.assert_allclose(to_numpy(out.output), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(out.running_mean), rm_ref, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(out.running_var), rv_ref, rtol=1e-12)
    assert int(out.num_batches_tracked) == count_ref
    dy = _sample(shape, seed=6).double()
    (out.output * dy).sum().backward()
    dx, dw, db = R.masked_batch_norm_backward(
        to_numpy(dy), to_numpy(x), mask.cpu().numpy(), to_numpy(w), eps=1e-3, training=training,
        running_mean=to_numpy(rm), running_var=to_numpy(rv),
    )
    np.testing.assert_allclose(to_numpy(x.grad), dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(w.grad), dw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(b.grad), db, rtol=1e-9, atol=1e-12)


def test_reference_masked_batch_norm_is_batch_norm_of_the_valid_rows():
    # The two reference definitions agree: the masked formulas, and batch norm of the valid rows.
    x = to_numpy(_sample((4, 3, 6), seed=7))
    mask = _lengths_mask(4, 6, seed=8).cpu().numpy()
    y, rm, rv, _ = R.masked_batch_norm(x, mask, np.zeros(3), np.ones(3), training=True)
    rows = np.moveaxis(x, 1, -1)[mask]
    y_rows, rm_rows, rv_rows, _ = R.batch_norm(rows, np.zeros(3), np.ones(3), training=True)
    np.testing.assert_allclose(np.moveaxis(y, 1, -1)[mask], y_rows, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, rm_rows, rtol=1e-12)
    np.testing.assert_allclose(rv, rv_rows, rtol=1e-12)


def test_masked_batch_norm_gradcheck():
    x = _sample((3, 2, 4), seed=9).double().requires_grad_()
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, False, False]])
    assert torch.autograd.gradcheck(
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True, mask=mask).output, (x, w, b)
    )


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_padding_values_never_reach_outputs_gradients_or_statistics(garbage):
    shape, mask = (4, 3, 8), _lengths_mask(4, 8, seed=11)
    x_clean = _sample(shape, seed=12) * mask[:, None]
    x_dirty = x_clean.masked_fill(~mask[:, None], garbage)
    results = []
    for x in (x_clean, x_dirty):
        bn = normlab.BatchNorm1d(3)
        x = x.clone().requires_grad_()
        y = bn(x, mask)
        y.square().sum().backward()
        results.append((y, x.grad, bn.weight.grad, bn.running_mean, bn.running_var))
        bn.eval()
        x_eval = x.detach().clone().requires_grad_()
        y_eval = bn(x_eval, mask)
        y_eval.square().sum().backward()
        results[-1] += (y_eval, x_eval.grad, bn.weight.grad)
    for clean, dirty in zip(*results):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_eval_mode_uses_the_running_statistics_and_leaves_them():
    bn = normlab.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    bn.eval()
    x, mask = _sample((4, 3, 6), seed=13), _lengths_mask(4, 6, seed=14)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(x, mask)
    y_ref = R.masked_batch_norm(to_numpy(x), mask.cpu().numpy(), to_numpy(bn.running_mean), to_numpy(bn.running_var),
                                to_numpy(bn.weight), to_numpy(bn.bias), training=False)[0]
    np.testing.assert_allclose(to_numpy(y), y_ref, atol=1e-6)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_running_statistics_eval_uses_masked_batch_statistics():
    bn = normlab.BatchNorm1d(3, track_running_stats=False).eval()
    x, mask = _sample((4, 3, 6), seed=15), _lengths_mask(4, 6, seed=16)
    y_ref = R.masked_batch_norm(to_numpy(x), mask.cpu().numpy(), weight=to_numpy(bn.weight), bias=to_numpy(bn.bias), training=False)[0]
    np.testing.assert_allclose(to_numpy(bn(x, mask)), y_ref, atol=1e-5)


def test_an_all_true_mask_gives_the_unmasked_result():
    x = _sample((6, 4, 5), seed=17)
    masked, plain = normlab.BatchNorm1d(4), normlab.BatchNorm1d(4)
    y_masked = masked(x, torch.ones(6, 5, dtype=torch.bool))
    torch.testing.assert_close(y_masked, plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.running_var, plain.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_input_gets_float32_statistics(dtype):
    x, mask = (_sample((8, 3, 16), seed=18) + 100).to(dtype), _lengths_mask(8, 16, seed=19)
    bn = normlab.BatchNorm1d(3).to(dtype)
    y = bn(x, mask)
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32
    y_ref, rm_ref, rv_ref, _ = R.masked_batch_norm(to_numpy(x), mask.cpu().numpy(), np.zeros(3), np.ones(3),
                                                   training=True)
    np.testing.assert_allclose(to_numpy(y), y_ref, atol=0.05)  # 16-bit output rounding only
    np.testing.assert_allclose(to_numpy(bn.running_mean), rm_ref, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(bn.running_var), rv_ref, rtol=1e-4)


def test_large_offsets_keep_float32_accuracy():
    # Two-pass statistics and subtract-first output: an offset of 1e4 next to unit spread.
    x, mask = _sample((16, 2, 32), seed=20) + 1e4, _lengths_mask(16, 32, seed=21)
    y = NF.batch_norm(x, training=True, mask=mask).output
    y_ref = R.masked_batch_norm(to_numpy(x), mask.cpu().numpy(), training=True)[0]
    np.testing.assert_allclose(to_numpy(y), y_ref, atol=2e-3)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_a_non_bool_mask_is_refused_with_the_fix():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor.*got a torch.int64 tensor.*mask.bool\(\)"):
        NF.batch_norm(x, training=True, mask=torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"BatchNorm1d\(3\): mask must be a bool tensor.*got a list"):
        normlab.BatchNorm1d(3)(x, [[True] * 5] * 4)


@pytest.mark.parametrize("bad", [(5,), (4,), (4, 5, 1), (4, 3, 5), (2, 5)])
def test_a_mask_of_the_wrong_shape_is_refused_with_the_expected_one(bad):
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"mask must have the input's shape without the channel dimension, "
                                         r"\(4, 5\).*got " + re.escape(str(bad))):
        normlab.BatchNorm1d(3)(x, torch.ones(bad, dtype=torch.bool))


@pytest.mark.parametrize("valid", [0, 1])
def test_fewer_than_two_valid_positions_in_training_is_an_error(valid):
    x = torch.randn(3, 2, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask.view(-1)[:valid] = True
    # One rule, one message: the functional's names the function, the layer's names the layer.
    with pytest.raises(ValueError, match=rf"batch_norm: training needs more than one value per channel.*"
                                         rf"with {valid} valid position\(s\) per channel under its mask"):
        NF.batch_norm(x, torch.zeros(2), torch.ones(2), training=True, mask=mask)
    with pytest.raises(ValueError, match=rf"BatchNorm1d\(2\): training needs more than one value per channel.*"
                                         rf"{valid} valid position"):
        normlab.BatchNorm1d(2)(x, mask)
    NF.batch_norm(x, torch.zeros(2), torch.ones(2), training=False, mask=mask)  # eval needs none


def test_single_sample_running_normalizes_a_one_position_mask_with_running_statistics():
    bn = normlab.BatchNorm1d(2, single_sample="running")
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    x = torch.full((2, 2, 3), 3.0)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    y = bn(x, mask)
    expected = torch.zeros(2, 2, 3)
    expected[0, :, 0] = (3.0 - 1.0) / (4.0 + bn.eps) ** 0.5
    torch.testing.assert_close(y, expected)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.ones(2))


def test_an_empty_batch_with_a_mask_changes_nothing():
    bn = normlab.BatchNorm1d(3)
    y = bn(torch.randn(0, 3, 4), torch.ones(0, 4, dtype=torch.bool))
    assert y.shape == (0, 3, 4) and int(bn.num_batches_tracked) == 0



def test_vmap_over_batches_with_one_shared_mask():
    from torch.func import vmap

    xs, mask = _sample((3, 4, 2, 6), seed=22), _lengths_mask(4, 6, seed=23)

    def step(x, rm, rv):
        r = NF.batch_norm(x, rm, rv, training=True, momentum=0.2, mask=mask)
        return r.output, r.running_mean, r.running_var

    outs, rms, rvs = vmap(step)(xs, torch.zeros(3, 2), torch.ones(3, 2))
    for i in range(3):
        y, rm, rv, _ = R.masked_batch_norm(to_numpy(xs[i]), mask.cpu().numpy(), np.zeros(2), np.ones(2), training=True,
                                           momentum=0.2)
        np.testing.assert_allclose(to_numpy(outs[i]), y, atol=2e-6)
        np.testing.assert_allclose(to_numpy(rms[i]), rm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(rvs[i]), rv, rtol=1e-5)
