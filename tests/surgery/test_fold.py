"""fold_batchnorm and fold_weights: outputs kept within 1e-5 relative, every unfolded norm explained."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.layers.frozen import FrozenBatchNorm2d
from normlab.surgery import fold_batchnorm, fold_weights, freeze_bn, is_batchnorm

from .helpers import assert_relative_close, assert_untouched, randomize_norms, snapshot


def assert_every_norm_explained(model: nn.Module, report) -> None:
    names = {name or "<model>" for name, m in model.named_modules() if is_batchnorm(m)}
    folded = {p.norm for p in report.folded}
    skipped = {s.norm for s in report.skipped}
    assert folded | skipped == names and not folded & skipped, (names, folded, skipped)
    assert all(s.reason for s in report.skipped)


def check_fold(model: nn.Module, x: torch.Tensor, expect_folded: int, method: str = "fx", example_inputs=None):
    model = randomize_norms(model).eval()
    before = snapshot(model)
    folded, report = fold_batchnorm(model, example_inputs)
    assert_untouched(model, before)
    assert report.method == method, report
    assert len(report.folded) == expect_folded, report
    assert_every_norm_explained(model, report)
    with torch.no_grad():
        assert_relative_close(folded(x), model(x), 1e-5)
    remaining = [m for m in folded.modules() if is_batchnorm(m)]
    assert len(remaining) == len(report.skipped)
    assert type(folded) is type(model)
    return folded, report


# --------------------------------------------------------------------------------------------
# The weight math against a NumPy oracle written per output channel
# --------------------------------------------------------------------------------------------


def numpy_fold(w, b, mean, var, eps, gamma, beta, transpose=False, groups=1):
    w, out = np.array(w, np.float64), len(mean)
    s = gamma / np.sqrt(var + eps)
    new_w = w.copy()
    per_group_in = w.shape[0] // groups
    per_group_out = out // groups
    for o in range(out):
        if transpose:  # (in, out/groups, *k): channel o = g * per_group_out + j
            g, j = divmod(o, per_group_out)
            new_w[g * per_group_in:(g + 1) * per_group_in, j] *= s[o]
        else:
            new_w[o] *= s[o]
    return new_w, (b - mean) * s + beta


@pytest.mark.parametrize(
    "weight_shape, transpose, groups",
    [((6, 5), False, 1), ((6, 2, 3, 3), False, 3), ((6, 1, 3), False, 6), ((4, 3, 3, 3), True, 2),
     ((6, 1, 2, 2, 2), True, 6), ((3, 6, 3), True, 1)],
    ids=["linear", "grouped-conv2d", "depthwise-conv1d", "transpose-groups2", "transpose3d-depthwise", "transpose1d"],
)
def test_fold_weights_matches_numpy_oracle(weight_shape, transpose, groups):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(weight_shape, generator=g, dtype=torch.float64)
    out = weight_shape[1] * groups if transpose else weight_shape[0]
    b, mean, beta = (torch.randn(out, generator=g, dtype=torch.float64) for _ in range(3))
    var, gamma = (torch.rand(out, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    new_w, new_b = fold_weights(w, b, mean, var, 1e-3, gamma, beta, transpose=transpose, groups=groups)
    exp_w, exp_b = numpy_fold(w.numpy(), b.numpy(), mean.numpy(), var.numpy(), 1e-3, gamma.numpy(), beta.numpy(),
                              transpose, groups)
    np.testing.assert_allclose(new_w.numpy(), exp_w, rtol=1e-13)
    np.testing.assert_allclose(new_b.numpy(), exp_b, rtol=1e-13)
    assert not torch.equal(new_w, w)  # the inputs are untouched: the results are new tensors


def test_fold_weights_without_bias_gamma_beta_and_dtype():
    w = torch.randn(4, 3, dtype=torch.float16)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    new_w, new_b = fold_weights(w, None, mean, var, 1e-5)
    assert new_w.dtype == torch.float16 and new_b.dtype == torch.float16
    s = 1 / torch.sqrt(var.double() + 1e-5)
    torch.testing.assert_close(new_b.double(), (-mean.double() * s).to(torch.float16).double())


def test_fold_weights_errors():
    with pytest.raises(ValueError, match=r"running_mean must have one value per output channel, shape \(4,\).*got \(5,\)"):
        fold_weights(torch.randn(4, 3), None, torch.zeros(5), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match=r"needs in divisible by groups, got weight \(5, 2, 3\) and groups=2"):
        fold_weights(torch.randn(5, 2, 3), None, torch.zeros(4), torch.ones(4), 1e-5, transpose=True, groups=2)


# --------------------------------------------------------------------------------------------
# Models: MLP, CNNs with depthwise / grouped / transposed convs, residual network
# --------------------------------------------------------------------------------------------


def test_mlp_with_bn_after_every_linear():
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate([(10, 32), (32, 32), (32, 16)]):
        bn = [nn.BatchNorm1d, normlab.BatchNorm1d, nn.BatchNorm1d][i](b)
        layers += [nn.Linear(a, b, bias=i != 1), bn, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 3))
    folded, _ = check_fold(model, torch.randn(64, 10), expect_folded=3)
    assert folded[3].bias is not None and folded[3].bias.requires_grad  # created where it was missing
    assert [type(m).__name__ for m in folded][:3] == ["Linear", "Identity", "ReLU"]


def test_cnn_with_depthwise_grouped_and_transposed_convs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12), normlab.BatchNorm2d(12), nn.ReLU(),  # depthwise
        nn.Conv2d(12, 24, 1, groups=4), FrozenBatchNorm2d(24), nn.ReLU(),  # grouped
        nn.ConvTranspose2d(24, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", stride=2), nn.BatchNorm2d(8),
    )
    check_fold(model, torch.randn(4, 3, 9, 9), expect_folded=5)


def test_conv1d_conv3d_and_transposed_1d_3d():
    torch.manual_seed(0)
    model1 = nn.Sequential(nn.Conv1d(3, 6, 3, groups=3), nn.BatchNorm1d(6), nn.ConvTranspose1d(6, 4, 2, groups=2),
                           nn.BatchNorm1d(4))
    check_fold(model1, torch.randn(3, 3, 10), expect_folded=2)
    model3 = nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), nn.ConvTranspose3d(4, 4, 2, groups=4),
                           normlab.BatchNorm3d(4))
    check_fold(model3, torch.randn(2, 2, 4, 4, 4), expect_folded=2)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = normlab.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.head = nn.Linear(16, 10)
        self.post = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn(self.stem(x)))))
        return self.post(self.head(x.mean((2, 3))))


def test_small_residual_network_by_fx_keeps_its_class():
    torch.manual_seed(0)
    folded, report = check_fold(SmallResNet(), torch.randn(2, 3, 8, 8), expect_folded=7)
    assert isinstance(folded, SmallResNet) and isinstance(folded.layer1.bn1, nn.Identity)
    assert ("layer2.shortcut.0", "layer2.shortcut.1") in {(p.layer, p.norm) for p in report.folded}


# --------------------------------------------------------------------------------------------
# Skipped norms and their reasons
# --------------------------------------------------------------------------------------------


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin1(x)) + self.bn(self.lin2(x))


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class OwnBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize(
    "make, x, reason",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 4, 4),
         r"^its input is not a Conv/ConvTranspose/Linear output but '1' \(ReLU\)$"),
        (SharedOutput, (2, 3, 4, 4),
         r"^the output of 'conv' is also used by add \(call_function\), which would see the folded values$"),
        (CalledTwice, (5, 4), r"^it is called at 2 places in the forward"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), (2, 3, 4, 4),
         r"^it has no running statistics \(track_running_stats=False\)"),
        (lambda: nn.Sequential(ScaledConv(3, 4, 1), nn.BatchNorm2d(4)), (2, 3, 4, 4),
         r"^the ScaledConv before it overrides Conv2d.forward"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), OwnBatchNorm(4)), (2, 3, 4, 4),
         r"^OwnBatchNorm overrides batch norm's forward, and its eval output differs from batch norm's formula"),
        (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)), (2, 3, 4, 4),
         r"^its input is not a Conv/ConvTranspose/Linear output but the placeholder 'input'"),
    ],
    ids=["after-relu", "output-shared", "norm-called-twice", "no-running-stats", "conv-subclass", "bn-subclass",
         "first-layer"],
)
def test_skipped_norms_are_explained(make, x, reason):
    torch.manual_seed(0)
    model = randomize_norms(make()).eval()
    before = snapshot(model)
    folded, report = fold_batchnorm(model)
    assert_untouched(model, before)
    assert report.folded == [] and len(report.skipped) == 1, report
    assert_every_norm_explained(model, report)
    assert re.search(reason, report.skipped[0].reason), report.skipped[0].reason
    inp = torch.randn(x)
    with torch.no_grad():
        torch.testing.assert_close(folded(inp), model(inp))


class LoggingBatchNorm(nn.BatchNorm2d):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_batch_norm_subclasses_with_their_own_forward_fold_when_eval_is_batch_norm():
    """Checked on a random input with a copy: normlab's renorm, ghost and sync batch norms are
    batch norm in eval; a norm fused with an activation folds and leaves its activation."""
    import importlib

    layers = [LoggingBatchNorm(4)]
    for module, name, kw in (("renorm", "BatchRenorm2d", {}), ("ghost", "GhostBatchNorm2d", {}),
                             ("sync", "SyncBatchNorm", {}), ("act", "BatchNormAct2d", {})):
        try:  # the layers that exist and run in eval (other modules may not be there yet)
            layer = getattr(importlib.import_module(f"normlab.layers.{module}"), name)(4, **kw).eval()
            layer(torch.randn(2, 4, 3, 3))
        except Exception:
            continue
        layers.append(layer)
    for layer in layers:
        torch.manual_seed(0)
        model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), layer)).eval()
        folded, report = fold_batchnorm(model)
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            assert_relative_close(folded(x), model(x), 1e-5)
        assert_every_norm_explained(model, report)
        assert len(report.folded) == 1, (type(layer).__name__, str(report))
        if "Act" in type(layer).__name__:
            assert report.folded[0].activation == "ReLU()" and type(folded[1]) is nn.ReLU


def test_norm_with_hooks_is_skipped():
    model = randomize_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).eval()
    model[1].register_forward_hook(lambda m, i, o: None)
    _, report = fold_batchnorm(model)
    assert report.skipped[0].reason.startswith("it has forward hooks")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1),
                                      FrozenBatchNorm2d(6))
        self.extra = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = self.extra(x)
        return x


def test_untraceable_model_falls_back_to_sequential_structure():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    folded, report = check_fold(Untraceable(), x, expect_folded=2, method="structural", example_inputs=x)
    assert report.trace_error.startswith("TraceError")
    (skip,) = report.skipped
    assert skip.norm == "extra" and "not inside one (make the model traceable to fold it)" in skip.reason
    assert "torch.fx could not trace the model" in str(report)


def test_example_inputs_check_linear_rank_and_measure_the_difference():
    torch.manual_seed(0)
    # (N, 4, 4) -> Linear -> (N, 4, 4): BatchNorm1d(4) normalizes dimension 1, not the Linear's features.
    model = randomize_norms(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(8, 4, 4)
    _, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == []
    assert report.skipped[0].reason == "the Linear '0' before it outputs a 3-D tensor, whose dimension 1 is not its features"
    assert report.max_abs_diff == 0.0
    _, report = fold_batchnorm(model, example_inputs=torch.randn(8, 4))
    assert len(report.folded) == 1 and 0 < report.max_abs_diff < 1e-5


def test_frozen_norms_fold_in_a_training_model():
    torch.manual_seed(0)
    model = freeze_bn(randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))).train()
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == 1
    x = torch.randn(2, 3, 5, 5)
    assert_relative_close(folded(x), model(x))


def test_error_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), normlab.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"fold_batchnorm: batch norm\(s\) '1', '3' are in training mode.*"
                                         r"call model.eval\(\) first"):
        fold_batchnorm(model)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got list"):
        fold_batchnorm([model])


def test_report_is_logged(caplog):
    model = randomize_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).eval()
    with caplog.at_level("INFO", logger="normlab.surgery"):
        fold_batchnorm(model)
    assert "folded 1 batch norm(s), skipped 0 (method: fx)" in caplog.text
