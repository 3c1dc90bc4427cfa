"""Issue 15 item 1, the model tools: fold, convert, freeze/unfreeze, recalibrate, sync
conversion, Keras/Flax import and the diagnostics each handle a norm with a weight and no bias
(torch 2.13's ``bias=False``), keeping it so where they rebuild it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import surgery
from normlab.surgery import convert as convert_module
from normlab.surgery.diagnose import GradNorms, batch_vs_running_gap, check_stats, train_eval_gap

from .helpers import randomize_norms


def net() -> nn.Sequential:
    """torch's and normlab's batch norms without a bias, after layers with and without one."""
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False), nn.ReLU(),
        nn.Conv2d(4, 5, 3, bias=False), normlab.BatchNorm2d(5, bias=False),
        normlab.BatchNormAct2d(5, act="silu", bias=False),
    ))


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(seed)) * 2 + 1


NORMS = ("1", "4", "5")


def _no_bias(model: nn.Module) -> None:
    for name in NORMS:
        module = model.get_submodule(name)
        assert module.weight is not None and module.bias is None, name
        assert f"{name}.bias" not in model.state_dict()


def test_issue15_item1_fold_a_weight_without_a_bias():
    model = net().eval()
    x = inputs()
    folded, report = surgery.fold_batchnorm(model, x)
    assert [(p.layer, p.norm) for p in report.folded] == [("0", "1"), ("3", "4")]
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    # The conv without a bias gets one: -running_mean * gamma / sqrt(running_var + eps), no beta.
    bn = model[4]
    expected = -bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[3].bias.detach(), expected.detach())


def test_issue15_item1_freeze_and_unfreeze_keep_a_weight_without_a_bias():
    model = net().eval()
    x = inputs()
    frozen = surgery.freeze_bn(model)
    assert [type(frozen[int(n)]).__name__ for n in NORMS] == ["FrozenBatchNorm2d", "FrozenBatchNorm2d",
                                                              "FrozenBatchNormAct2d"]
    _no_bias(frozen)
    assert "affine=True, bias=False" in repr(frozen[1])
    assert list(frozen.state_dict()) == list(model.state_dict())
    frozen.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(frozen.state_dict(), strict=True)
    torch.testing.assert_close(frozen(x), model(x), atol=1e-5, rtol=1e-5)

    back = surgery.unfreeze_bn(frozen)
    assert [type(back[int(n)]) for n in NORMS] == [normlab.BatchNorm2d, normlab.BatchNorm2d, normlab.BatchNormAct2d]
    _no_bias(back)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(back.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    as_torch = surgery.unfreeze_bn(frozen, layer="torch")
    assert type(as_torch[1]) is nn.BatchNorm2d and as_torch[1].bias is None


def test_issue15_item1_unfreeze_to_a_torch_without_bias_refuses_clearly(monkeypatch):
    frozen = surgery.freeze_bn(net().eval())
    monkeypatch.setattr(convert_module, "TORCH_NORM_HAS_BIAS", False)
    with pytest.raises(ValueError, match=r"unfreeze_bn: '1' \(FrozenBatchNorm2d\) has a weight and no bias, and torch "
                                         r".*'s BatchNorm2d cannot leave its bias out .*use layer='normlab'"):
        surgery.unfreeze_bn(frozen, layer="torch")
    assert surgery.unfreeze_bn(frozen)[1].bias is None  # normlab's layers take bias=False on every torch


def test_issue15_item1_unfreeze_a_frozen_norm_with_beta_alone_keeps_it():
    """A frozen norm with a shift and no scale (another library's) comes back with γ = 1 and its β
    (it used to lose β)."""
    frozen = normlab.FrozenBatchNorm2d(3)
    with torch.no_grad():
        frozen.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    frozen.weight = None
    x = torch.randn(2, 3, 4, 4)
    back = surgery.unfreeze_bn(nn.Sequential(frozen))[0].eval()
    torch.testing.assert_close(back(x), frozen(x))


def test_issue15_item1_convert_keeps_a_weight_without_a_bias():
    model = net().eval()
    x = inputs()
    exact = surgery.convert_norm(model, "batch")  # batch to batch: the same numbers
    _no_bias(exact)
    torch.testing.assert_close(exact(x), model(x), atol=1e-5, rtol=1e-5)
    grouped = surgery.convert_norm(model, "group", num_groups=1)
    for name in ("1", "4"):
        assert isinstance(grouped.get_submodule(name), normlab.GroupNorm)
        torch.testing.assert_close(grouped.get_submodule(name).weight, model.get_submodule(name).weight)
    assert grouped[1].bias is None and grouped[4].bias is None
    with_bias = surgery.convert_norm(model, "group", num_groups=1, bias=True)
    assert torch.equal(with_bias[1].bias.detach(), torch.zeros(4))


def test_issue15_item1_recalibrate_a_weight_without_a_bias():
    model = nn.Sequential(normlab.BatchNorm1d(3, bias=False), nn.Linear(3, 2), nn.BatchNorm1d(2, bias=False))
    batches = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) * 3 + 1 for n in (5, 9, 4)]
    new = surgery.recalibrate_bn(model, batches)
    data = torch.cat(batches)
    torch.testing.assert_close(new[0].running_mean, data.mean(0))
    torch.testing.assert_close(new[0].running_var, data.var(0))
    with torch.no_grad():  # the norms normalize with each batch's statistics, as in training
        hidden = torch.cat([new[1](F.batch_norm(b, None, None, new[0].weight, None, True, 0.0, new[0].eps))
                            for b in batches])
    torch.testing.assert_close(new[2].running_mean, hidden.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[2].running_var, hidden.var(0), atol=1e-5, rtol=1e-5)
    assert new[0].bias is None and new[2].bias is None


def test_issue15_item1_sync_conversion_keeps_a_weight_without_a_bias():
    model = net()
    model[4].weight.requires_grad_(False)
    sync = surgery.convert_sync_batchnorm(model)
    assert [type(sync[int(n)]).__name__ for n in NORMS] == ["SyncBatchNorm", "SyncBatchNorm", "SyncBatchNormAct"]
    _no_bias(sync)
    assert not sync[4].weight.requires_grad and sync[1].weight.requires_grad
    x = inputs()
    for training in (True, False):  # one process: the layers they replaced
        torch.testing.assert_close(sync.train(training)(x), model.train(training)(x), atol=1e-5, rtol=1e-5)


def test_issue15_item1_keras_center_false_is_a_weight_without_a_bias():
    rng = np.random.default_rng(0)
    gamma, mean, var = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.uniform(0.2, 3, 4)
    bn = surgery.batchnorm_from_keras(gamma, None, mean, var, momentum=0.9, epsilon=1e-3, dim=2, dtype=torch.float64)
    assert bn.bias is None and "bias" not in bn.state_dict() and bn.weight.requires_grad
    x = rng.normal(1, 2, size=(3, 4, 2, 2))
    view = (1, 4, 1, 1)
    keras_y = (x - mean.reshape(view)) / np.sqrt(var.reshape(view) + 1e-3) * gamma.reshape(view)  # Keras, center=False
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), keras_y, rtol=1e-10, atol=1e-10)
    flax = surgery.batchnorm_from_flax(scale=gamma, mean=mean, var=var, epsilon=1e-3, dim=2, dtype=torch.float64)
    assert flax.bias is None
    np.testing.assert_allclose(flax(torch.from_numpy(x)).detach().numpy(), keras_y, rtol=1e-10, atol=1e-10)
    shift_only = surgery.batchnorm_from_keras(None, gamma, mean, var, dim=2)  # scale=False: γ frozen at 1
    assert shift_only.bias is not None and not shift_only.weight.requires_grad


def test_issue15_item1_diagnostics_of_a_weight_without_a_bias():
    model = nn.Sequential(nn.Linear(3, 4), normlab.BatchNorm1d(4, bias=False), nn.Linear(4, 2))
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    model.train()
    for x, _ in batches:
        model(x)
    assert check_stats(model) == []
    gaps = batch_vs_running_gap(model, batches)
    assert [g.layer for g in gaps] == ["1"] and gaps[0].values == 24
    gap = train_eval_gap(model, batches)
    assert gap.samples == 24 and gap.train_loss != gap.eval_loss
    probe = GradNorms(model)
    model(batches[0][0]).sum().backward()
    probe.remove()
    torch.testing.assert_close(torch.tensor(probe.history[0]["1"]), model[1].weight.grad.norm())
