"""convert_norm, freeze_bn / unfreeze_bn, and the Keras / Flax imports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import reference as ref
from normlab.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.surgery import convert_norm, freeze_bn, unfreeze_bn

from .helpers import assert_relative_close, assert_untouched, randomize_norms, snapshot


def cnn(bn=nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), bn(8), nn.ReLU(), nn.Conv2d(8, 4, 1), bn(4)))


def gamma_beta(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()


# --------------------------------------------------------------------------------------------
# convert_norm
# --------------------------------------------------------------------------------------------


def test_batch_to_group_carries_gamma_and_beta():
    model = cnn()
    before = snapshot(model)
    new = convert_norm(model, "group", num_groups=2)
    assert_untouched(model, before)
    assert isinstance(new[1], normlab.GroupNorm) and new[1].num_groups == 2 and new[4].num_groups == 2
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    h = new[0].double()(x).detach()
    expected = ref.group_norm(h.numpy(), 2, *gamma_beta(model[1]), eps=1e-5)
    np.testing.assert_allclose(new[1].double()(h).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("source", [nn.BatchNorm1d, FrozenBatchNorm1d])
def test_batch1d_to_layer_is_layer_norm_over_features(source):
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Linear(3, 6), source(6)))
    new = convert_norm(model, "layer")
    assert isinstance(new[1], normlab.GroupNorm) and new[1].num_groups == 1
    h = torch.randn(5, 6, dtype=torch.float64)
    expected = ref.layer_norm(h.numpy(), 6, *gamma_beta(model[1]), eps=1e-5)
    np.testing.assert_allclose(new[1].double()(h).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_batch_to_instance_carries_running_statistics_when_both_track():
    model = cnn()
    new = convert_norm(model, "instance", affine=True, track_running_stats=True)
    assert isinstance(new[1], normlab.InstanceNorm2d)
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(new[1], key), getattr(model[1], key)), key
    assert new[1].momentum == model[1].momentum and new[1].eps == model[1].eps


def test_torch_batch_norm_to_normlab_batch_norm_is_the_same_function():
    model = cnn().eval()
    new = convert_norm(model, "batch")
    assert type(new[1]) is normlab.BatchNorm2d and type(new[4]) is normlab.BatchNorm2d
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-6, atol=1e-6)
    assert not new.training and not new[1].training


def test_rms_only_from_one_dimensional_norms_with_zero_beta():
    model = randomize_norms(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d -> RMSNorm\): the new layer has no bias to carry the "
                                         r"old β \(bias\) into, which is not all 0"):
        convert_norm(model, "rms")
    with torch.no_grad():
        model[1].bias.zero_()
    new = convert_norm(model, "rms")
    h = torch.randn(4, 5, dtype=torch.float64)
    expected = ref.rms_norm(h.numpy(), 5, model[1].weight.detach().double().numpy(), eps=1e-5)
    np.testing.assert_allclose(new[1].double()(h).detach().numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match=r"'rms' normalizes the trailing dimension.*Use to='layer' or to='group'"):
        convert_norm(cnn(), "rms")


def test_match_restricts_and_none_removes():
    model = cnn()
    new = convert_norm(model, "none", match=["4"])
    assert isinstance(new[4], nn.Identity) and isinstance(new[1], nn.BatchNorm2d)
    new = convert_norm(new, "batch", match=nn.BatchNorm2d)
    assert type(new[1]) is normlab.BatchNorm2d


def test_convert_errors():
    with pytest.raises(ValueError, match=r"convert_norm: unknown target norm 'groupnorm'; valid names are \[.*'group'"):
        convert_norm(cnn(), "groupnorm")
    with pytest.raises(TypeError, match=r"match picked '0', a Conv2d; only per-channel norms"):
        convert_norm(cnn(), "group", match=["0"])
    with pytest.raises(ValueError, match=r"the new layer has no weight to carry the old γ \(weight\) into"):
        convert_norm(cnn(), "group", affine=False)
    gn = nn.Sequential(nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match=r"to='batch' needs the input rank; pass dim=1, 2 or 3"):
        convert_norm(gn, "batch", match=nn.GroupNorm)
    assert type(convert_norm(gn, "batch", match=nn.GroupNorm, dim=2)[0]) is normlab.BatchNorm2d


# --------------------------------------------------------------------------------------------
# freeze / unfreeze
# --------------------------------------------------------------------------------------------


def test_freeze_keeps_state_and_eval_output_in_training_mode():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Unflatten(1, (3, 1, 1)),
                                          normlab.BatchNorm2d(3), nn.Unflatten(1, (3, 1)), nn.BatchNorm3d(3)))
    before = snapshot(model)
    frozen = freeze_bn(model).train()
    assert_untouched(model, before)
    assert [type(frozen[i]) for i in (1, 3, 5)] == [FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d]
    assert frozen.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.state_dict().items())
    x = torch.randn(6, 4)
    assert_relative_close(frozen(x), model.eval()(x), 1e-6)
    assert list(frozen.parameters()) == list(frozen[0].parameters())  # only the Linear still learns


def test_unfreeze_round_trip_restores_state_and_momentum():
    model = cnn(lambda c: nn.BatchNorm2d(c, momentum=0.03))
    frozen = freeze_bn(model)
    before = snapshot(frozen)
    back = unfreeze_bn(frozen)
    assert_untouched(frozen, before)
    assert type(back[1]) is normlab.BatchNorm2d and back[1].momentum == 0.03
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    torch_back = unfreeze_bn(freeze_bn(model), layer="torch", momentum=None)
    assert type(torch_back[4]) is nn.BatchNorm2d and torch_back[4].momentum is None
    partly = freeze_bn(model, match=["4"])
    assert isinstance(partly[4], FrozenBatchNorm2d) and type(partly[1]) is nn.BatchNorm2d


def test_freeze_errors():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"freeze_bn: '1' \(BatchNorm1d\) has no running statistics "
                                         r"\(track_running_stats=False\).*match="):
        freeze_bn(model)
    with pytest.raises(ValueError, match=r"unfreeze_bn: layer must be 'normlab' or 'torch', got 'keras'"):
        unfreeze_bn(model, layer="keras")
    with pytest.raises(ValueError, match=r"unfreeze_bn: momentum must lie in \[0, 1\]"):
        unfreeze_bn(model, momentum=5.0)


def test_freeze_bn_keeps_a_fused_activation():
    """Regression: freezing BatchNormAct into an affine map dropped its activation."""
    import normlab

    torch.manual_seed(0)
    net = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), normlab.BatchNormAct2d(4, act="relu"))).eval()
    x = torch.randn(2, 3, 6, 6)
    frozen = freeze_bn(net)
    assert isinstance(frozen[1], normlab.FrozenBatchNormAct2d) and type(frozen[1].act) is nn.ReLU
    expected = torch.relu(nn.functional.batch_norm(net[0](x), net[1].running_mean, net[1].running_var,
                                                   net[1].weight, net[1].bias, False, 0.0, net[1].eps))
    torch.testing.assert_close(frozen(x), expected)


def test_convert_sync_batchnorm_skips_norms_without_a_synchronized_version():
    import normlab

    net = nn.Sequential(nn.Linear(3, 4), normlab.GhostBatchNorm1d(4, virtual_batch_size=2),
                        normlab.BatchNormAct1d(4, act="relu"), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match=r"left '1' \(GhostBatchNorm1d\) as they are"):
        synced = normlab.convert_sync_batchnorm(net)
    assert [type(m).__name__ for m in synced][1:] == ["GhostBatchNorm1d", "SyncBatchNormAct", "SyncBatchNorm"]
