"""RecurrentBatchNorm (statistics per time step), BNLSTM and LNLSTM.

Oracles: the float64 reference :func:`normlab.reference.batch_norm` step by step (per-step
statistics and their reuse beyond ``max_steps``, masked statistics), a hand-written LSTM loop
over each step's valid sub-batch with ``torch.nn.functional.batch_norm`` (BN-LSTM), each
sequence run alone (LN-LSTM), and ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from device_switch import generator, to_numpy
from torch import nn

from normlab import reference as R
from normlab.layers.recurrent import BNLSTM, LNLSTM, RecurrentBatchNorm


def step_input(n: int, c: int, t: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Data whose distribution changes with the time step (mean t, spread 1 + t/2)."""
    g = generator(1000 * seed + t)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * (1 + t / 2) + t).to(dtype)


# --------------------------------------------------------------------------------------------
# RecurrentBatchNorm
# --------------------------------------------------------------------------------------------


def test_statistics_are_per_step_and_the_last_row_serves_beyond_max_steps():
    bn = RecurrentBatchNorm(3, max_steps=3, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0])), bn.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    rows = [[np.zeros(3), np.ones(3), 0] for _ in range(3)]  # reference running stats per row
    for epoch in range(2):
        for t in range(5):  # steps 2, 3 and 4 all update row 2
            x = step_input(6, 3, t, seed=epoch)
            row = rows[min(t, 2)]
            y_ref, row[0], row[1], row[2] = R.batch_norm(
                to_numpy(x), row[0], row[1], to_numpy(bn.weight), to_numpy(bn.bias), training=True, momentum=0.3,
                num_batches_tracked=row[2])
            np.testing.assert_allclose(to_numpy(bn(x, t)), y_ref, atol=1e-12)
    for r, (mean, var, count) in enumerate(rows):
        np.testing.assert_allclose(to_numpy(bn.running_mean[r]), mean, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(bn.running_var[r]), var, rtol=1e-12)
        assert int(bn.num_batches_tracked[r]) == count == (2 if r < 2 else 6)
    # The steps' distributions differ, and so do the rows.
    assert bn.running_mean[0].max() < bn.running_mean[1].min() < bn.running_mean[1].max() < bn.running_mean[2].min()

    bn.eval()
    x = step_input(4, 3, 9, seed=5)
    for step in (2, 3, 9, 100):
        expected = R.batch_norm(to_numpy(x), rows[2][0], rows[2][1], to_numpy(bn.weight), to_numpy(bn.bias))[0]
        np.testing.assert_allclose(to_numpy(bn(x, step)), expected, atol=1e-12)
    expected_row0 = R.batch_norm(to_numpy(x), rows[0][0], rows[0][1], to_numpy(bn.weight), to_numpy(bn.bias))[0]
    np.testing.assert_allclose(to_numpy(bn(x, 0)), expected_row0, atol=1e-12)


def test_masked_statistics_use_the_valid_rows_only():
    bn = RecurrentBatchNorm(4, max_steps=2, dtype=torch.float64)
    x = step_input(7, 4, 1)
    mask = torch.tensor([True, False, True, True, False, True, True])
    x_padded = x.clone()
    x_padded[~mask] = 1e6  # padding values must not matter
    y = bn(x_padded, 1, mask)
    y_ref, rm, rv, _ = R.batch_norm(to_numpy(x[mask]), np.zeros(4), np.ones(4), np.ones(4), np.zeros(4), training=True)
    np.testing.assert_allclose(to_numpy(y[mask]), y_ref, atol=1e-12)
    assert torch.equal(y[~mask], torch.zeros(2, 4, dtype=torch.float64))  # padded rows: zero
    np.testing.assert_allclose(to_numpy(bn.running_mean[1]), rm, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(bn.running_var[1]), rv, rtol=1e-12)
    assert torch.equal(bn.running_mean[0], torch.zeros(4, dtype=torch.float64))  # other rows untouched

    # Gradients: padded rows get none; valid ones are batch norm's over the valid rows.
    xx = x.clone().requires_grad_(True)
    dy = step_input(7, 4, 3)
    bn(xx, 1, mask).backward(dy)
    dx_ref = R.batch_norm_backward(to_numpy(dy[mask]), to_numpy(x[mask]), np.ones(4))[0]
    np.testing.assert_allclose(to_numpy(xx.grad[mask]), dx_ref, atol=1e-12)
    assert torch.equal(xx.grad[~mask], torch.zeros(2, 4, dtype=torch.float64))


def test_masked_recurrent_batch_norm_gradcheck():
    bn = RecurrentBatchNorm(2, max_steps=2, dtype=torch.float64)
    x = step_input(5, 2, 0).requires_grad_(True)
    w = torch.tensor([0.7, -1.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True])

    def f(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x, 1, mask))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_single_valid_row_raises_or_uses_the_running_statistics():
    x = step_input(3, 2, 0)
    mask = torch.tensor([False, True, False])
    with pytest.raises(ValueError, match=r"RecurrentBatchNorm\(2\) at step 4: training needs more than one value "
                                         r"per channel.*got input of shape \(1, 2\).*single_sample='running'"):
        RecurrentBatchNorm(2, max_steps=3, dtype=torch.float64)(x, 4, mask)
    bn = RecurrentBatchNorm(2, max_steps=3, single_sample="running", dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean[2].fill_(0.5), bn.running_var[2].fill_(4.0)
    before = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, 4, mask)
    expected = R.batch_norm(to_numpy(x[1:2]), np.full(2, 0.5), np.full(2, 4.0), np.ones(2), np.zeros(2))[0]
    np.testing.assert_allclose(to_numpy(y[1:2]), expected, atol=1e-12)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_state_dict_has_torch_names_with_a_row_per_step():
    bn = RecurrentBatchNorm(5, max_steps=4)
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["running_mean"].shape == (4, 5) and state["num_batches_tracked"].shape == (4,)
    bn(torch.randn(6, 5), 2)
    twin = RecurrentBatchNorm(5, max_steps=4)
    twin.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(3, 5)
    assert torch.equal(twin.eval()(x, 2), bn.eval()(x, 2))
    assert list(RecurrentBatchNorm(5, 4, bias=False).state_dict())[:2] == ["weight", "running_mean"]
    half = RecurrentBatchNorm(5, 4).half()
    assert half.running_mean.dtype == torch.float32 and half.weight.dtype == torch.float16


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda bn: bn(torch.randn(4, 3), -1), ValueError, r"step must be >= 0 \(the time index, from 0\), got -1"),
        (lambda bn: bn(torch.randn(4, 3), 1.5), TypeError, r"step must be an int .*got float 1.5"),
        (lambda bn: bn(torch.randn(4, 3, 2), 0), ValueError,
         r"RecurrentBatchNorm\(3\): expected input \(N, 3\) for one time step, got shape \(4, 3, 2\)"),
        (lambda bn: bn(torch.randn(4, 3), 0, torch.ones(4)), TypeError,
         r"mask must be a bool tensor of shape \(4,\), True for the valid rows, got torch.float32 tensor of shape \(4,\)"),
    ],
    ids=["negative-step", "float-step", "rank", "mask-dtype"],
)
def test_recurrent_batch_norm_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(RecurrentBatchNorm(3, max_steps=2))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"RecurrentBatchNorm: max_steps must be a positive int, got 0"):
        RecurrentBatchNorm(3, max_steps=0)
    with pytest.raises(ValueError, match=r"single_sample must be one of \['error', 'running'\], got 'x'"):
        RecurrentBatchNorm(3, 2, single_sample="x")
    with pytest.raises(ValueError, match=r"BNLSTM: hidden_size must be a positive int, got 0"):
        BNLSTM(3, 0, max_steps=2)


# --------------------------------------------------------------------------------------------
# BNLSTM and LNLSTM
# --------------------------------------------------------------------------------------------


def sequences(n: int, steps: int, features: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = generator(seed)
    return torch.randn(n, steps, features, generator=g, dtype=torch.float64).to(dtype)


def make(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "bn":
        return BNLSTM(3, 4, max_steps=kw.pop("max_steps", 4), dtype=torch.float64, **kw)
    return LNLSTM(3, 4, dtype=torch.float64, **kw)


@pytest.mark.parametrize("kind", ["bn", "ln"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_output_shapes(kind, batch_first):
    lstm = make(kind, num_layers=2, batch_first=batch_first)
    x = sequences(5, 6, 3)
    out, (h, c) = lstm(x if batch_first else x.transpose(0, 1), lengths=[6, 6, 4, 2, 5])
    assert out.shape == ((5, 6, 4) if batch_first else (6, 5, 4))
    assert h.shape == c.shape == (2, 5, 4)
    out_bf = out if batch_first else out.transpose(0, 1)
    assert torch.equal(out_bf[3, 2:], torch.zeros(4, 4, dtype=torch.float64))  # padded steps
    assert torch.equal(h[1, 3], out_bf[3, 1])  # h_T is the last valid output


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_padding_does_not_change_the_valid_outputs(kind):
    lengths = torch.tensor([5, 3, 2, 5])
    short, long_ = make(kind), make(kind)
    x = sequences(4, 5, 3)
    x_long = torch.cat([x, sequences(4, 3, 3, seed=9) * 100], 1)  # three more padded steps
    x_long[1, 3:5] = 1e3  # and garbage inside the padding of the shorter ones
    out_s, (h_s, c_s) = short(x, lengths=lengths)
    out_l, (h_l, c_l) = long_(x_long, lengths=lengths)
    torch.testing.assert_close(out_l[:, :5], out_s, rtol=0, atol=1e-12)
    assert torch.equal(out_l[:, 5:], torch.zeros(4, 3, 4, dtype=torch.float64))
    torch.testing.assert_close(h_l, h_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_l, c_s, rtol=0, atol=1e-12)
    for (name, a), b in zip(short.state_dict().items(), long_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_nan_in_the_padding_reaches_no_output_or_gradient(kind):
    lstm = make(kind)
    x = sequences(4, 5, 3)
    lengths = [5, 3, 2, 5]
    out_clean, _ = lstm(x, lengths=lengths)
    lstm.zero_grad()
    dirty = x.clone()
    dirty[1, 3:] = float("nan")
    dirty[2, 2:] = float("inf")
    out, (h, c) = lstm(dirty.requires_grad_(True), lengths=lengths)
    torch.testing.assert_close(out, out_clean, rtol=0, atol=1e-12)
    (out.sum() + c.sum()).backward()
    for name, p in lstm.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_ln_lstm_equals_each_sequence_run_alone():
    lstm = make("ln", num_layers=2)
    x = sequences(4, 6, 3)
    lengths = [6, 2, 4, 5]
    out, (h, c) = lstm(x, lengths=lengths)
    for i, length in enumerate(lengths):
        out_i, (h_i, c_i) = lstm(x[i:i + 1, :length])
        torch.testing.assert_close(out[i:i + 1, :length], out_i, rtol=0, atol=1e-12)
        torch.testing.assert_close(h[:, i:i + 1], h_i, rtol=0, atol=1e-12)
        torch.testing.assert_close(c[:, i:i + 1], c_i, rtol=0, atol=1e-12)


def manual_bn_lstm(lstm: BNLSTM, x: torch.Tensor, lengths: torch.Tensor, training: bool):
    """The BN-LSTM equations over each step's valid sub-batch, with torch's F.batch_norm and
    copies of the per-step running statistics; returns outputs, final state, statistics."""
    layer = lstm.layers[0]
    hidden, steps, max_steps = lstm.hidden_size, x.shape[1], lstm.max_steps
    norms = {"ih": layer.norm_ih, "hh": layer.norm_hh, "c": layer.norm_c}
    stats = {k: (m.running_mean.clone(), m.running_var.clone()) for k, m in norms.items()}
    h = x.new_zeros(x.shape[0], hidden)
    c = x.new_zeros(x.shape[0], hidden)
    out = x.new_zeros(x.shape[0], steps, hidden)
    for t in range(steps):
        rows = (lengths > t).nonzero().squeeze(1)
        r = min(t, max_steps - 1)

        def bn(key, a):
            mean, var = stats[key][0][r].clone(), stats[key][1][r].clone()
            use_batch = training and len(rows) > 1  # one valid row: the running statistics
            y = F.batch_norm(a, mean, var, norms[key].weight, norms[key].bias, use_batch, 0.1, 1e-5)
            stats[key][0][r], stats[key][1][r] = mean, var
            return y

        gates = bn("hh", h[rows] @ layer.weight_hh.t()) + bn("ih", x[rows, t] @ layer.weight_ih.t()) + layer.bias
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c[rows] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn("c", c_new))
        h, c = h.index_copy(0, rows, h_new), c.index_copy(0, rows, c_new)
        out[rows, t] = h_new
    return out, h, c, stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_lstm_equals_a_manual_loop_over_the_valid_sub_batch(training):
    lstm = make("bn", max_steps=3)
    x = sequences(5, 6, 3, seed=1)
    lengths = torch.tensor([6, 4, 6, 1, 3])  # step 4 and 5: two valid rows; step 1+: one gone
    lstm(sequences(5, 6, 3, seed=2))  # move the running statistics away from 0 and 1
    with torch.no_grad():
        for norm in (lstm.layers[0].norm_ih, lstm.layers[0].norm_c):
            norm.weight.uniform_(0.5, 1.5)
        lstm.layers[0].norm_c.bias.normal_()
    lstm.train(training)
    expected = manual_bn_lstm(lstm, x, lengths, training)
    out, (h, c) = lstm(x, lengths=lengths)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(h[0], expected[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(c[0], expected[2], rtol=0, atol=1e-10)
    layer = lstm.layers[0]
    for key, norm in (("ih", layer.norm_ih), ("hh", layer.norm_hh), ("c", layer.norm_c)):
        torch.testing.assert_close(norm.running_mean, expected[3][key][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.running_var, expected[3][key][1], rtol=0, atol=1e-12)


def test_bn_lstm_with_one_running_sequence_uses_the_running_statistics():
    lstm = make("bn", max_steps=3)
    x = sequences(3, 4, 3)
    lengths = torch.tensor([4, 1, 2])  # steps 2 and 3: one running sequence
    expected = manual_bn_lstm(lstm, x, lengths, training=True)
    out, _ = lstm(x, lengths=lengths)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-10)
    strict = BNLSTM(3, 4, max_steps=3, single_sample="error", dtype=torch.float64)
    with pytest.raises(ValueError, match="at step 2: training needs more than one value per channel"):
        strict(x, lengths=lengths)


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_gradcheck_tiny(kind):
    lstm = make(kind, max_steps=2) if kind == "bn" else make(kind)
    x = sequences(3, 3, 3, seed=4).requires_grad_(True)
    names = ["layers.0.weight_hh", "layers.0.norm_c.weight", "layers.0.norm_c.bias"]
    params = [dict(lstm.named_parameters())[k].detach().clone().requires_grad_(True) for k in names]

    def f(x, *values):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, values)), (x,), {"lengths": [3, 2, 3]})
        return out, c

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_training_reduces_the_loss_on_a_toy_task(kind):
    """Tell whether a +-1 sequence sums to more than 0 (seeded; a second or two)."""
    torch.manual_seed(0)
    steps, batch = 8, 32
    model = (BNLSTM(1, 16, max_steps=steps) if kind == "bn" else LNLSTM(1, 16))
    head = nn.Linear(16, 1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=0.02)
    g = generator(1)
    losses = []
    for _ in range(60):
        x = torch.randint(0, 2, (batch, steps, 1), generator=g).float() * 2 - 1
        lengths = torch.randint(steps - 2, steps + 1, (batch,), generator=g)
        mask = torch.arange(steps) < lengths[:, None]
        target = ((x.squeeze(2) * mask).sum(1) > 0).float()
        _, (h, _) = model(x, lengths=lengths)
        loss = F.binary_cross_entropy_with_logits(head(h[-1]).squeeze(1), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randn(2, 5, 4)), r"expected input \(N, T, F\) with F = input_size = 3, got shape \(2, 5, 4\)"),
        (lambda m: m(torch.randn(2, 5, 3), lengths=[5, 6]), r"lengths must lie in \[0, 5\].*got min 5, max 6"),
        (lambda m: m(torch.randn(2, 5, 3), lengths=[5.0, 2.0]), r"lengths must be 2 integers"),
        (lambda m: m(torch.randn(2, 5, 3), mask=torch.ones(5, 2, dtype=torch.bool)),
         r"mask must be a bool tensor of shape \(2, 5\) \(the input's first two dimensions\), True at valid steps, "
         r"got torch.bool tensor of shape \(5, 2\)"),
        (lambda m: m(torch.randn(2, 5, 3), lengths=[5, 5], mask=torch.ones(2, 5, dtype=torch.bool)),
         r"give lengths or mask, not both"),
        (lambda m: m(torch.randn(2, 5, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),
         r"hx must be \(h_0, c_0\), each of shape \(num_layers, N, hidden_size\) = \(1, 2, 4\), got \[\(2, 4\), \(2, 4\)\]"),
    ],
    ids=["features", "lengths-range", "lengths-float", "mask-shape", "both", "hx"],
)
@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_lstm_errors(kind, call, match):
    model = BNLSTM(3, 4, max_steps=2) if kind == "bn" else LNLSTM(3, 4)
    with pytest.raises(ValueError, match=match):
        call(model)


def test_bn_lstm_initialization_follows_the_paper():
    lstm = BNLSTM(3, 4, max_steps=2)
    layer = lstm.layers[0]
    for norm in (layer.norm_ih, layer.norm_hh, layer.norm_c):
        assert torch.equal(norm.weight, torch.full_like(norm.weight, 0.1))
    assert layer.norm_ih.bias is None and layer.norm_hh.bias is None
    assert torch.equal(layer.norm_c.bias, torch.zeros(4))
    for block in layer.weight_hh.detach().chunk(4, 0):  # orthogonal per gate
        torch.testing.assert_close(block @ block.t(), torch.eye(4), rtol=0, atol=1e-5)
    assert torch.equal(layer.bias[4:8], torch.ones(4)) and torch.equal(layer.bias[:4], torch.zeros(4))


def test_checkpointed_bn_lstm_takes_each_step_in_once():
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = make("bn", max_steps=3), make("bn", max_steps=3)
    x = sequences(4, 5, 3).requires_grad_(True)
    plain(x)[0].sum().backward()
    checkpoint(lambda t: ckpt(t)[0], x, use_reentrant=False).sum().backward()
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    assert ckpt.layers[0].norm_c.num_batches_tracked.tolist() == [1, 1, 3]


@pytest.mark.parametrize(
    "momentum, unbiased", [(0.1, True), (None, True), (0.3, False)],
    ids=["momentum=0.1", "cumulative", "momentum=0.3-biased"],
)
def test_steps_0_1_2_5_follow_three_independent_reference_sequences(momentum, unbiased):
    """Rows 0, 1, 2 each follow their own float64 reference sequence (values, counts, and so
    the cumulative average's per-row factor); step 5 takes row 2 in, after step 2, in order."""
    TOL32 = dict(rtol=1e-5, atol=1e-5)  # float32 layer vs float64 reference
    steps, rows_of = (0, 1, 2, 5), {0: 0, 1: 1, 2: 2, 5: 2}
    bn = RecurrentBatchNorm(4, max_steps=3, momentum=momentum, unbiased=unbiased)
    g = generator(7)
    with torch.no_grad():  # distinct starting rows, so a wrong row cannot pass by coincidence
        bn.weight.copy_(torch.rand(4, generator=g) + 0.5), bn.bias.copy_(torch.randn(4, generator=g))
        bn.running_mean.copy_(torch.randn(3, 4, generator=g))
        bn.running_var.copy_(torch.rand(3, 4, generator=g) + 0.5)
        bn.num_batches_tracked.copy_(torch.tensor([2, 5, 9]))
    rows = [[to_numpy(bn.running_mean[r]), to_numpy(bn.running_var[r]), int(bn.num_batches_tracked[r])] for r in range(3)]
    w, b = to_numpy(bn.weight), to_numpy(bn.bias)
    for rnd in range(3):
        for t in steps:
            x = step_input(6, 4, t, seed=rnd, dtype=torch.float32).requires_grad_(True)
            dy = step_input(6, 4, t + 10, seed=rnd, dtype=torch.float32)
            row = rows[rows_of[t]]
            y_ref, row[0], row[1], row[2] = R.batch_norm(
                to_numpy(x), row[0], row[1], w, b, training=True, momentum=momentum,
                num_batches_tracked=row[2], unbiased=unbiased)
            dx_ref, dw_ref, db_ref = R.batch_norm_backward(to_numpy(dy), to_numpy(x), w)
            bn.zero_grad(set_to_none=True)
            y = bn(x, t)
            y.backward(dy)
            when = f"round {rnd}, step {t}"
            np.testing.assert_allclose(to_numpy(y), y_ref, **TOL32, err_msg=when)
            np.testing.assert_allclose(to_numpy(x.grad), dx_ref, **TOL32, err_msg=when)
            np.testing.assert_allclose(to_numpy(bn.weight.grad), dw_ref, **TOL32, err_msg=when)
            np.testing.assert_allclose(to_numpy(bn.bias.grad), db_ref, **TOL32, err_msg=when)
            for r, (mean, var, count) in enumerate(rows):  # every row, so untouched ones stay put
                where = f"{when}, row {r}"
                np.testing.assert_allclose(to_numpy(bn.running_mean[r]), mean, rtol=1e-5, atol=1e-6, err_msg=where)
                np.testing.assert_allclose(to_numpy(bn.running_var[r]), var, rtol=1e-5, atol=1e-6, err_msg=where)
                assert int(bn.num_batches_tracked[r]) == count, where
    assert bn.num_batches_tracked.tolist() == [2 + 3, 5 + 3, 9 + 6]

    bn.eval()
    x = step_input(5, 4, 3, seed=9, dtype=torch.float32)
    for t in steps:
        mean, var, _ = rows[rows_of[t]]
        expected = R.batch_norm(to_numpy(x), mean, var, w, b)[0]
        np.testing.assert_allclose(to_numpy(bn(x, t)), expected, **TOL32, err_msg=f"eval, step {t}")
