"""Issue 11, items 1-4 and 7: the model tools on norm-act layers and other libraries' norms.

Each test is named after the silent failure it pins. The oracle is the input model's own eval
output (a tool that must not change what a model computes), or torch's functional formulas.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.layers.kinds import activation_spec, is_batchnorm, norm_kind
from normlab.surgery import convert_norm, convert_sync_batchnorm, fold_batchnorm, freeze_bn, unfreeze_bn

from .helpers import assert_relative_close, assert_untouched, randomize_norms, snapshot
from .thirdparty import (
    LyingBatchNorm2d,
    TimmBatchNormAct2d,
    TimmFrozenBatchNormAct2d,
    TimmGroupNormAct,
    TinyEfficientNet,
    TorchvisionFrozenBatchNorm2d,
)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial γ, β and statistics in every batch norm, the frozen plain-module ones too."""
    randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TorchvisionFrozenBatchNorm2d):
                c = m.running_mean.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def efficientnet() -> nn.Module:
    torch.manual_seed(0)
    return randomized(TinyEfficientNet()).eval()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mode = model.training
    with torch.no_grad():
        out = model.eval()(x)
    model.train(mode)
    return out


NORM_ACTS = {
    "normlab-leaky_relu": lambda: normlab.BatchNormAct2d(6, act="leaky_relu", negative_slope=0.2),
    "timm-silu": lambda: TimmBatchNormAct2d(6, act_layer=nn.SiLU),
    "timm-hardswish": lambda: TimmBatchNormAct2d(6, act_layer=nn.Hardswish),
    "timm-no-act": lambda: TimmBatchNormAct2d(6, act_layer=None),
}


def conv_norm(make) -> nn.Module:
    torch.manual_seed(0)
    return randomized(nn.Sequential(nn.Conv2d(3, 6, 3), make())).eval()


# --------------------------------------------------------------------------------------------
# Item 1: convert_norm keeps the activation of fused norm-act layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["batch", "frozen"])
@pytest.mark.parametrize("layer", list(NORM_ACTS))
def test_convert_norm_keeps_the_activation_of_norm_act_layers(layer, to):
    model = conv_norm(NORM_ACTS[layer])
    before = snapshot(model)
    new = convert_norm(model, to)
    assert_untouched(model, before)
    x = image()
    assert_relative_close(eval_output(new, x), eval_output(model, x), 1e-5)
    if to == "frozen" and layer != "timm-no-act":
        assert isinstance(new[1], normlab.FrozenBatchNormAct2d)


def test_convert_norm_on_efficientnet_keeps_its_eval_output():
    """The issue's case: efficientnet_b0 converted to batch/frozen was off by 1e8 (relative)."""
    model, x = efficientnet(), image()
    expected = eval_output(model, x)
    for to in ("batch", "frozen"):
        new = convert_norm(model, to)
        assert_relative_close(eval_output(new, x), expected, 1e-5)
        assert not any(isinstance(m, TimmBatchNormAct2d) for m in new.modules())
    # SiLU has a fused normlab layer; Hardswish is kept as a module after the batch norm.
    batch = convert_norm(model, "batch")
    assert isinstance(batch.bn1, normlab.BatchNormAct2d) and batch.bn1.act == "silu"
    hard = batch.blocks[1].bn1
    assert isinstance(hard, nn.Sequential) and isinstance(hard[0], normlab.BatchNorm2d) and type(hard[1]) is nn.Hardswish


@pytest.mark.parametrize("to", ["group", "layer"])
def test_convert_norm_to_group_or_layer_keeps_the_activation(to):
    model = conv_norm(NORM_ACTS["timm-silu"])
    new = convert_norm(model, to, **({"num_groups": 3} if to == "group" else {}))
    h = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    bn = model[1]
    groups = 3 if to == "group" else 1
    expected = F.silu(F.group_norm(h, groups, bn.weight.double(), bn.bias.double(), bn.eps))
    assert_relative_close(new[1].double()(h).detach(), expected, 1e-10)


def test_convert_norm_to_none_keeps_the_activation():
    new = convert_norm(conv_norm(NORM_ACTS["normlab-leaky_relu"]), "none")
    assert type(new[1]) is nn.LeakyReLU and new[1].negative_slope == 0.2


# --------------------------------------------------------------------------------------------
# Item 2: freeze_bn freezes every batch-norm-computing layer
# --------------------------------------------------------------------------------------------


def test_freeze_bn_freezes_norm_act_layers():
    """The issue's case: on efficientnet_b0 freeze_bn left 33 BatchNormAct2d training."""
    model, x = efficientnet(), image()
    expected = eval_output(model, x)
    frozen = freeze_bn(model).train()
    kinds = [norm_kind(m) for m in frozen.modules()]
    assert not any(k is not None and k.family == "batch" for k in kinds), "a batch norm is still trainable"
    norm_params = [p for m in frozen.modules() if is_batchnorm(m) for p in m.parameters(recurse=False)]
    assert norm_params == [], "a frozen norm still has trainable affine parameters"
    assert sum(isinstance(m, normlab.FrozenBatchNormAct2d) for m in frozen.modules()) == 6  # 2 without act
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with torch.no_grad():
        train_out = frozen(x)  # training mode: nothing may move
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    assert_relative_close(train_out, expected, 1e-5)
    assert_relative_close(eval_output(frozen, x), expected, 1e-5)


def test_unfreeze_bn_gives_back_trainable_norm_act_layers():
    model, x = efficientnet(), image()
    back = unfreeze_bn(freeze_bn(model))
    assert_relative_close(eval_output(back, x), eval_output(model, x), 1e-5)
    assert isinstance(back.bn1, normlab.BatchNormAct2d) and back.bn1.act == "silu"
    hard = back.blocks[1].bn2
    assert isinstance(hard[0], normlab.BatchNorm2d) and type(hard[1]) is nn.Hardswish
    assert all(p.requires_grad for p in back.parameters())


def test_freeze_and_unfreeze_other_libraries_frozen_batch_norms():
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 6, 3), TorchvisionFrozenBatchNorm2d(6), nn.Conv2d(6, 6, 1),
                                     TimmFrozenBatchNormAct2d(6, act_layer=nn.SiLU)))
    x = image()
    back = unfreeze_bn(model)
    assert type(back[1]) is normlab.BatchNorm2d and isinstance(back[3], normlab.BatchNormAct2d)
    assert_relative_close(eval_output(back, x), eval_output(model, x), 1e-5)


# --------------------------------------------------------------------------------------------
# Item 3: one notion of "a batch norm, with this activation"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, family, activation, source",
    [
        (lambda: nn.BatchNorm2d(4), "batch", None, "torch"),
        (lambda: nn.SyncBatchNorm(4), "batch", None, "torch"),
        (lambda: normlab.BatchRenorm2d(4), "batch", None, "normlab"),
        (lambda: normlab.BatchNormAct2d(4, act="elu", alpha=0.5), "batch", "ELU(alpha=0.5)", "normlab"),
        (lambda: normlab.FrozenBatchNorm2d(4), "frozen", None, "normlab"),
        (lambda: normlab.FrozenBatchNormAct2d(4, act=nn.GELU()), "frozen", "GELU(approximate='none')", "normlab"),
        (lambda: TimmBatchNormAct2d(4, act_layer=nn.SiLU), "batch", "SiLU()", "other"),
        (lambda: TimmBatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.1)), "batch",
         "Sequential(\n  (0): Dropout(p=0.1, inplace=False)\n  (1): ReLU()\n)", "other"),
        (lambda: TorchvisionFrozenBatchNorm2d(4), "frozen", None, "other"),
        (lambda: TimmFrozenBatchNormAct2d(4), "frozen", "ReLU()", "other"),
        (lambda: TimmGroupNormAct(4), "group", "ReLU()", "other"),
        (lambda: nn.GroupNorm(2, 4), "group", None, "torch"),
        (lambda: normlab.InstanceNorm2d(4), "instance", None, "normlab"),
    ],
)
def test_norm_kind_recognizes_torch_normlab_and_other_libraries_norms(make, family, activation, source):
    torch.manual_seed(0)
    kind = norm_kind(randomized(nn.Sequential(make()))[0])
    assert (kind.family, repr(kind.activation) if kind.activation is not None else None, kind.source) == (
        family, activation, source)
    assert kind.unknown is None and kind.channels == 4


def test_norm_kind_says_when_it_cannot_tell():
    kind = norm_kind(LyingBatchNorm2d(4))
    assert kind.family == "batch" and kind.unknown is not None
    assert "LyingBatchNorm2d overrides batch norm's forward, and its eval output differs from batch norm's formula " \
           "followed by its .drop/.act" in kind.unknown

    class StatsButNoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

    assert "keeps running statistics but derives from no torch norm" in norm_kind(StatsButNoNorm()).unknown
    assert norm_kind(nn.Conv2d(3, 4, 1)) is None and norm_kind(nn.ReLU()) is None
    with pytest.raises(TypeError, match=r"norm_kind: expected a torch.nn.Module, got str"):
        norm_kind("bn")


def test_activation_spec_maps_only_exact_activation_classes():
    assert activation_spec(nn.ELU(0.3)) == {"act": "elu", "alpha": 0.3}
    assert activation_spec(nn.Identity()) == {"act": "identity"}

    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    assert activation_spec(MyReLU()) is None and activation_spec(nn.GELU()) is None


def test_tools_refuse_or_report_a_norm_they_cannot_verify():
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), LyingBatchNorm2d(4))).eval()
    for tool in (convert_norm, freeze_bn):
        with pytest.raises(TypeError, match=r"'1' \(LyingBatchNorm2d\): LyingBatchNorm2d overrides batch norm's "
                                            r"forward.*Leave it out with match=\.\.\."):
            tool(model)
    folded, report = fold_batchnorm(model)
    assert report.folded == [] and "LyingBatchNorm2d overrides batch norm's forward" in report.skipped[0].reason
    with pytest.warns(UserWarning, match=r"left '1' \(LyingBatchNorm2d\) as they are"):
        synced = convert_sync_batchnorm(model)
    assert type(synced[1]) is LyingBatchNorm2d
    # Leaving it out with match= works.
    assert type(freeze_bn(model, match=lambda name, m: name != "1")[1]) is LyingBatchNorm2d


def test_convert_sync_batchnorm_leaves_other_libraries_norm_act_with_a_warning():
    """Its training forward is its own: normlab cannot know that pooling statistics keeps it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TimmBatchNormAct2d(4, act_layer=nn.SiLU),
                          normlab.BatchNormAct2d(4, act="silu"))
    with pytest.warns(UserWarning, match=r"left '1' \(TimmBatchNormAct2d\) as they are"):
        synced = convert_sync_batchnorm(model)
    assert type(synced[1]) is TimmBatchNormAct2d and type(synced[2]) is normlab.SyncBatchNormAct


def test_fold_batchnorm_folds_torchvision_frozen_batchnorm():
    """The issue's case: fold reported 'folded 0, skipped 0' on torchvision's FrozenBatchNorm2d."""
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 6, 3), TorchvisionFrozenBatchNorm2d(6), nn.ReLU(),
                                     nn.Conv2d(6, 6, 1), TimmFrozenBatchNormAct2d(6, act_layer=nn.SiLU)))
    x = image()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert [(p.layer, p.norm, p.activation) for p in report.folded] == [("0", "1", None), ("3", "4", "SiLU()")]
    assert type(folded[1]) is nn.Identity and type(folded[4]) is nn.SiLU
    assert_relative_close(eval_output(folded, x), eval_output(model, x), 1e-5)


def test_fold_batchnorm_folds_norm_act_layers_keeping_their_activation():
    model, x = efficientnet(), image()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert len(report.folded) == 8 and [s.norm for s in report.skipped] == ["plain"]
    assert "its activation SiLU() kept in its place" in str(report)
    assert_relative_close(eval_output(folded, x), eval_output(model, x), 1e-5)


# --------------------------------------------------------------------------------------------
# Item 4: the structural fallback folds only what it can show safe
# --------------------------------------------------------------------------------------------


class ConvOutputUsedElsewhere(nn.Module):
    """Untraceable (data-dependent branch); calls the Sequential's conv itself and uses its output
    twice, so folding the norm into the conv changes the second use."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))

    def forward(self, x):
        h = self.features[0](x)
        y = self.features[2](self.features[1](h))
        if y.sum() > 0:
            y = y + h
        return y + self.other(x)


def test_fold_structural_fallback_skips_a_conv_whose_output_is_used_elsewhere():
    torch.manual_seed(0)
    model = randomized(ConvOutputUsedElsewhere()).eval()
    x = image()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.method == "structural"
    assert [(p.layer, p.norm) for p in report.folded] == [("other.0", "other.1")]
    (skip,) = report.skipped
    assert skip.norm == "features.1" and "'features.0' or this norm is also called outside their nn.Sequential" \
        in skip.reason
    assert_relative_close(eval_output(folded, x), eval_output(model, x), 1e-5)


def test_fold_structural_fallback_without_example_inputs_folds_nothing_and_says_why():
    torch.manual_seed(0)
    model = randomized(ConvOutputUsedElsewhere()).eval()
    folded, report = fold_batchnorm(model)
    assert report.folded == [] and len(report.skipped) == 2
    assert all("pass example_inputs to fold_batchnorm to check it by running the model" in s.reason
               for s in report.skipped)
    x = image()
    assert torch.equal(eval_output(folded, x), eval_output(model, x))


# --------------------------------------------------------------------------------------------
# Item 7: FrozenBatchNorm2d on integer input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_frozen_batchnorm_on_integer_input_gives_a_float_result(dtype):
    torch.manual_seed(0)
    frozen = randomized(nn.Sequential(normlab.FrozenBatchNorm2d(3)))[0]
    reference = TorchvisionFrozenBatchNorm2d(3)
    reference.load_state_dict(frozen.state_dict())
    pixels = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0)).to(dtype)
    out = frozen(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(pixels))
    torch.testing.assert_close(out, frozen(pixels.float()))


# --------------------------------------------------------------------------------------------
# Recalibration asks the same question
# --------------------------------------------------------------------------------------------


def test_recalibrate_bn_recalibrates_other_libraries_norm_act_layers_and_reports_unverified_ones():
    from normlab.surgery import recalibrate_bn

    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), TimmBatchNormAct2d(4, act_layer=nn.SiLU),
                                     nn.Conv2d(4, 4, 1), LyingBatchNorm2d(4), TimmFrozenBatchNormAct2d(4))).eval()
    data = [image(seed) for seed in range(3)]
    with pytest.warns(UserWarning, match=r"left '3' \(LyingBatchNorm2d\) as they are: normlab cannot tell"):
        fresh = recalibrate_bn(model, data)
    h = torch.cat([model[0](x) for x in data]).detach().double()
    torch.testing.assert_close(fresh[1].running_mean.double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh[1].running_var.double(), h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    for index in (3, 4):  # the unverified and the frozen norm keep their statistics
        assert torch.equal(fresh[index].running_mean, model[index].running_mean)
