"""normlab.accumulate: one running-statistics update per optimizer step under gradient accumulation.

Oracle: one training step of torch.nn's batch norm (and of the float64 reference) on the
concatenated micro-batches; and torch's batch norm per micro-batch for what is normalized.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from device_switch import generator, to_numpy
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
from normlab import reference as R
from normlab.accumulate import StatPool, accumulate
from normlab.layers.base import in_backward


def _seeded(layer: nn.Module, count: int = 4) -> nn.Module:
    """Non-trivial parameters and running statistics, ``count`` batches already tracked."""
    c = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, c))
        layer.bias.copy_(torch.linspace(-0.5, 0.5, c))
        layer.running_mean.copy_(torch.linspace(-1.0, 1.0, c))
        layer.running_var.copy_(torch.linspace(0.5, 2.0, c))
        layer.num_batches_tracked.fill_(count)
    return layer


def _batch(shape, seed):
    g = generator(seed)
    return torch.randn(shape, generator=g) * 2 + 0.5


SPLITS = {"BatchNorm1d": ((16, 3), [5, 3, 8]), "BatchNorm2d": ((9, 3, 4, 5), [2, 4, 3])}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls_name", list(SPLITS))
def test_pooled_update_equals_one_training_step_on_the_full_batch(cls_name, momentum):
    shape, sizes = SPLITS[cls_name]
    ours = _seeded(getattr(normlab, cls_name)(3, momentum=momentum))
    full = _seeded(getattr(nn, cls_name)(3, momentum=momentum))
    before = {k: to_numpy(v) for k, v in ours.state_dict().items()}
    x = _batch(shape, seed=1)
    with accumulate(ours):
        for micro in x.split(sizes):
            ours(micro)
            assert int(ours.num_batches_tracked) == 4  # nothing moves before the step
    full(x)
    torch.testing.assert_close(ours.running_mean, full.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var, full.running_var, rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(full.num_batches_tracked) == 5
    _, rm, rv, _ = R.batch_norm(to_numpy(x), before["running_mean"], before["running_var"], training=True,
                                    momentum=momentum, num_batches_tracked=4)
    np.testing.assert_allclose(to_numpy(ours.running_mean), rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_numpy(ours.running_var), rv, rtol=1e-6)


def test_torch_updates_once_per_micro_batch_which_is_what_accumulate_fixes():
    x = _batch((16, 3), seed=2)
    per_micro, full = _seeded(nn.BatchNorm1d(3)), _seeded(nn.BatchNorm1d(3))
    for micro in x.split(4):
        per_micro(micro)
    full(x)
    assert int(per_micro.num_batches_tracked) == 8  # four updates for one optimizer step
    assert not torch.allclose(per_micro.running_mean, full.running_mean, atol=1e-3)


@pytest.mark.parametrize("cls_name", list(SPLITS))
def test_each_micro_batch_is_normalized_with_its_own_statistics(cls_name):
    shape, sizes = SPLITS[cls_name]
    ours, theirs = _seeded(getattr(normlab, cls_name)(3)), _seeded(getattr(nn, cls_name)(3))
    x = _batch(shape, seed=3)
    with accumulate(ours):
        for i, micro in enumerate(x.split(sizes)):
            dy = _batch(micro.shape, seed=10 + i)
            xa, xb = micro.clone().requires_grad_(), micro.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
            (ya * dy).sum().backward()
            (yb * dy).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)


def test_step_applies_one_update_per_optimizer_step_inside_one_block():
    ours, full = _seeded(normlab.BatchNorm1d(3)), _seeded(nn.BatchNorm1d(3))
    batches = [_batch((12, 3), seed=20), _batch((12, 3), seed=21)]
    with accumulate(ours) as acc:
        for x in batches:
            for micro in x.split([5, 7]):
                ours(micro)
            assert acc.step() == 1
        # the end of the block has nothing left to apply
    for x in batches:
        full(x)
    torch.testing.assert_close(ours.running_mean, full.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var, full.running_var, rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == 6


def test_masked_micro_batches_pool_their_valid_positions():
    ours, full = _seeded(normlab.BatchNorm1d(3)), _seeded(nn.BatchNorm1d(3))
    x = _batch((6, 3, 8), seed=30)
    mask = torch.arange(8) < torch.tensor([8, 3, 5, 2, 7, 1])[:, None]
    with accumulate(ours):
        for xm, mm in zip(x.split([2, 4]), mask.split([2, 4])):
            ours(xm, mm)
    full(x.transpose(1, 2)[mask])  # the concatenated valid positions, (K, C)
    torch.testing.assert_close(ours.running_mean, full.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var, full.running_var, rtol=1e-6, atol=1e-6)


def test_a_model_pools_in_every_layer_and_checkpointed_forwards_pool_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), normlab.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), normlab.BatchNorm1d(5))
    fresh = [nn.BatchNorm1d(6), nn.BatchNorm1d(5)]
    seen = {1: [], 4: []}  # each layer's micro-batch inputs, from the original forwards only
    for i in list(seen):
        model[i].register_forward_pre_hook(
            lambda mod, args, i=i: None if in_backward() else seen[i].append(args[0].detach())
        )
    x = _batch((12, 4), seed=40)
    with accumulate(model):
        for micro in x.split(4):
            checkpoint(model, micro.requires_grad_(), use_reentrant=False).sum().backward()
    for layer, i in zip(fresh, seen):
        assert len(seen[i]) == 3
        layer(torch.cat(seen[i]))  # one step on everything the layer saw
        torch.testing.assert_close(model[i].running_mean, layer.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var, layer.running_var, rtol=1e-5, atol=1e-6)
        assert int(model[i].num_batches_tracked) == 1


def test_eval_forwards_and_layers_without_running_stats_are_as_outside():
    tracked, untracked = normlab.BatchNorm1d(3), normlab.BatchNorm1d(3, track_running_stats=False)
    model = nn.Sequential(tracked, untracked)
    x = _batch((8, 3), seed=50)
    with accumulate(model) as acc:
        model.eval()
        torch.testing.assert_close(model(x), untracked(tracked(x)))
        assert acc.step() == 0
    assert int(tracked.num_batches_tracked) == 0


def test_an_exception_in_the_block_drops_the_pooled_statistics():
    bn = _seeded(normlab.BatchNorm1d(3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(KeyError), accumulate(bn):
        bn(_batch((8, 3), seed=60))
        raise KeyError("interrupted")
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert bn._accumulator is None
    bn(_batch((8, 3), seed=61))  # back to per-batch updates
    assert int(bn.num_batches_tracked) == 5


def test_a_non_finite_micro_batch_skips_the_steps_update():
    bn = _seeded(normlab.BatchNorm1d(3))
    before = bn.running_mean.clone()
    bad = _batch((4, 3), seed=70)
    bad[0, 1] = float("nan")
    with accumulate(bn) as block:
        bn(_batch((4, 3), seed=71))
        bn(bad)
        with pytest.warns(normlab.NonFiniteStatisticsWarning, match="BatchNorm1d"):
            block.step()
    assert torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 4 and int(bn.num_batches_skipped) == 1


def test_a_single_value_micro_batch_with_single_sample_running_is_not_pooled():
    bn, full = _seeded(normlab.BatchNorm1d(3, single_sample="running")), _seeded(nn.BatchNorm1d(3))
    x = _batch((6, 3), seed=80)
    with accumulate(bn):
        bn(x)
        bn(_batch((1, 3), seed=81))  # normalized with the running statistics, as outside the block
    full(x)
    torch.testing.assert_close(bn.running_var, full.running_var, rtol=1e-6, atol=1e-6)


def test_torch_batch_norm_layers_in_the_model_are_named_in_a_warning():
    model = nn.Sequential(normlab.BatchNorm1d(3), nn.BatchNorm1d(3))
    block = accumulate(model)
    with pytest.warns(UserWarning, match=r"1 batch-norm layer\(s\) of the model are not normlab layers.*\['1'\]"):
        block.__enter__()
    block.__exit__(None, None, None)


def test_misuse_is_refused_with_the_fix():
    bn = normlab.BatchNorm1d(3)
    with pytest.raises(TypeError, match=r"expected the model \(a torch.nn.Module\), got Tensor"):
        accumulate(torch.zeros(3))
    with accumulate(bn), pytest.raises(RuntimeError, match=r"already inside another normlab.accumulate block.*\.step\(\)"):
        accumulate(bn).__enter__()
    block = accumulate(bn)
    with pytest.raises(RuntimeError, match=r"step\(\) must be called inside the with block"):
        block.step()


def test_stat_pool_matches_the_moments_of_the_concatenation():
    chunks = [torch.randn(n, 4, dtype=torch.float64) * s + m for n, s, m in [(3, 1.0, 5.0), (1, 2.0, -1.0), (9, 0.5, 0.0)]]
    pool = StatPool()
    for c in chunks:
        pool.add(c.mean(0), c.var(0, unbiased=False), c.shape[0])
    pool.add(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 0)  # empty: ignored
    mean, var, count = pool.result()
    allx = torch.cat(chunks)
    torch.testing.assert_close(mean, allx.mean(0))
    torch.testing.assert_close(var, allx.var(0, unbiased=False))
    assert count == 13


def test_a_deep_copy_made_inside_the_block_updates_as_usual():
    import copy

    bn = normlab.BatchNorm1d(3)
    with accumulate(bn):
        twin = copy.deepcopy(bn)  # e.g. an EMA model built mid-training
        twin(_batch((8, 3), seed=90))
    assert twin._accumulator is None
    assert int(twin.num_batches_tracked) == 1 and int(bn.num_batches_tracked) == 0
