"""recalibrate_bn: exact float64 population statistics, everything restored, loud errors."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.layers.base import NonFiniteStatisticsWarning
from normlab.layers.frozen import FrozenBatchNorm1d
from normlab.surgery import recalibrate_bn
from normlab.surgery.recalibrate import RecalibrationReport

from .helpers import assert_untouched, randomize_norms, snapshot

SIZES = (7, 13, 5, 11)  # uneven batches: the mean must be weighted by batch size


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(6, 3), normlab.BatchNorm1d(3, momentum=None),
    ))


def data(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=g) * 3 + 2 for n in SIZES]


def numpy_population(model: nn.Sequential, batches: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The oracle: the MLP in float64 NumPy, each norm normalizing with its batch's statistics
    (dropout off), and the statistics of each norm's input over the whole data set."""
    w1, b1 = (t.detach().double().numpy() for t in (model[0].weight, model[0].bias))
    w2, b2 = (t.detach().double().numpy() for t in (model[4].weight, model[4].bias))
    g1, be1 = (t.detach().double().numpy() for t in (model[1].weight, model[1].bias))
    inputs1, inputs2 = [], []
    for x in batches:
        h = x.double().numpy() @ w1.T + b1
        inputs1.append(h)
        z = (h - h.mean(0)) / np.sqrt(h.var(0) + model[1].eps) * g1 + be1
        inputs2.append(np.maximum(z, 0) @ w2.T + b2)
    return [(np.concatenate(a).mean(0), np.concatenate(a).var(0, ddof=1)) for a in (inputs1, inputs2)]


def test_equals_float64_population_statistics_of_the_whole_data_set():
    model = mlp().eval()
    before = snapshot(model)
    batches = data()
    fresh = recalibrate_bn(model, batches)
    assert_untouched(model, before)
    for bn, (mean, var) in zip((fresh[1], fresh[5]), numpy_population(model, batches)):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6, atol=1e-6)
        assert int(bn.num_batches_tracked) == 10  # the count is left as it was
    assert fresh[1].momentum == 0.3 and fresh[5].momentum is None
    assert not fresh.training and not any(m.training for m in fresh.modules())


def test_conv_statistics_over_batch_and_space_with_xy_tuples():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))).train()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 2, 6, 5, generator=g) + 1, torch.zeros(n)) for n in (3, 5, 2)]
    fresh = recalibrate_bn(model, batches)
    with torch.no_grad():
        h = torch.cat([model[0].double()(x.double()) for x, _ in batches]).numpy()
    flat = h.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(fresh[1].running_mean.numpy(), flat.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fresh[1].running_var.numpy(), flat.var(1, ddof=1), rtol=1e-5)
    assert fresh.training and fresh[1].training  # modes as the input had them


def test_num_batches_uses_only_the_first_batches_and_biased_layers_store_biased():
    model = nn.Sequential(normlab.BatchNorm1d(5, unbiased=False)).eval()
    batches = data()
    fresh = recalibrate_bn(model, iter(batches), num_batches=2)
    used = torch.cat(batches[:2]).double().numpy()
    np.testing.assert_allclose(fresh[0].running_var.numpy(), used.var(0), rtol=1e-5)
    np.testing.assert_allclose(fresh[0].running_mean.numpy(), used.mean(0), rtol=1e-5, atol=1e-6)


def test_inplace_restores_momentum_and_modes_and_frozen_norms_are_left_alone():
    model = nn.Sequential(mlp(), FrozenBatchNorm1d(3)).train()
    model[0][3].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    frozen_state = {k: v.clone() for k, v in model[1].state_dict().items()}
    out = recalibrate_bn(model, data(), inplace=True)
    assert out is model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model[0][1].momentum == 0.3 and model[0][5].momentum is None
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in frozen_state.items())
    mean, var = numpy_population(model[0], data())[0]
    np.testing.assert_allclose(model[0][1].running_var.double().numpy(), var, rtol=1e-6)


def test_error_when_the_loader_runs_short_leaves_the_statistics():
    model = mlp().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"recalibrate_bn: the loader yielded only 4 batch\(es\), but "
                                         r"num_batches=6 were asked for; pass num_batches=4"):
        recalibrate_bn(model, data(), num_batches=6, inplace=True)
    assert_untouched(model, before)  # statistics, momenta and modes restored on the error path too
    assert model[1].momentum == 0.3


def test_errors():
    with pytest.raises(ValueError, match=r"the model has no batch norm with running statistics"):
        recalibrate_bn(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match=r"num_batches must be a positive int or None \(the whole loader\), got 0"):
        recalibrate_bn(mlp(), data(), num_batches=0)
    with pytest.raises(TypeError, match=r"cannot tell the model's input in a loader item of type dict.*forward="):
        recalibrate_bn(mlp(), [{"x": torch.randn(4, 5)}])
    with pytest.raises(ValueError, match=r"'0' saw a single value per channel in all the batches"):
        recalibrate_bn(nn.Sequential(normlab.BatchNorm1d(2, single_sample="running")), [torch.randn(1, 2)])


def test_forward_argument_and_unreached_norm_warns():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    with pytest.warns(RuntimeWarning, match=r"no batch reached 'unused'.*left as they were"):
        fresh = recalibrate_bn(model, [{"x": torch.randn(6, 2) + 5}], forward=lambda m, b: m(b["x"]))
    assert float(fresh.used.running_mean.min()) > 3 and torch.equal(fresh.unused.running_mean, torch.zeros(2))


# --------------------------------------------------------------------------------------------
# Issue 11, item 5: masks pass through; non-finite batches are skipped, warned and counted
# --------------------------------------------------------------------------------------------


class MaskedNet(nn.Module):
    """A padded-sequence model that hands its mask to both norms (positionally and by keyword)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv1d(3, 4, 1), nn.Conv1d(4, 2, 1)
        self.bn1, self.bn2 = normlab.BatchNorm1d(4), normlab.BatchNorm1d(2, momentum=None)
        randomize_norms(self)

    def forward(self, x, mask=None):
        h = torch.relu(self.bn1(self.conv1(x), mask))
        return self.bn2(self.conv2(h), mask=mask)


def padded_batches(padding: float = 100.0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, mask, y) batches of sequences of different lengths, the padding filled with ``padding``."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n, length in ((4, 9), (6, 5), (3, 12)):
        lengths = torch.randint(2, length + 1, (n,), generator=g)
        mask = torch.arange(length) < lengths[:, None]
        x = torch.randn(n, 3, length, generator=g) * 0.5 + 0.05
        x = torch.where(mask[:, None], x, torch.full_like(x, padding))
        out.append((x, mask, torch.zeros(n, dtype=torch.long)))
    return out


def masked_population(model: MaskedNet, batches) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The oracle: the net in float64 NumPy over each batch's valid positions only (bn1 normalizing
    with the batch's valid statistics), and each norm's input statistics over all valid positions."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    rows1, rows2 = [], []
    for x, mask, _ in batches:
        valid = x.double().numpy().transpose(0, 2, 1)[mask.numpy()]  # (K, 3): the valid positions
        h1 = valid @ p["conv1.weight"][:, :, 0].T + p["conv1.bias"]
        z = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + model.bn1.eps) * p["bn1.weight"] + p["bn1.bias"]
        rows1.append(h1)
        rows2.append(np.maximum(z, 0) @ p["conv2.weight"][:, :, 0].T + p["conv2.bias"])
    return [(np.concatenate(r).mean(0), np.concatenate(r).var(0, ddof=1), len(np.concatenate(r)))
            for r in (rows1, rows2)]


def test_recalibrate_passes_masks_through_and_counts_only_valid_positions():
    model = MaskedNet().eval()
    batches = padded_batches()
    fresh, report = recalibrate_bn(model, batches, forward=lambda m, b: m(b[0], mask=b[1]), return_report=True)
    oracle = masked_population(model, batches)
    for bn, (mean, var, count) in zip((fresh.bn1, fresh.bn2), oracle):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6, atol=1e-6)
    assert report.values == {"bn1": oracle[0][2], "bn2": oracle[1][2]}
    assert (report.batches, report.skipped, report.used) == (3, 0, 3)
    # The issue's failure: counted with the padding, bn1's mean is pulled towards the padding.
    everything = torch.cat([model.conv1(x).transpose(1, 2).reshape(-1, 4) for x, _, _ in batches]).detach()
    assert float((everything.double().mean(0) - torch.from_numpy(oracle[0][0])).abs().max()) > 10


def test_recalibrate_masked_nan_padding_is_not_a_nonfinite_batch():
    model = MaskedNet().eval()
    batches = padded_batches(padding=float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped-batch warning: the NaN are all padding
        fresh, report = recalibrate_bn(model, batches, forward=lambda m, b: m(b[0], b[1]), return_report=True)
    assert report.skipped == 0
    mean, var, _ = masked_population(model, batches)[1]
    np.testing.assert_allclose(fresh.bn2.running_var.double().numpy(), var, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fresh.bn2.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)


def test_recalibrate_default_call_refuses_to_drop_a_mask():
    with pytest.raises(TypeError, match=r"element 1 is a bool tensor, and the model's forward takes 'mask', but "
                                        r"the default call model\(batch\[0\]\) would drop it.*"
                                        r"forward=lambda model, batch: model\(batch\[0\], mask=batch\[1\]\)"):
        recalibrate_bn(MaskedNet(), padded_batches())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_recalibrate_skips_nonfinite_batches_with_a_warning_and_a_count(bad):
    model = mlp().eval()
    model[5].on_nonfinite = "raise"  # the layer's own policy must neither abort nor outlive the call
    batches = data()
    poisoned = [b.clone() for b in batches]
    poisoned[2][3, 1] = bad
    with pytest.warns(NonFiniteStatisticsWarning,
                      match=r"recalibrate_bn: skipped 1 of 4 batch\(es\) whose input to '1', '5' was not finite "
                            r"\(NaN or inf\); they are left out of every norm's statistics \(batch indices here: 2\)"):
        fresh, report = recalibrate_bn(model, poisoned, return_report=True)
    assert isinstance(report, RecalibrationReport)
    assert (report.batches, report.skipped, report.used, report.skipped_indices) == (4, 1, 3, (2,))
    kept = [b for i, b in enumerate(batches) if i != 2]
    for bn, (mean, var) in zip((fresh[1], fresh[5]), numpy_population(model, kept)):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6, atol=1e-6)
    assert report.values == {"1": sum(len(b) for b in kept), "5": sum(len(b) for b in kept)}
    assert fresh[5].on_nonfinite == "raise" and int(fresh[5].num_batches_skipped) == 0
    assert "skipped 1 non-finite (indices [2])" in str(report)


def test_recalibrate_every_batch_nonfinite_is_an_error_and_leaves_the_statistics():
    model = mlp().eval()
    before = snapshot(model)
    batches = [b * float("nan") for b in data()]
    with pytest.raises(ValueError, match=r"recalibrate_bn: every one of the 4 batch\(es\) was non-finite \(NaN or "
                                         r"inf in the input of '1', '5'\).*left unchanged"):
        recalibrate_bn(model, batches, inplace=True)
    assert_untouched(model, before)
    assert model[1].momentum == 0.3 and model[5].on_nonfinite == "warn"


def test_recalibrate_returns_the_model_alone_by_default():
    fresh = recalibrate_bn(mlp().eval(), data())
    assert isinstance(fresh, nn.Sequential)  # fresh[1] is still the norm, not a report


# --------------------------------------------------------------------------------------------
# torch.distributed: two gloo processes on localhost
# --------------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batches = data()
        mine = batches[:1] if rank == 0 else batches[1:]  # unequal shares: 7 vs 29 samples
        fresh = recalibrate_bn(mlp().eval(), mine)
        torch.save({k: v for k, v in fresh.state_dict().items() if "running" in k}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _check_rank_stats(stats: dict) -> None:
    for prefix, (mean, var) in zip(("1", "5"), numpy_population(mlp(), data())):
        np.testing.assert_allclose(stats[f"{prefix}.running_mean"].double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[f"{prefix}.running_var"].double().numpy(), var, rtol=1e-5)


def _two_thread_ranks(monkeypatch, work) -> dict:
    """Run ``work(rank)`` for ranks 0 and 1 as threads, torch.distributed faked with an
    all_gather between them; return ``{rank: result}``."""
    import threading

    dist = torch.distributed
    barrier = threading.Barrier(2)
    slots: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def all_gather(out, tensor):
        with lock:
            slots[threading.current_thread().name] = tensor.clone()
        barrier.wait()
        for slot, key in zip(out, sorted(slots)):  # rank order: threads are named "0", "1"
            slot.copy_(slots[key])
        if barrier.wait() == 0:  # one thread clears, once both have read
            slots.clear()
        barrier.wait()  # nobody deposits the next call's tensor before the clearing

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    results: dict[int, Any] = {}

    def rank(r: int) -> None:
        results[r] = work(r)

    threads = [threading.Thread(target=rank, args=(r,), name=str(r)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1]
    return results


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_all_reduce_merges_ranks_exactly(monkeypatch):
    """Two ranks as threads with an all_gather: the pooled statistics include the
    between-rank part (fast; the real gloo test below is marked slow)."""
    models = [mlp().eval(), mlp().eval()]  # built here: seeding is not thread-safe
    batches = data()

    def work(r: int) -> dict:
        fresh = recalibrate_bn(models[r], batches[:1] if r == 0 else batches[1:])
        return {k: v for k, v in fresh.state_dict().items() if "running" in k}

    for stats in _two_thread_ranks(monkeypatch, work).values():
        _check_rank_stats(stats)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_recalibrate_counts_skipped_batches_over_all_ranks(monkeypatch):
    """Rank 0's only finite batch and rank 1's three, with one NaN batch on rank 0: every rank
    gets the statistics of the four finite batches and the global counts (5 run, 1 skipped)."""
    models = [mlp().eval(), mlp().eval()]
    batches = data()
    shares = {0: [batches[0], torch.full_like(batches[0], float("nan"))], 1: batches[1:]}

    def work(r: int):
        fresh, report = recalibrate_bn(models[r], shares[r], return_report=True)
        return {k: v for k, v in fresh.state_dict().items() if "running" in k}, report

    with warnings.catch_warnings():  # both ranks warn (catch_warnings is not thread-safe to inspect)
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        results = _two_thread_ranks(monkeypatch, work)
    for r, (stats, report) in results.items():
        _check_rank_stats(stats)
        assert (report.batches, report.skipped) == (5, 1)
        assert report.skipped_indices == ((1,) if r == 0 else ())


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_ranks_get_the_statistics_of_all_their_batches(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats")
    torch.multiprocessing.start_processes(_rank_main, args=(port, out), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        _check_rank_stats(torch.load(f"{out}.{rank}", weights_only=True))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([os.path.abspath(__file__)]))
