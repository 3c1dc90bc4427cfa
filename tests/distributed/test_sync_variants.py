"""SyncBatchRenorm and SyncBatchNormAct with real processes (gloo on localhost): equal to one
process running BatchRenorm / BatchNormAct on the concatenated batch, with uneven and empty
per-process batches; and convert_sync_batchnorm maps those layers to them, state kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab.layers.act import BatchNormAct1d, BatchNormAct2d
from normlab.layers.ghost import GhostBatchNorm2d
from normlab.layers.renorm import BatchRenorm1d, BatchRenorm2d, LinearRamp
from normlab.layers.sync import SyncBatchNorm, SyncBatchNormAct, SyncBatchRenorm

from .test_sync import launch

TOL = {"rtol": 1e-5, "atol": 1e-5}


def oracle(kind: str, spec: dict) -> dict:
    """One single-process layer (held to the NumPy reference in the conformance suite) on the
    whole batch, the same steps as the workers (the last one in eval mode). For batch renorm
    it also counts how often r and d were clipped, so the test knows the limits were in force."""
    channels, sizes, rest = spec["channels"], spec["sizes"], spec["rest"]
    two_d = len(rest) == 2
    if kind == "renorm":
        d_max = LinearRamp(*spec["d_max_ramp"]) if "d_max_ramp" in spec else spec["d_max"]
        layer = (BatchRenorm2d if two_d else BatchRenorm1d)(channels, momentum=0.3, r_max=spec["r_max"], d_max=d_max)
    else:
        layer = (BatchNormAct2d if two_d else BatchNormAct1d)(
            channels, momentum=0.3, act=spec["act"], negative_slope=spec["negative_slope"])
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, channels, dtype=torch.float64))
    clipped = {"r": 0, "r free": 0, "d": 0, "d free": 0}
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    steps = []
    for step in range(spec["steps"] + 1):
        g = torch.Generator().manual_seed(step)
        x = (torch.randn(sum(sizes), channels, *rest, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
        upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
        if step == spec["steps"]:
            layer.eval()
        if kind == "renorm" and layer.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x.detach(), dims, correction=0)
            sigma = (layer.running_var + layer.eps).sqrt()
            r_max, d_max = layer.limits()
            r = (var + layer.eps).sqrt() / sigma
            d = (mean - layer.running_mean) / sigma
            clipped["r"] += int(((r > r_max) | (r < 1 / r_max)).sum())
            clipped["r free"] += int(((r < r_max) & (r > 1 / r_max)).sum())
            clipped["d"] += int((d.abs() > d_max).sum())
            clipped["d free"] += int(((d.abs() < d_max) & (d.abs() > 0.05)).sum())
        layer.weight.grad = layer.bias.grad = None
        if kind == "act_masked":
            length = x.shape[-1]
            lengths = torch.randint(0, length + 1, (x.shape[0],), generator=g)
            if "all_padding_rank" in spec:
                rank = spec["all_padding_rank"]
                lengths[starts[rank] : starts[rank] + sizes[rank]] = 0
            mask = torch.arange(length)[None, :] < lengths[:, None]
            y = layer(x, mask)
        else:
            y = layer(x)
        (y * upstream).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(), "db": layer.bias.grad.clone()})
    return {"steps": steps, "running_mean": layer.running_mean, "running_var": layer.running_var,
            "count": layer.num_batches_tracked, "clipped": clipped}


CONFIGS = {
    "2proc-NCHW-channels_last-uneven": {
        "sizes": [5, 3], "rest": [4, 4], "channels_last": True, "layers": ["renorm", "act"], "r_max": 1.5,
        "d_max": 0.5},
    # rank 1 has no samples; rank 0's samples are all padding in the masked one
    "3proc-NCL-empty-rank-d_max-schedule-masked": {
        "sizes": [4, 0, 6], "rest": [5], "layers": ["renorm", "act", "act_masked"], "r_max": 1.5,
        "d_max_ramp": [0.0, 1.0, 0, 4], "all_padding_rank": 0},
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_variants_equal_one_process_on_the_concatenated_batch(tmp_path, config):
    spec = {"channels": 3, "steps": 3, "out": str(tmp_path / "r"), "act": "leaky_relu", "negative_slope": 0.2,
            **CONFIGS[config]}
    sizes = spec["sizes"]
    world = len(sizes)
    procs = launch(spec, world)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    starts = [sum(sizes[:r]) for r in range(world)]
    for kind in spec["layers"]:
        got = [torch.load(f"{spec['out']}.{kind}.{r}") for r in range(world)]
        want = oracle(kind, spec)
        if kind == "renorm":  # the limits were in force at some channels and steps, not at others
            assert all(want["clipped"].values()), want["clipped"]
        for step, expected in enumerate(want["steps"]):
            where = f"{kind}, step {step}"
            for r in range(world):
                mine = got[r]["steps"][step]
                part = slice(starts[r], starts[r] + sizes[r])
                torch.testing.assert_close(mine["y"], expected["y"][part], **TOL, msg=lambda m, where=where: f"{where}, y: {m}")
                torch.testing.assert_close(mine["dx"], expected["dx"][part], **TOL, msg=lambda m, where=where: f"{where}, dx: {m}")
            # weight/bias gradients: each process holds its contribution; together they are the whole
            torch.testing.assert_close(sum(g["steps"][step]["dw"] for g in got), expected["dw"], **TOL)
            torch.testing.assert_close(sum(g["steps"][step]["db"] for g in got), expected["db"], **TOL)
        for r in range(world):
            torch.testing.assert_close(got[r]["running_mean"], want["running_mean"], **TOL)
            torch.testing.assert_close(got[r]["running_var"], want["running_var"], **TOL)
            assert int(got[r]["count"]) == int(want["count"]) == spec["steps"]


# ---------------------------------------------------------------------------------------------
# Single process: no process group, so the layers are their normlab counterparts
# ---------------------------------------------------------------------------------------------


def test_without_a_process_group_sync_batch_renorm_is_batch_renorm():
    torch.manual_seed(0)
    sync = SyncBatchRenorm(3, momentum=0.3, r_max=1.5, d_max=0.5).double()
    plain = BatchRenorm2d(3, momentum=0.3, r_max=1.5, d_max=0.5).double()
    plain.load_state_dict(sync.state_dict())
    for _ in range(3):
        x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        upstream = torch.randn(x.shape, dtype=torch.float64)
        y, y2 = sync(x), plain(x2)
        (y * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad)
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert int(sync.num_batches_tracked) == 3
    assert sync.state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()


def test_without_a_process_group_sync_batch_norm_act_is_batch_norm_act():
    torch.manual_seed(1)
    sync = SyncBatchNormAct(3, act="elu", alpha=0.5).double()
    plain = BatchNormAct1d(3, act="elu", alpha=0.5).double()
    with torch.no_grad():
        sync.bias.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    plain.load_state_dict(sync.state_dict())
    x = (torch.randn(6, 3, 7, dtype=torch.float64) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64)
    y, y2 = sync(x), plain(x2)
    (y * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad)
    torch.testing.assert_close(sync.running_mean, plain.running_mean)


def test_sync_batch_norm_act_splits_into_a_sync_batch_norm_with_its_group():
    layer = SyncBatchNormAct(4, act="leaky_relu", negative_slope=0.3, process_group="group-sentinel")
    bn, act = layer.split()
    assert type(bn) is SyncBatchNorm and bn.process_group == "group-sentinel"
    assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.3


def test_bad_arguments_and_input_name_the_rule():
    with pytest.raises(ValueError, match=r"SyncBatchRenorm: r_max must be >= 1 .* got 0\.5"):
        SyncBatchRenorm(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"SyncBatchNormAct: act must be one of .* got 'gelu'"):
        SyncBatchNormAct(3, act="gelu")
    with pytest.raises(ValueError, match=r"expected input \(N, C\) or \(N, C, \*\), got a 1-D tensor"):
        SyncBatchRenorm(3, r_max=2.0, d_max=1.0)(torch.randn(3))


# ---------------------------------------------------------------------------------------------
# convert_sync_batchnorm
# ---------------------------------------------------------------------------------------------


def test_convert_sync_batchnorm_converts_renorm_and_fused_activation_keeping_state():
    torch.manual_seed(2)
    schedule = LinearRamp(0.0, 2.0, 1, 10)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchRenorm2d(4, momentum=0.2, r_max=1.5, d_max=schedule, unbiased=False),
        BatchNormAct2d(4, eps=1e-3, act="leaky_relu", negative_slope=0.2, save="input", on_nonfinite="skip"),
        nn.BatchNorm2d(4),
        GhostBatchNorm2d(4, virtual_batch_size=2),
    )
    for _ in range(3):  # running statistics and counts away from their initial values
        net(torch.randn(4, 3, 6, 6) * 2 + 1)
    net[2].bias.requires_grad_(False)
    net[3].eval()
    normlab.name_layers(net)

    with pytest.warns(UserWarning, match=r"left '4' \(GhostBatchNorm2d\) as they are") as caught:
        synced = normlab.convert_sync_batchnorm(net)
    assert len(caught) == 1 and "BatchRenorm" not in str(caught[0].message) and "BatchNormAct" not in str(caught[0].message)

    assert [type(m).__name__ for m in synced] == [
        "Conv2d", "SyncBatchRenorm", "SyncBatchNormAct", "SyncBatchNorm", "GhostBatchNorm2d"]
    renorm, act = synced[1], synced[2]
    assert (renorm.r_max, renorm.d_max, renorm.momentum, renorm.unbiased) == (1.5, schedule, 0.2, False)
    assert (act.act, act.negative_slope, act.save, act.eps, act.on_nonfinite) == ("leaky_relu", 0.2, "input", 1e-3, "skip")
    assert not act.bias.requires_grad and act.weight.requires_grad and not synced[3].training
    assert (renorm.name, act.name) == ("1", "2")
    for i in (1, 2, 3):
        for key, value in net[i].state_dict().items():
            torch.testing.assert_close(synced[i].state_dict()[key], value, rtol=0, atol=0)
    assert type(net[1]) is BatchRenorm2d  # the input model is left as it was

    # Without a process group the converted model computes what the original does, in training
    # too (the renorm corrections and the activation kept), and updates the same statistics.
    x = torch.randn(4, 3, 6, 6) * 3 - 1
    original = copy.deepcopy(net)
    torch.testing.assert_close(synced(x), original(x))
    for i in (1, 2):
        torch.testing.assert_close(synced[i].running_var, original[i].running_var)
        assert int(synced[i].num_batches_tracked) == int(original[i].num_batches_tracked) == 4


def test_convert_sync_batchnorm_leaves_synchronized_layers_alone():
    net = nn.Sequential(SyncBatchRenorm(2, r_max=2.0, d_max=1.0, process_group="mine"), SyncBatchNormAct(2),
                        nn.SyncBatchNorm(2))
    synced = normlab.convert_sync_batchnorm(net, process_group="other")
    assert synced[0].process_group == "mine" and type(synced[1]) is SyncBatchNormAct
    assert type(synced[2]) is SyncBatchNorm and synced[2].process_group == "other"
