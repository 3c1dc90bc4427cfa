"""vanishing-gradients (C7): the verdict rule on hand-made metrics rows, the gradient-norm probe,
and one tiny end-to-end run."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.config import ModelConfig, apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.models import build_model
from normlab.lab.probes import grad_norm_probe
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["vanishing-gradients"]
DEPTH = 4
ACTS = ("sigmoid", "tanh")


def config(depth=DEPTH):
    cfg = config_to_dict(EXPERIMENT.quick_config())
    cfg["model"]["widths"] = [16] * depth
    cfg["train"]["steps"] = 20
    return cfg


def profile(ratio, depth=DEPTH):
    """Gradient norms g_1..g_D falling (ratio < 1) or growing geometrically, with g_1/g_D = ratio."""
    return [ratio ** ((depth - i) / (depth - 1)) for i in range(1, depth + 1)]


def make_rows(ratios, seeds=(0, 1, 2), depth=DEPTH, jitter=0.1):
    """Rows for ``ratios = {(activation, arm): (g_1/g_D at init, g_1/g_D at the end)}``: each job is
    evaluated at steps 0 (no gradients yet), 10 and 20 (both with the init profile, as the probe
    records it); seed k multiplies the ratios by 10**(jitter * (k - 1)) so seeds differ."""
    rows = []
    for (act, arm), (at_init, at_end) in ratios.items():
        for k, seed in enumerate(seeds):
            f = 10 ** (jitter * (k - 1) * (1 if arm == "batch" else -1))
            init = {f"grad_norm_init_{i}": v for i, v in enumerate(profile(at_init * f, depth), 1)}
            for step, ratio in ((0, None), (10, (at_init + at_end) / 2), (20, at_end)):
                probes = {} if ratio is None else {
                    **init, **{f"grad_norm_{i}": v for i, v in enumerate(profile(ratio * f, depth), 1)}}
                rows.append({"step": step, "arm": arm, "seed": seed, "point": {"model.activation": act},
                             "train_loss": 1.0, "train_loss_sd": 0.1, "test_loss": 1.0,
                             "test_acc": 0.1 if step == 0 else (0.9 if arm == "batch" else 0.5),
                             "wall_time": 0.0, "probes": probes})
    return rows


def both(plain, bn):
    """The same (init, end) ratios for both activations."""
    return {**{(a, "none"): plain for a in ACTS}, **{(a, "batch"): bn for a in ACTS}}


def test_rule_supported_when_bn_recovers_decades():
    summary = EXPERIMENT.summarize(make_rows(both((1e-5, 1e-4), (1.0, 2.0))), config())
    assert summary.verdict == "supported" and summary.met
    (finding,) = summary.findings
    assert finding.claim == "C7" and finding.verdict == "supported"
    assert "5.0 decades" in summary.headline and "4.3 decades" in summary.headline


def test_rule_not_supported_when_bn_makes_it_worse():
    summary = EXPERIMENT.summarize(make_rows(both((1.0, 1.0), (1e-2, 1e-2))), config())
    assert summary.verdict == "not supported" and not summary.met
    assert "other side" in summary.findings[0].reason


def test_rule_mixed_when_easing_falls_short_of_a_decade():
    summary = EXPERIMENT.summarize(make_rows(both((1e-2, 1e-2), (3e-2, 3e-2)), jitter=0.02), config())
    assert summary.verdict == "mixed"
    assert "falls short" in summary.findings[0].reason


def test_rule_mixed_when_activations_disagree():
    ratios = {("sigmoid", "none"): (1e-6, 1e-6), ("sigmoid", "batch"): (1.0, 1.0),
              ("tanh", "none"): (1.0, 1.0), ("tanh", "batch"): (1e-2, 1e-2)}
    summary = EXPERIMENT.summarize(make_rows(ratios), config())
    assert summary.verdict == "mixed"
    reason = summary.findings[0].reason
    assert re.search(r"sigmoid, at initialization: supported", reason)
    assert re.search(r"tanh, at initialization: not supported", reason)


def test_rule_inconclusive_with_two_seeds():
    summary = EXPERIMENT.summarize(make_rows(both((1e-5, 1e-4), (1.0, 2.0)), seeds=(0, 1)), config())
    assert summary.verdict == "inconclusive"
    assert "only 2 seeds" in summary.findings[0].reason


def test_rule_inconclusive_without_gradients():
    rows = [dict(r, probes={}) for r in make_rows(both((1e-5, 1e-4), (1.0, 2.0)))]
    summary = EXPERIMENT.summarize(rows, config())
    assert summary.verdict == "inconclusive"
    assert "nothing could be measured" in summary.findings[0].reason


def test_notes_describe_profiles_and_diverged_jobs():
    rows = make_rows(both((1e-5, 1e-4), (3.0, 2.0)))
    last = max((r for r in rows if r["arm"] == "none" and r["seed"] == 2 and r["point"]["model.activation"] == "tanh"),
               key=lambda r: r["step"])
    last["diverged"] = True
    summary = EXPERIMENT.summarize(rows, config())
    text = " ".join(summary.notes)
    assert "none: falls by 5.0 decades" in text and "batch: grows by 0.5 decades" in text
    assert "seed 2 diverged" in text
    # The diverged seed has no end-of-training easing: the end finding rests on 2 seeds (inconclusive).
    assert summary.verdict == "inconclusive"


def test_rules_are_declared_from_params():
    rules = EXPERIMENT.rules({"min_easing": 100.0}, ["sigmoid"])
    assert set(rules) == {("sigmoid", "init"), ("sigmoid", "end")}
    assert rules[("sigmoid", "init")].target == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# The probe


def _step(net, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()


def test_probe_keeps_the_first_backward_and_reads_the_last():
    torch.manual_seed(0)
    net = build_model(ModelConfig(widths=[8, 8, 8]), (1, 4, 4), 3)
    read, remove = grad_norm_probe("g").attach(net)
    assert read() == {}  # the step-0 evaluation comes before any backward
    _step(net, 1)
    first = [float(b.layer.weight.grad.norm()) for b in net.blocks]
    _step(net, 2)
    last = [float(b.layer.weight.grad.norm()) for b in net.blocks]
    values = read()
    assert [values[f"g_init_{i}"] for i in (1, 2, 3)] == pytest.approx(first)
    assert [values[f"g_{i}"] for i in (1, 2, 3)] == pytest.approx(last)
    assert first != pytest.approx(last)
    _step(net, 3)
    assert sorted(read()) == ["g_1", "g_2", "g_3"]  # reported once: a resumed job's rows match
    remove()


def test_probe_of_a_resumed_job_records_no_init_values():
    net = build_model(ModelConfig(widths=[8, 8]), (1, 4, 4), 3)
    read, remove = grad_norm_probe("g").attach(net)
    _step(net, 1)  # a resumed job's first evaluation comes after a backward: not the initial weights
    assert sorted(read()) == ["g_1", "g_2"]
    remove()


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [12, 12, 12], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 10, "train.device": "cpu",
    }, parse=False)
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert len(rows) == 2 * 2 * 2 * 3  # arms x activations x seeds x evaluations
    for row in rows:
        keys = set(row["probes"])
        if row["step"] == 0:
            assert keys == set()
        elif row["step"] == 10:  # the first evaluation after the first step: the init values, once
            assert keys == {f"grad_norm_{i}" for i in (1, 2, 3)} | {f"grad_norm_init_{i}" for i in (1, 2, 3)}
        else:
            assert keys == {f"grad_norm_{i}" for i in (1, 2, 3)}
        assert all(v > 0 and math.isfinite(v) for v in row["probes"].values())
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    assert [r[:2] for r in summary.rows[:2]] == [["sigmoid", "none"], ["sigmoid", "batch"]]
    report = write_report(tmp_path / "run")
    assert report["html"].exists() and "C7" in report["md"].read_text()
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
    assert len(figures) == len(EXPERIMENT.figures)
