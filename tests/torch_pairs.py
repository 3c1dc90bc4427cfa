"""Every normlab layer with a ``torch.nn`` counterpart, paired with it for the export and
torch.func tests: the counterpart is the oracle (same state, same input, same transform)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from device_switch import generator
from torch import nn

import normlab


class Pair(NamedTuple):
    make: Callable[[type], nn.Module]  # called with the namespace: normlab or torch.nn
    shape: tuple[int, ...]


PAIRS: dict[str, Pair] = {
    "BatchNorm1d-2d": Pair(lambda m: m.BatchNorm1d(4), (8, 4)),
    "BatchNorm1d-3d": Pair(lambda m: m.BatchNorm1d(4), (6, 4, 5)),
    "BatchNorm2d": Pair(lambda m: m.BatchNorm2d(4), (6, 4, 3, 5)),
    "BatchNorm3d": Pair(lambda m: m.BatchNorm3d(4), (4, 4, 2, 3, 3)),
    "BatchNorm2d-untracked": Pair(lambda m: m.BatchNorm2d(4, track_running_stats=False), (6, 4, 3, 5)),
    "BatchNorm1d-cumulative": Pair(lambda m: m.BatchNorm1d(4, momentum=None), (8, 4)),
    "SyncBatchNorm": Pair(lambda m: m.SyncBatchNorm(4), (6, 4, 3, 5)),  # one process: no process group
    "InstanceNorm1d": Pair(lambda m: m.InstanceNorm1d(4), (6, 4, 7)),
    "InstanceNorm2d": Pair(lambda m: m.InstanceNorm2d(4), (6, 4, 3, 5)),
    "InstanceNorm2d-tracked": Pair(lambda m: m.InstanceNorm2d(4, affine=True, track_running_stats=True), (6, 4, 3, 5)),
    "InstanceNorm3d": Pair(lambda m: m.InstanceNorm3d(4, affine=True), (4, 4, 2, 3, 3)),
    "GroupNorm": Pair(lambda m: m.GroupNorm(2, 4), (6, 4, 3, 5)),
    "LayerNorm": Pair(lambda m: m.LayerNorm([3, 4]), (6, 3, 4)),
    "RMSNorm": Pair(lambda m: m.RMSNorm(4), (6, 3, 4)),
}


def pair(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(normlab layer, torch layer, input)`` with the same non-trivial parameters and running
    statistics, both in training mode; the input has an offset and spread per channel."""
    make, shape = PAIRS[name]
    ours, theirs = make(normlab), make(nn)
    gen = generator(seed)
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
        for key, b in theirs.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=gen) + (0.5 if key == "running_var" else -0.5))
            else:
                b.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, generator=gen) * 2 + 1
    return ours.train(), theirs.train(), x


def tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's persistent state (torch's keys), detached copies."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
