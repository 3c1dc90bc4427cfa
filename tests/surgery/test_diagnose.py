"""Diagnostics: check_stats, batch_vs_running_gap, train_eval_gap and the removable probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.layers.frozen import FrozenBatchNorm2d
from normlab.surgery import (
    ActivationPercentiles,
    GradNorms,
    batch_vs_running_gap,
    check_stats,
    stats_problems,
    train_eval_gap,
)

from .helpers import assert_untouched, randomize_norms, snapshot


def classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3), normlab.BatchNorm1d(3),
    ))


def batches(n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g) * 2 + 1, torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# check_stats
# --------------------------------------------------------------------------------------------


def test_check_stats_finds_each_kind_of_problem():
    model = randomize_norms(nn.Sequential(nn.BatchNorm1d(4), normlab.BatchNorm2d(4), FrozenBatchNorm2d(4),
                                          nn.InstanceNorm2d(4, track_running_stats=True), nn.BatchNorm1d(4)))
    with torch.no_grad():
        model[0].running_mean[1] = float("nan")
        model[0].running_var[2] = float("inf")
        model[1].running_var[[0, 3]] = 0.0
        model[2].running_var[1] = -0.5
    # model[3]: a fresh InstanceNorm with running statistics (randomize_norms skips it): never updated
    before = snapshot(model)
    problems = check_stats(model)
    assert_untouched(model, before)
    found = {(p.layer, p.kind) for p in problems}
    assert found == {("0", "nan"), ("0", "inf"), ("1", "zero_variance"), ("2", "negative_variance"),
                     ("3", "never_updated")}
    zero = next(p for p in problems if p.kind == "zero_variance")
    assert str(zero).startswith("1: zero_variance: running_var is 0 in 2 of 4 channels (0, 3)")
    nan = next(p for p in problems if p.kind == "nan")
    assert nan.detail == "running_mean is NaN in 1 of 4 channels (1)"


def test_never_updated_needs_both_initial_values_and_zero_count():
    fresh = nn.BatchNorm1d(3)
    assert [p.kind for p in check_stats(nn.Sequential(fresh))] == ["never_updated"]
    fresh.num_batches_tracked.fill_(1)  # counted: the statistics may legitimately be 0 / 1
    assert check_stats(nn.Sequential(fresh)) == []
    assert stats_problems("x", torch.zeros(3), torch.ones(3), None)[0].kind == "never_updated"
    assert stats_problems("x", None, None) == []


# --------------------------------------------------------------------------------------------
# batch_vs_running_gap
# --------------------------------------------------------------------------------------------


def test_gap_against_numpy_statistics_in_eval_mode():
    model = classifier().train()
    before = snapshot(model)
    data = batches()
    gaps = batch_vs_running_gap(model, data)
    assert_untouched(model, before)
    assert [g.layer for g in gaps] == ["1", "5"]
    # The first norm's input does not depend on any norm: the Linear's outputs over all batches.
    with torch.no_grad():
        h = torch.cat([model[0](x) for x, _ in data]).double().numpy()
    rm, rv = model[1].running_mean.double().numpy(), model[1].running_var.double().numpy()
    shift = np.abs(h.mean(0) - rm) / np.sqrt(rv + 1e-5)
    ratio = h.var(0, ddof=1) / rv
    gap = gaps[0]
    assert gap.values == 48
    np.testing.assert_allclose([gap.max_shift, gap.mean_shift, gap.min_var_ratio, gap.max_var_ratio],
                               [shift.max(), shift.mean(), ratio.min(), ratio.max()], rtol=1e-5)
    assert "mean shift" in str(gap)


def test_gap_is_zero_after_recalibration_on_the_same_data():
    """In eval mode the first norm's input is the same as in recalibration: its gap vanishes."""
    model = classifier().eval()
    data = batches()
    fresh = normlab.surgery.recalibrate_bn(model, data)
    gap = batch_vs_running_gap(fresh, data)[0]
    assert gap.max_shift < 1e-5 and abs(gap.max_var_ratio - 1) < 1e-5 and abs(gap.min_var_ratio - 1) < 1e-5


def test_gap_errors():
    with pytest.raises(ValueError, match=r"batch_vs_running_gap: the model has no batch norm with running statistics"):
        batch_vs_running_gap(nn.Sequential(nn.LayerNorm(3)), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"batch_vs_running_gap: the loader yielded only 3 batch\(es\), but num_batches=5"):
        batch_vs_running_gap(classifier(), batches(), num_batches=5)


# --------------------------------------------------------------------------------------------
# train_eval_gap
# --------------------------------------------------------------------------------------------


def manual_metrics(model: nn.Module, data, norms_train: bool):
    """The oracle: each batch through a fresh copy with the chosen modes, cross-entropy by hand."""
    import copy

    total, correct, n = 0.0, 0, 0
    for x, y in data:
        m = copy.deepcopy(model).eval()
        if norms_train:
            m[1].train(), m[5].train()
        with torch.no_grad():
            out = m(x).double()
        logp = out - torch.logsumexp(out, 1, keepdim=True)
        total += float(-logp[torch.arange(len(y)), y].sum())
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return total / n, correct / n


def test_train_eval_gap_matches_manual_evaluation_and_leaves_model_untouched():
    model = classifier().train()
    before = snapshot(model)
    data = batches()
    gap = train_eval_gap(model, data)
    assert_untouched(model, before)
    train_loss, train_acc = manual_metrics(model, data, norms_train=True)
    eval_loss, eval_acc = manual_metrics(model, data, norms_train=False)
    assert gap.samples == 48
    np.testing.assert_allclose([gap.train_loss, gap.eval_loss], [train_loss, eval_loss], rtol=1e-5)
    assert (gap.train_accuracy, gap.eval_accuracy) == (train_acc, eval_acc)
    assert gap.loss_gap == pytest.approx(eval_loss - train_loss, rel=1e-5)
    assert "(train mode) vs" in str(gap)


def test_train_eval_gap_regression_loss_has_no_accuracy():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    data = [(torch.randn(8, 2), torch.randn(8, 1)) for _ in range(2)]
    gap = train_eval_gap(model, data, loss_fn=F.mse_loss)
    assert gap.train_accuracy is None and gap.eval_accuracy is None and gap.samples == 16


def test_train_eval_gap_errors():
    with pytest.raises(TypeError, match=r"each batch must be \(x, y, \.\.\.\) with targets y, got Tensor"):
        train_eval_gap(classifier(), [torch.randn(4, 6)])
    with pytest.raises(ValueError, match=r"train_eval_gap: the loader gave no batches"):
        train_eval_gap(classifier(), [])


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def test_activation_percentiles_match_numpy_and_remove_cleanly():
    model = classifier().eval()
    before = snapshot(model)
    x = torch.randn(64, 6)
    probe = ActivationPercentiles(model, q=(0.1, 0.5, 0.9))
    with torch.no_grad():
        model(x)
        model(x[:32])
    probe.remove()
    assert_untouched(model, before)
    table = probe.table()
    assert set(table) == {"1", "5"} and table["1"].shape == (2, 3)
    with torch.no_grad():
        out = model[1](model[0](x)).double().numpy()
    np.testing.assert_allclose(table["1"][0].numpy(), np.quantile(out.ravel(), [0.1, 0.5, 0.9]), rtol=1e-5)
    model(x)  # removed: nothing more is recorded
    assert probe.table()["1"].shape == (2, 3)


def test_activation_percentiles_one_unit_eval_only():
    model = classifier()
    with ActivationPercentiles(model, ["2"], q=(0.5,), unit=3, training=False) as probe:
        model.train()(torch.randn(16, 6))  # training step: not recorded
        x = torch.randn(40, 6)
        with torch.no_grad():
            out = model.eval()(x)
    assert len(probe.values["2"]) == 1
    with torch.no_grad():
        relu = model[2](model[1](model[0](x)))[:, 3].double().numpy()
    assert float(probe.values["2"][0][0]) == pytest.approx(np.median(relu), rel=1e-6)
    assert out.shape == (40, 3)


def test_grad_norms_of_parameters_and_outputs():
    model = classifier().train()
    x, y = batches(1)[0]
    probe = GradNorms(model)
    outputs = GradNorms(model, of="outputs")
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    probe.remove(), outputs.remove()
    assert len(probe.history) == 2 and len(outputs.history) == 2
    last = probe.latest()
    for name in ("0", "1", "4", "5"):
        m = model.get_submodule(name)
        expected = torch.sqrt(sum(p.grad.double().square().sum() for p in m.parameters()))
        assert last[name] == pytest.approx(float(expected), rel=1e-6)
    assert set(outputs.latest()) == {"1", "5"} and all(v > 0 for v in outputs.latest().values())
    assert all(not m._backward_hooks and not m._forward_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())


def test_probe_errors():
    with pytest.raises(ValueError, match=r"ActivationPercentiles: q must be quantiles in \[0, 1\], got \(50,\)"):
        ActivationPercentiles(classifier(), q=(50,))
    with pytest.raises(ValueError, match=r"GradNorms: of must be 'parameters' or 'outputs', got 'inputs'"):
        GradNorms(classifier(), of="inputs")
    with pytest.raises(ValueError, match=r"ActivationPercentiles: no layer of the model matches the default"):
        ActivationPercentiles(nn.Sequential(nn.Linear(2, 2)))


def test_activation_percentiles_pooled_over_calls_equal_the_whole_set():
    """pool=True: one row of percentiles over every call's values (a test set seen in chunks)."""
    from normlab.surgery import ActivationPercentiles

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4)).eval()
    data = torch.randn(300, 3)
    with ActivationPercentiles(net, torch.nn.Linear, q=(0.15, 0.85), unit=2, pool=True) as probe:
        for chunk in data.split(70):
            net(chunk)
    expected = torch.quantile(net(data)[:, 2].double().detach(), torch.tensor([0.15, 0.85], dtype=torch.float64))
    torch.testing.assert_close(probe.table()["0"][0], expected)
