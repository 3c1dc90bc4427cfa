"""Issue 12, thin layers: a batch norm's input goes layer -> functional once, each rule is checked
once, in functional, with one message that names the layer (the layout rules themselves are
pinned in test_structure.py)."""

from __future__ import annotations

import re

import pytest
import torch

import normlab
from normlab import functional as NF
from normlab.functional import _numerics
from normlab.layers.ghost import GhostBatchNorm1d
from normlab.layers.recurrent import RecurrentBatchNorm
from normlab.layers.renorm import BatchRenorm1d


@pytest.fixture
def calls(monkeypatch):
    """How often the shared checks run: ``{name: count}``."""
    counted: dict[str, int] = {}
    for name in ("mask_view", "mask_count", "check_batch_count"):
        original = getattr(_numerics, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            counted[_name] = counted.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_numerics, name, wrapper)
    return counted


@pytest.mark.parametrize("single_sample", ["error", "running"])
def test_the_mask_is_checked_and_counted_once(calls, single_sample):
    """Issue 12: the mask was checked and counted twice (layer, then functional)."""
    x, mask = torch.randn(4, 3, 6), torch.rand(4, 6) < 0.7
    mask[0, :2] = True
    normlab.BatchNorm1d(3, single_sample=single_sample)(x, mask)
    assert calls == {"mask_view": 1, "mask_count": 1}
    calls.clear()
    normlab.BatchNormAct1d(3, single_sample=single_sample)(x, mask)
    assert calls == {"mask_view": 1, "mask_count": 1}


def _fixes(message: str) -> str:
    return message[message.index("Fixes:"):]


_ONE_VALUE = [
    ("BatchNorm1d", lambda: normlab.BatchNorm1d(3)(torch.randn(1, 3)), r"BatchNorm1d\(3\)"),
    ("BatchNorm1d-mask", lambda: normlab.BatchNorm1d(3)(torch.randn(2, 3, 4), torch.arange(8).reshape(2, 4) == 0),
     r"BatchNorm1d\(3\)"),
    ("BatchRenorm1d", lambda: BatchRenorm1d(3)(torch.randn(1, 3)), r"BatchRenorm1d\(3\)"),
    ("GhostBatchNorm1d", lambda: GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(1, 3)), r"GhostBatchNorm1d\(3\)"),
    ("BatchNormAct1d", lambda: normlab.BatchNormAct1d(3)(torch.randn(1, 3)), r"BatchNormAct1d\(3\)"),
    ("SyncBatchNorm", lambda: normlab.SyncBatchNorm(3)(torch.randn(1, 3, 1)), r"SyncBatchNorm\(3\)"),
    ("RecurrentBatchNorm", lambda: RecurrentBatchNorm(3, max_steps=2)(torch.randn(1, 3), 0),
     r"RecurrentBatchNorm\(3\) at step 0"),
    ("batch_norm", lambda: NF.batch_norm(torch.randn(1, 3), training=True), "batch_norm"),
    ("batch_renorm", lambda: NF.batch_renorm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True),
     "batch_renorm"),
    ("batch_norm_act", lambda: NF.batch_norm_act(torch.randn(1, 3), training=True), "batch_norm_act"),
    ("batch_norm_with_stats", lambda: NF.batch_norm_with_stats(torch.randn(1, 3)), "batch_norm_with_stats"),
    ("masked_batch_norm", lambda: NF.masked_batch_norm(torch.randn(3, 2), torch.tensor([True, False, False]),
                                                       training=True), "masked_batch_norm"),
]


@pytest.mark.parametrize("make, name", [case[1:] for case in _ONE_VALUE], ids=[case[0] for case in _ONE_VALUE])
def test_fewer_than_two_values_is_one_rule_with_one_message(calls, make, name):
    """Issue 12: the fewer-than-2-values check lived in 4 places with 4 messages. Now every
    batch norm, layer or function, raises it once, from one place, naming the caller."""
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert re.match(rf"{name}: training needs more than one value per channel to compute batch statistics, got ",
                    message), message
    reference = str(pytest.raises(ValueError, NF.batch_norm, torch.randn(1, 3), training=True).value)
    assert _fixes(message) == _fixes(reference)
    assert calls.get("check_batch_count", 0) >= 1


def test_single_sample_running_normalizes_with_the_running_statistics_in_every_variant():
    """The layer's policy travels into functional (no second count in the layer): a one-value
    batch is normalized with the running statistics, which stay as they are."""
    x = torch.randn(1, 3)
    for make in (normlab.BatchNorm1d, BatchRenorm1d, lambda c, **k: GhostBatchNorm1d(c, virtual_batch_size=2, **k),
                 lambda c, **k: normlab.BatchNormAct1d(c, act="identity", **k)):
        layer = make(3, single_sample="running")
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
            layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        y = layer(x)
        expected = (x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
        torch.testing.assert_close(y, expected)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[key]), (type(layer).__name__, key)
