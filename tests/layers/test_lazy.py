"""Issue 15 item 2: LazyBatchNorm1d/2d/3d and LazyInstanceNorm1d/2d/3d as torch has them,
materializing to normlab's layers. (torch's module test inputs run through them in
tests/layers/test_module_db.py.)"""

from __future__ import annotations

import pytest
import torch
from device_switch import generator
from torch import nn

import normlab
from normlab import surgery

# (normlab lazy, torch lazy, normlab class it becomes, input)
LAZY = [
    (normlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, normlab.BatchNorm1d, (6, 3)),
    (normlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, normlab.BatchNorm1d, (4, 3, 5)),
    (normlab.LazyBatchNorm2d, nn.LazyBatchNorm2d, normlab.BatchNorm2d, (4, 3, 5, 5)),
    (normlab.LazyBatchNorm3d, nn.LazyBatchNorm3d, normlab.BatchNorm3d, (2, 3, 3, 3, 3)),
    (normlab.LazyInstanceNorm1d, nn.LazyInstanceNorm1d, normlab.InstanceNorm1d, (2, 3, 7)),
    (normlab.LazyInstanceNorm2d, nn.LazyInstanceNorm2d, normlab.InstanceNorm2d, (2, 3, 4, 5)),
    (normlab.LazyInstanceNorm3d, nn.LazyInstanceNorm3d, normlab.InstanceNorm3d, (2, 3, 2, 3, 4)),
]
OPTIONS = [{}, {"bias": False}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "eps": 1e-3}]


def _id(case) -> str:
    return f"{case[0].__name__}-{len(case[3])}d_input"


@pytest.mark.parametrize("ours_cls, torch_cls, becomes, shape", LAZY, ids=[_id(c) for c in LAZY])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_issue15_item2_lazy_layer_is_torchs_then_becomes_normlabs(ours_cls, torch_cls, becomes, shape, options):
    ours, theirs = ours_cls(**options), torch_cls(**options)
    assert isinstance(ours, torch_cls)  # code that checks for torch's lazy class sees one
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.has_uninitialized_params() == theirs.has_uninitialized_params()
    x = torch.randn(shape, generator=generator(0)) * 2 + 1
    for step in range(2):
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert type(ours) is becomes and type(theirs) is getattr(nn, becomes.__name__)
        ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
        assert list(ours_state) == list(theirs_state)
        for key, value in theirs_state.items():
            torch.testing.assert_close(ours_state[key], value, atol=1e-6, rtol=1e-6)
    assert ours.num_features == 3
    if ours.weight is not None or ours.running_mean is not None:  # torch keeps num_features 0 otherwise
        assert repr(ours) == repr(theirs)


def test_issue15_item2_lazy_layer_keeps_normlabs_options():
    layer = normlab.LazyBatchNorm2d(momentum=None, bias=False, single_sample="running", on_nonfinite="skip",
                                    unbiased=False, stable_stats=False)
    layer(torch.randn(4, 3, 2, 2))
    assert type(layer) is normlab.BatchNorm2d
    assert (layer.single_sample, layer.on_nonfinite, layer.unbiased, layer.stable_stats) == ("running", "skip", False,
                                                                                               False)
    assert repr(layer) == ("BatchNorm2d(3, eps=1e-05, momentum=None, affine=True, bias=False, track_running_stats=True, "
                           "single_sample='running', on_nonfinite='skip', unbiased=False, stable_stats=False)")
    with torch.no_grad():  # a NaN batch is skipped quietly, as on_nonfinite='skip' says
        before = layer.running_mean.clone()
        layer(torch.full((4, 3, 2, 2), float("nan")))
    assert torch.equal(layer.running_mean, before) and int(layer.num_batches_skipped) == 1
    instance = normlab.LazyInstanceNorm1d(on_nonfinite="raise")
    instance(torch.randn(2, 5, 4))
    assert type(instance) is normlab.InstanceNorm1d and instance.on_nonfinite == "raise"


def test_issue15_item2_lazy_layer_takes_the_mask_of_its_first_call():
    layer = normlab.LazyBatchNorm1d()
    x, mask = torch.randn(4, 3, 6), torch.arange(6) < torch.tensor([6, 3, 5, 2])[:, None]
    y = layer(x, mask)
    expected = normlab.BatchNorm1d(3)(x, mask)
    torch.testing.assert_close(y, expected)


def test_issue15_item2_lazy_layer_loads_a_state_dict_before_its_first_forward():
    """torch's lazy layer materializes the loaded tensors but keeps num_features 0; normlab's
    takes C from them at the first forward, and keeps their values."""
    source = normlab.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        source.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        source.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
    layer = normlab.LazyBatchNorm2d(bias=False)
    layer.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer.eval()(x), source.eval()(x))
    assert type(layer) is normlab.BatchNorm2d and layer.num_features == 3
    torch.testing.assert_close(layer.weight.detach(), source.weight.detach())


def test_issue15_item2_lazy_layer_without_parameters_or_statistics_knows_its_channels():
    layer = normlab.LazyBatchNorm1d(affine=False, track_running_stats=False)
    layer(torch.randn(5, 4))
    assert layer.num_features == 4 and repr(layer).startswith("BatchNorm1d(4,")
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4\): expected 4 channels in dimension 1, got input"):
        layer(torch.randn(5, 3))


def test_issue15_item2_lazy_instance_norm_reads_channels_of_unbatched_input():
    layer = normlab.LazyInstanceNorm1d()  # torch's defaults: affine and running statistics
    x = torch.randn(3, 10)
    y = layer(x)
    assert layer.num_features == 3 and layer.weight.shape == (3,)
    expected = nn.InstanceNorm1d(3, affine=True, track_running_stats=True)(x)
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="num_features"):  # torch's lazy layer reads C from dimension 1
        nn.LazyInstanceNorm1d()(x)


def test_issue15_item2_lazy_layer_checks_the_rank_before_creating_anything():
    layer = normlab.LazyBatchNorm2d()
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        layer(torch.randn(4, 3))
    assert layer.has_uninitialized_params() and type(layer) is normlab.LazyBatchNorm2d
    layer(torch.randn(2, 5, 3, 3))
    assert layer.num_features == 5


def test_issue15_item2_lazy_layer_keeps_16_bit_statistics_float32():
    layer = normlab.LazyBatchNorm2d(dtype=torch.float16)
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float16))
    assert layer.weight.dtype == torch.float16 and layer.running_mean.dtype == torch.float32


def test_issue15_item2_tools_refuse_a_lazy_layer_before_its_first_forward():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.LazyBatchNorm2d())
    kind = normlab.norm_kind(net[1])
    assert kind.family == "batch" and "lazy layer whose parameters and statistics do not exist yet" in kind.unknown
    assert "do not exist yet" in normlab.norm_kind(nn.LazyInstanceNorm2d()).unknown
    for tool in (surgery.freeze_bn, lambda m: surgery.convert_norm(m, "group")):
        with pytest.raises(ValueError, match=r"lazy layers whose parameters do not exist yet \('1'\).*Run the model "
                                             r"once on an input first"):
            tool(net)
    net(torch.randn(2, 3, 6, 6))
    frozen = surgery.freeze_bn(net.eval())
    assert type(frozen[1]) is normlab.FrozenBatchNorm2d
