"""cost (C9): the saved-bytes count against the autograd graph and an analytic count, the fused
block against batch norm + activation, the verdict rules on hand-made rows, and one tiny run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab.config import ConfigError, ModelConfig, apply_overrides, check_user_overrides, point_config
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.cost import (VARIANTS, build_variant, cuda_step_peak, fuse_blocks, paired_ratio,
                                          saved_bytes)
from normlab.lab.models import build_model
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["cost"]
POINTS = [{"model.kind": k, "params.scale": s} for k in ("mlp", "cnn") for s in (1, 4)]
SHAPE = (1, 8, 8)


# ---- the memory count ---------------------------------------------------------------------------


def graph_saved_bytes(out: torch.Tensor, keep) -> int:
    """An independent count: walk the autograd graph behind ``out`` and read every node's saved
    tensors (``_saved_*`` attributes of built-in nodes, ``saved_tensors`` of custom Functions),
    each storage once, without the storages of ``keep``."""
    skip = {t.untyped_storage().data_ptr() for t in keep}
    storages, seen, stack = {}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function (normlab's norms)
            values.append(node.saved_tensors)
        tensors = []
        for v in values:
            tensors += [v] if isinstance(v, torch.Tensor) else (
                [t for t in v if isinstance(t, torch.Tensor)] if isinstance(v, (tuple, list)) else [])
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
        stack += [n for n, _ in node.next_functions]
    return sum(storages.values())


def variant(kind: str, name: str, widths=(12, 12), seed=0, **model) -> nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(kind=kind, widths=list(widths), activation="leaky_relu", **model)
    return build_variant(config, name, SHAPE, 10).train()


def batch(n=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_saved_bytes_counts_each_storage_once_and_skips_what_exists_anyway():
    z = torch.randn(5, 8, requires_grad=True)
    assert saved_bytes(lambda: z.sin() + z.cos()) == 5 * 8 * 4  # z saved by both, one storage
    assert saved_bytes(lambda: z.sin() + z.cos(), keep=[z]) == 0
    assert saved_bytes(lambda: z[:, :4].exp().sum()) == 5 * 4 * 4  # exp saves its result
    assert saved_bytes(lambda: z.double().sin()) == 5 * 8 * 8  # a float64 copy of z


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", VARIANTS)
def test_saved_bytes_agrees_with_the_autograd_graph(kind, name):
    model, (x, y) = variant(kind, name), batch()
    keep = [x, y, *model.parameters(), *model.buffers()]
    graph = {}

    def run():
        loss = F.cross_entropy(model(x), y)
        graph["bytes"] = graph_saved_bytes(loss, keep)
        return loss

    counted = saved_bytes(run, keep)
    assert counted == graph["bytes"] > 0


def test_saved_bytes_per_block_match_the_analytic_count():
    """Per hidden block of N x H float32 values: no norm keeps 2 (the activation's input and the
    next layer's input), BN + activation 3 (BN's input too), the fused layer 1; the norms add at
    most a few per-channel vectors."""
    n, h, depth = 32, 24, 3
    x, y = batch(n)
    block = n * h * 4
    counts = {}
    for name in VARIANTS:
        model = variant("mlp", name, widths=[h] * depth)
        counts[name] = saved_bytes(lambda: F.cross_entropy(model(x), y), [x, y, *model.parameters(), *model.buffers()])
    per_channel = depth * 4 * h * 4  # up to four C-vectors per norm layer
    assert 0 <= counts["batch"] - counts["none"] - depth * block <= per_channel
    assert 0 <= counts["batch_act"] - (counts["none"] - depth * block) <= per_channel


# ---- the fused block ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_variant_computes_batch_norm_then_the_activation_once(kind):
    """Oracle: the ``batch`` variant (normlab BN, then nn.LeakyReLU) from the same seed; outputs
    and every gradient agree. (The lab's batch_act block once applied ReLU inside the norm and
    the activation after it; this pins that it applies the activation once.)"""
    x, y = batch()
    fused, plain = variant(kind, "batch_act"), variant(kind, "batch")
    assert all(type(b.act) is nn.Identity and b.norm.act == "leaky_relu" for b in fused.blocks)
    out_f, out_p = fused(x), plain(x)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    assert (out_p < 0).any()  # leaky ReLU's negative side is reached, so a ReLU would differ
    F.cross_entropy(out_f, y).backward()
    F.cross_entropy(out_p, y).backward()
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pf.grad, pp.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fuse_blocks_keeps_the_slope_and_leaves_a_fused_block_alone():
    net = build_model(ModelConfig(widths=[4], norm="batch_act", activation="leaky_relu"), (3,), 2)
    net.blocks[0].act = nn.LeakyReLU(0.2)
    fuse_blocks(net)
    assert net.blocks[0].norm.negative_slope == 0.2 and isinstance(net.blocks[0].act, nn.Identity)
    net.blocks[0].norm.act = "elu"  # already fused: left as it is
    assert fuse_blocks(net).blocks[0].norm.act == "elu"


def test_fuse_blocks_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match=r"block 0 has norm BatchNorm1d, not a BatchNormAct"):
        fuse_blocks(build_model(ModelConfig(widths=[4], norm="batch"), (3,), 2))
    net = build_model(ModelConfig(widths=[4], norm="batch_act", activation="leaky_relu"), (3,), 2)
    net.blocks[0].act = nn.Sigmoid()  # a model built by hand with an activation the layer lacks
    with pytest.raises(ValueError, match=r"BatchNormAct fuses \['elu', 'leaky_relu', 'relu', 'silu'\], not block 0's Sigmoid"):
        fuse_blocks(net)
    with pytest.raises(ValueError, match=r"variant must be one of \['none', 'batch', 'batch_act'\], got 'group'"):
        build_variant(ModelConfig(), "group", (3,), 2)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    assert paired_ratio([2.0, 3.0, 30.0], [1.0, 1.0, 10.0]) == 3.0  # per round 2, 3, 3
    with pytest.raises(ValueError, match=r"two equally long, non-empty lists of round times, got 2 and 1"):
        paired_ratio([1.0, 2.0], [1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_peak_sees_an_allocation_inside_the_step():
    device = torch.device("cuda")
    kept = torch.empty(2**22, device=device)  # allocated before: not counted
    peak = cuda_step_peak(lambda: torch.empty(2**20, device=device).fill_(1), device)
    assert 4 * 2**20 <= peak < 4 * 2**22
    del kept


# ---- config ----------------------------------------------------------------------------------------


def job_config(**overrides):
    return EXPERIMENT.job_config(apply_overrides(EXPERIMENT.quick_config(), overrides, parse=False))


def test_widths_follow_kind_and_scale_and_bad_networks_are_refused():
    cfg = EXPERIMENT.quick_config()
    assert EXPERIMENT.job_config(point_config(cfg, {"model.kind": "mlp", "params.scale": 4})).model.widths == [512] * 3
    assert EXPERIMENT.job_config(point_config(cfg, {"model.kind": "cnn", "params.scale": 1})).model.widths == [16] * 3
    with pytest.raises(ConfigError, match=r"needs an activation BatchNormAct fuses.*got model.activation='sigmoid'"):
        job_config(**{"model.activation": "sigmoid"})
    with pytest.raises(ConfigError, match=r"model.placement must be 'before', got 'after'"):
        job_config(**{"model.placement": "after"})
    with pytest.raises(ConfigError, match=r"params.depth must be an int >= 1, got 0"):
        job_config(**{"params.depth": 0})
    with pytest.raises(ConfigError, match=r"derives model.widths in every job"):
        check_user_overrides(apply_overrides(cfg, {"model.widths": "[8]"}), ["model.widths"], EXPERIMENT.derived)


# ---- verdicts on hand-made rows -------------------------------------------------------------------


def make_rows(saved=(2.0, 3.0, 1.0), times=(1.0, 1.3, 1.35), seeds=(0, 1, 2), jitter=0.02, points=POINTS):
    """Rows of jobs at ``points``: per variant (none, batch, batch_act) its saved bytes (MiB) and
    step time (ms). Seed k scales every time of its job by 3**k (absolute times that differ a lot
    between jobs) and the non-baseline variants by (1 + jitter * (k - 1)) (ratios that differ a little)."""
    rows = []
    for point in points:
        for k, seed in enumerate(seeds):
            t = {v: times[i] * 3.0 ** k * (1 + jitter * (k - 1) * i) for i, v in enumerate(VARIANTS)}
            b = {v: saved[i] * 2**20 for i, v in enumerate(VARIANTS)}
            for v in VARIANTS:
                rows.append({"step": 30, "arm": v, "seed": seed, "point": dict(point), "probes": {
                    "saved_bytes": b[v], "saved_mib": b[v] / 2**20, "saved_vs_none": b[v] / b["none"],
                    "saved_vs_batch": b[v] / b["batch"], "time_ms": t[v], "time_vs_none": t[v] / t["none"],
                    "time_vs_batch": t[v] / t["batch"]}})
    return rows


def summarize(rows, **params):
    config = EXPERIMENT.quick_config()
    config.params.update(params)
    return EXPERIMENT.summarize(rows, dataclasses.asdict(config))


def parts(summary):
    """{label: verdict} of the combined finding's parts."""
    finding, = summary.findings
    return {part.split(":")[0]: part.rsplit("(", 1)[1].rstrip(")") for part in finding.text.split("; ")}


def test_every_verdict_is_reachable_on_hand_made_rows():
    supported = summarize(make_rows())
    assert supported.verdict == "supported" and supported.met
    assert len(parts(supported)) == 16 and set(parts(supported).values()) == {"supported"}

    # The opposite everywhere: BN keeps less and is faster, the fused layer keeps more and is slow.
    opposite = summarize(make_rows(saved=(3.0, 2.0, 2.5), times=(1.3, 1.0, 1.5)))
    assert opposite.verdict == "not supported" and set(parts(opposite).values()) == {"not supported"}

    # Everything holds but the fused layer's time (1.5x BN's): mixed.
    slow = summarize(make_rows(times=(1.0, 1.3, 1.95)))
    assert slow.verdict == "mixed"
    assert parts(slow)["time fused / BN, cnn x4"] == "not supported"
    assert parts(slow)["memory fused / BN, cnn x4"] == "supported"

    # Two seeds: no verdict.
    few = summarize(make_rows(seeds=(0, 1)))
    assert few.verdict == "inconclusive" and "only 2 seeds" in few.findings[0].reason


def test_time_verdicts_rest_on_the_ratios_measured_within_a_job():
    """Absolute times that differ 9x between jobs do not widen the CI; noisy ratios do."""
    steady = summarize(make_rows(jitter=0.0))
    finding, = steady.findings
    assert "time BN / none, mlp x1: 1.30x [1.30, 1.30] (supported)" in finding.text
    noisy = summarize(make_rows(times=(1.0, 1.05, 1.08), jitter=0.3))
    assert parts(noisy)["time BN / none, mlp x1"] == "inconclusive"  # the CI contains 1x
    assert parts(noisy)["time fused / BN, mlp x1"] == "inconclusive"  # the CI contains the 1.1x bound


def test_the_fused_time_bound_is_the_declared_param():
    rows = make_rows(times=(1.0, 1.3, 1.5), jitter=0.005)  # fused / BN = 1.15x
    assert parts(summarize(rows))["time fused / BN, mlp x1"] == "not supported"
    assert parts(summarize(rows, max_fused_time_ratio=1.2))["time fused / BN, mlp x1"] == "supported"
    rule = EXPERIMENT.rules({"max_fused_time_ratio": 1.1})["time_fused"]
    assert (rule.null, rule.direction, rule.log) == (1.1, "less", True)


# ---- one tiny run ------------------------------------------------------------------------------------


def test_a_tiny_run_measures_every_variant_side_by_side_and_reports(tmp_path):
    config = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "train.steps": 3, "train.seeds": 3, "train.batch_size": 16, "train.device": "cpu",
        "params.warmup": 1, "params.mlp_width": 8, "params.cnn_channels": 4, "params.depth": 2,
    }, parse=False)
    rows = Trainer(EXPERIMENT, config, tmp_path / "run", progress=False, jobs=1).run()
    assert len(rows) == len(VARIANTS) * len(POINTS) * 3
    for row in rows:
        p = row["probes"]
        assert len(row["round_ms"]) == 3 and p["time_ms"] > 0 and row["clock"] == "process CPU time"
        assert row["widths"] == [(8 if row["point"]["model.kind"] == "mlp" else 4) * row["point"]["params.scale"]] * 2
        expect = {"none": (1.0, None), "batch": (None, 1.0), "batch_act": (None, None)}[row["arm"]]
        assert expect[0] is None or p["saved_vs_none"] == expect[0]
        assert expect[1] is None or p["time_vs_batch"] == expect[1]
        if row["arm"] == "batch":
            assert p["saved_vs_none"] > 1.3 and p["saved_inplace_mib"] < p["saved_mib"]
        if row["arm"] == "batch_act":
            assert p["saved_vs_batch"] < 0.5 and "saved_inplace_mib" not in p
    summary = EXPERIMENT.summarize(rows, dataclasses.asdict(config))
    verdicts = parts(summary)
    assert len(verdicts) == 16
    assert all(v == "supported" for label, v in verdicts.items() if label.startswith("memory"))
    assert any("Figure 1" in n for n in summary.notes) and any("Figure 4 (peak CUDA memory) is empty" in n
                                                               for n in summary.notes)
    paths = write_report(tmp_path / "run")
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
    assert "fused / (BN + in-place)" in paths["md"].read_text()
