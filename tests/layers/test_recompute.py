"""Recompute-safe running statistics: under torch.utils.checkpoint a training step updates them once.

torch's layers take the step in twice (the original forward, and the recomputation inside
backward); each test shows torch doing so next to normlab not doing so.
"""

from __future__ import annotations

import pytest
import torch
from device_switch import generator
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import normlab
from normlab.layers import base


def _pair(cls_name: str, channels: int, **kw) -> tuple[nn.Module, nn.Module]:
    ours, theirs = getattr(normlab, cls_name)(channels, **kw), getattr(nn, cls_name)(channels, **kw)
    with torch.no_grad():
        if getattr(ours, "weight", None) is not None:
            for layer in (ours, theirs):
                layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
                layer.bias.copy_(torch.linspace(-0.5, 0.5, channels))
    return ours, theirs


def _net(norm: nn.Module, channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, channels, 3, padding=1), norm, nn.Tanh())


def _step(model: nn.Module, x: torch.Tensor, use_reentrant: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = model(x) if use_reentrant is None else checkpoint(model, x, use_reentrant=use_reentrant)
    y.square().sum().backward()
    return y.detach(), x.grad


def _stats(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items() if k.startswith(("running", "num_batches"))}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_updates_running_stats_once_where_torch_updates_twice(use_reentrant, momentum):
    # Step 1 checkpointed, step 2 plain. With momentum=None (the cumulative average) taking one
    # batch in twice shows only from the next batch on, whose weight the doubled count shrinks.
    x1, x2 = torch.randn(6, 3, 10) * 2 + 1, torch.randn(6, 3, 10) - 1
    plain_ours, plain_torch = (_net(n, 4) for n in _pair("BatchNorm1d", 4, momentum=momentum))
    ours, theirs = (_net(n, 4) for n in _pair("BatchNorm1d", 4, momentum=momentum))
    y_plain, gx_plain = _step(plain_ours, x1, None)
    _step(plain_torch, x1, None)
    y_ours, gx_ours = _step(ours, x1, use_reentrant)
    _step(theirs, x1, use_reentrant)

    # After the checkpointed step: torch took the batch in a second time at the recomputation.
    assert int(plain_torch[1].num_batches_tracked) == 1 and int(theirs[1].num_batches_tracked) == 2
    if momentum is not None:
        assert not torch.allclose(theirs[1].running_var, plain_torch[1].running_var)
    # normlab: exactly the single update of a plain forward, bit for bit (torch's too).
    for key, value in _stats(ours[1]).items():
        assert torch.equal(value, _stats(plain_ours[1])[key]), key
        torch.testing.assert_close(value, _stats(plain_torch[1])[key])
    # ... with the same outputs and gradients as without checkpointing.
    torch.testing.assert_close(y_ours, y_plain)
    torch.testing.assert_close(gx_ours, gx_plain)

    for model in (plain_ours, plain_torch, ours, theirs):
        _step(model, x2, None)
    assert int(theirs[1].num_batches_tracked) == 3
    assert not torch.allclose(theirs[1].running_mean, plain_torch[1].running_mean)
    assert not torch.allclose(theirs[1].running_var, plain_torch[1].running_var)
    for key, value in _stats(ours[1]).items():
        assert torch.equal(value, _stats(plain_ours[1])[key]), key


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_sequential_counts_each_training_step_once(use_reentrant):
    def stack(lib):
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(),
        )

    ours, theirs, plain = stack(normlab), stack(nn), stack(normlab)
    for step in range(3):
        x = torch.randn(4, 2, 6, 6, generator=generator(step)).requires_grad_()
        checkpoint_sequential(ours, 2, x, use_reentrant=use_reentrant).sum().backward()
        checkpoint_sequential(theirs, 2, x, use_reentrant=use_reentrant).sum().backward()
        plain(x).sum().backward()
    # checkpoint_sequential recomputes every segment but the last: torch counts the first
    # segment's layer twice per step.
    assert int(theirs[1].num_batches_tracked) == 6 and int(theirs[4].num_batches_tracked) == 3
    for i in (1, 4):
        assert int(ours[i].num_batches_tracked) == 3
        torch.testing.assert_close(ours[i].running_mean, plain[i].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(ours[i].running_var, plain[i].running_var, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_instance_norm_updates_running_stats_once(use_reentrant):
    x = torch.randn(3, 4, 12) * 3
    ours, theirs = _pair("InstanceNorm1d", 4, track_running_stats=True, affine=True)
    plain = normlab.InstanceNorm1d(4, track_running_stats=True, affine=True)
    plain.load_state_dict(ours.state_dict())
    torch_plain = nn.InstanceNorm1d(4, track_running_stats=True, affine=True)
    torch_plain.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        _step(model, x, use_reentrant)
    _step(plain, x, None)
    _step(torch_plain, x, None)
    assert torch.equal(ours.running_mean, plain.running_mean)
    assert torch.equal(ours.running_var, plain.running_var)
    if use_reentrant:
        assert not torch.allclose(theirs.running_mean, torch_plain.running_mean)
    # With use_reentrant=False torch stops the recomputation once the tensors backward needs
    # are back, which for torch's instance norm is before its running statistics are written.


def test_masked_batch_norm_under_checkpoint_updates_once():
    bn, plain = normlab.BatchNorm1d(3), normlab.BatchNorm1d(3)
    x, mask = torch.randn(4, 3, 7), torch.arange(7) < torch.tensor([7, 2, 5, 4])[:, None]
    checkpoint(bn, x.requires_grad_(), mask, use_reentrant=False).sum().backward()
    plain(x, mask)
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_var, plain.running_var)


def test_without_the_graph_task_probe_statistics_update_as_torchs_do(monkeypatch):
    # The documented fallback for a torch lacking torch._C._current_graph_task_id.
    monkeypatch.setattr(base, "_current_graph_task_id", None)
    model = _net(normlab.BatchNorm1d(4), 4)
    _step(model, torch.randn(6, 3, 10), use_reentrant=False)
    assert int(model[1].num_batches_tracked) == 2


class _ForwardInBackward(torch.autograd.Function):
    """Runs a layer in training mode inside its backward: the documented rare case."""

    layer: nn.Module

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _ForwardInBackward.layer(grad)
        return grad


def test_a_forward_inside_backward_leaves_the_running_statistics_as_documented():
    bn = normlab.BatchNorm1d(3)
    _ForwardInBackward.layer = bn
    x = torch.randn(5, 3, requires_grad=True)
    _ForwardInBackward.apply(x).sum().backward()
    assert int(bn.num_batches_tracked) == 0
    bn(x.detach())  # outside backward the same layer updates as usual
    assert int(bn.num_batches_tracked) == 1


def test_outside_backward_the_probe_reads_false():
    assert base.in_backward() is False
