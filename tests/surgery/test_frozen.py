"""FrozenBatchNorm1d/2d/3d beyond the generic conformance checks (tests/conformance/cases_frozen.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import reference as ref
from normlab.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm


def trained_bn(cls=nn.BatchNorm2d, channels=4, seed=0, **kw) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(channels, **kw)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("source", [nn.BatchNorm2d, normlab.BatchNorm2d], ids=["torch", "normlab"])
@pytest.mark.parametrize("affine", [True, False])
def test_loads_batchnorm_state_dict_strictly_and_matches_reference(source, affine):
    bn = trained_bn(source, affine=affine)
    frozen = FrozenBatchNorm2d(4, affine=affine)
    assert str(frozen.load_state_dict(bn.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert list(frozen.state_dict()) == list(bn.state_dict())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    frozen = frozen.double().train()  # training mode too: the frozen layer never uses batch statistics
    s = {k: None if v is None else v.double().numpy() for k, v in
         (("w", frozen.weight), ("b", frozen.bias), ("rm", frozen.running_mean), ("rv", frozen.running_var))}
    expected = ref.batch_norm(x.numpy(), s["rm"], s["rv"], s["w"], s["b"], training=False, eps=1e-5)[0]
    np.testing.assert_allclose(frozen(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert int(frozen.num_batches_tracked) == 7


def test_version1_checkpoint_without_count_loads():
    state = trained_bn().state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(state, strict=True)
    assert int(frozen.num_batches_tracked) == 0
    assert torch.equal(frozen.running_var, trained_bn().running_var)


@pytest.mark.parametrize(
    "bn, frozen_cls, shape",
    [(nn.BatchNorm1d, FrozenBatchNorm1d, (5, 4)), (nn.BatchNorm1d, FrozenBatchNorm1d, (5, 4, 3)),
     (normlab.BatchNorm2d, FrozenBatchNorm2d, (2, 4, 3, 3)), (nn.BatchNorm3d, FrozenBatchNorm3d, (2, 4, 2, 2, 2))],
)
def test_from_batchnorm_equals_eval_batchnorm_in_both_modes(bn, frozen_cls, shape):
    source = trained_bn(bn).eval()
    frozen = _FrozenBatchNorm.from_batchnorm(source)  # the base picks the class of the rank
    assert type(frozen) is frozen_cls
    assert frozen.momentum == source.momentum and frozen.eps == source.eps
    x = torch.randn(shape)
    expected = source(x)
    for training in (True, False):
        torch.testing.assert_close(frozen.train(training)(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(frozen.running_mean, source.running_mean)  # nothing moved in training mode


def test_backward_saves_only_the_per_channel_scale():
    """An affine map needs only its scale for dx: no input-sized tensor may be kept for backward."""
    frozen = FrozenBatchNorm2d.from_batchnorm(trained_bn())
    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = frozen(x)
    assert saved and max(saved) == 4, f"saved tensors of sizes {saved}"
    y.backward(torch.ones_like(y))
    scale = frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)
    torch.testing.assert_close(x.grad, scale.view(1, 4, 1, 1).expand_as(x))
    assert frozen.weight.grad is None and not frozen.weight.requires_grad
    assert list(frozen.parameters()) == [], "a frozen norm has no parameters for an optimizer"


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_model_keeps_float32_statistics(half):
    frozen = FrozenBatchNorm2d.from_batchnorm(trained_bn())
    reference = copy.deepcopy(frozen)
    frozen = frozen.to(half)
    assert frozen.running_var.dtype == torch.float32 and frozen.weight.dtype == half
    x = torch.randn(2, 4, 3, 3).to(half)
    y = frozen(x)
    assert y.dtype == half
    torch.testing.assert_close(y.float(), reference(x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "make, shape, match",
    [(lambda: FrozenBatchNorm1d(3), (2, 3, 4, 4), r"FrozenBatchNorm1d\(3\): expected 2D or 3D input \(got 4D input\)"),
     (lambda: FrozenBatchNorm2d(3), (2, 3, 4), r"FrozenBatchNorm2d\(3\): expected 4D input \(got 3D input\)"),
     (lambda: FrozenBatchNorm3d(3), (2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
     (lambda: FrozenBatchNorm2d(3), (2, 5, 4, 4),
      r"FrozenBatchNorm2d\(3\): expected 3 channels in dimension 1, got input of shape \(2, 5, 4, 4\)")],
    ids=["1d-rank", "2d-rank", "3d-rank", "channels"],
)
def test_errors_on_input(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make()(torch.randn(shape))


def test_errors_on_construction():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: num_features must be a positive int, got 0"):
        FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: eps must be a finite number > 0"):
        FrozenBatchNorm2d(3, eps=-1.0)
    with pytest.raises(TypeError, match=r"from_batchnorm: expected a batch-norm layer .* got GroupNorm"):
        FrozenBatchNorm2d.from_batchnorm(nn.GroupNorm(1, 4))
    with pytest.raises(ValueError, match=r"has no running statistics \(track_running_stats=False\)"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))


def test_repr_and_name_in_messages():
    model = nn.Sequential(nn.Identity(), FrozenBatchNorm2d(3))
    normlab.name_layers(model)
    assert repr(model[1]) == "FrozenBatchNorm2d(3, eps=1e-05, affine=True)"
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\) '1': expected 4D input"):
        model(torch.randn(2, 3))
