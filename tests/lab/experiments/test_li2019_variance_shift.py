"""li2019-variance-shift (C14): the variance-shift measurement against a float64 oracle and
against dropout's known effect, the verdict rules on hand-made metrics rows, one tiny run."""

from __future__ import annotations

import pytest
import torch

from normlab.lab.config import ModelConfig, apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments._variance_shift import variance_shift
from normlab.lab.models import build_model
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["li2019-variance-shift"]
AXIS = "model.dropout"
RATES = (0.0, 0.2, 0.5)
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# The measurement


def test_variance_shift_matches_a_float64_oracle():
    torch.manual_seed(0)
    net = build_model(ModelConfig(widths=[5, 4], norm="batch", activation="relu"), (3,), 2)
    with torch.no_grad():
        net.blocks[0].norm.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0, 1e-9]))
        net.blocks[1].norm.running_var.copy_(torch.tensor([1.0, 3.0, 0.25, 2.0]))
    net.eval()
    x = torch.randn(300, 3)
    values = variance_shift(net, x, chunk=70)  # chunks must not change the whole-set variance
    with torch.no_grad():
        h1 = net.blocks[0].layer(x).double()
        h2 = net.blocks[1].layer(net.blocks[0](x)).double()
    expected = {}
    for i, (h, norm) in enumerate(((h1, net.blocks[0].norm), (h2, net.blocks[1].norm)), start=1):
        v = h.numpy().var(axis=0, ddof=1)
        r = norm.running_var.double().numpy()
        a = (r + norm.eps) / (v + norm.eps)
        expected[f"var_shift_{i}"] = float(sum(max(x, 1 / x) for x in a) / len(a))
        expected[f"var_ratio_{i}"] = float(torch.tensor(a).log().mean().exp())
    for key, want in expected.items():
        assert values[key] == pytest.approx(want, rel=1e-9), key
    assert values["var_shift"] == pytest.approx(expected["var_shift_2"])  # the norms after the first


def test_variance_shift_of_a_cnn_pools_positions_and_a_plain_model_has_none():
    torch.manual_seed(1)
    net = build_model(ModelConfig(kind="cnn", widths=[3], norm="batch", activation="relu"), (1, 6, 6), 2).eval()
    x = torch.randn(40, 1, 6, 6)
    with torch.no_grad():
        v = net.blocks[0].layer(x).double().transpose(0, 1).reshape(3, -1).var(dim=1)
    a = (1.0 + net.blocks[0].norm.eps) / (v + net.blocks[0].norm.eps)  # running var at its init, 1
    assert variance_shift(net, x)["var_shift_1"] == pytest.approx(float(torch.maximum(a, 1 / a).mean()))
    assert variance_shift(build_model(ModelConfig(widths=[4]), (3,), 2).eval(), torch.randn(5, 3)) == {}


def test_variance_shift_needs_eval_mode():
    net = build_model(ModelConfig(widths=[4], norm="batch"), (3,), 2)
    with pytest.raises(ValueError, match="must be in eval mode"):
        variance_shift(net, torch.randn(8, 3))


def _shift_after_training_passes(position: str) -> dict[str, float]:
    torch.manual_seed(0)
    net = build_model(ModelConfig(widths=[64, 64], norm="batch", activation="relu", dropout=0.5,
                                  dropout_position=position), (32,), 3)
    for block in net.blocks:
        block.norm.momentum = None  # a cumulative average: the running variance of many batches, no EMA noise
    data = torch.randn(4096, 32)
    net.train()
    with torch.no_grad():
        for batch in data.split(256):
            net(batch)
    return variance_shift(net.eval(), data)


def test_dropout_before_a_batch_norm_shifts_its_variance_and_dropout_at_the_head_does_not():
    """Li et al.'s mechanism, without training: the second norm gathers its running variance with
    dropout 0.5 before it (block) or with none (head), and meets the same inputs without dropout."""
    block, head = _shift_after_training_passes("block"), _shift_after_training_passes("head")
    assert block["var_ratio_2"] > 1.3 and block["var_shift_2"] > 1.3  # running var above the test-time var
    assert head["var_shift_2"] < 1.05 and block["var_shift_1"] < 1.05  # no dropout before these norms
    assert block["var_shift"] == block["var_shift_2"]


# ---------------------------------------------------------------------------------------------
# The rules, on hand-made rows


def make_rows(acc, shift=None, *, steps=1500, recovered=0.0):
    """Rows for ``acc = {(arm, rate): {seed: final accuracy}}`` and ``shift = {(arm, rate): {seed:
    variance shift of the norms after the first}}`` (bn arms only): each job is evaluated at step 0
    and at ``steps``; the final row carries the per-layer profile 1, S, S, S and the accuracy with
    recomputed statistics, ``recovered`` (points) above the accuracy in bn-block at rate 0.5."""
    rows = []
    for (arm, rate), by_seed in acc.items():
        for seed, a in by_seed.items():
            for step in (0, steps):
                probes = {}
                s = (shift or {}).get((arm, rate), {}).get(seed)
                if s is not None and step == steps:
                    probes = {"var_shift": s, "var_shift_1": 1.0, "var_ratio_1": 1.0}
                    for i in (2, 3, 4):
                        probes.update({f"var_shift_{i}": s, f"var_ratio_{i}": s})
                    probes["test_acc_recal"] = a + (recovered / 100 if (arm, rate) == ("bn-block", 0.5) else 0.0)
                rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: rate}, "train_loss": 0.3,
                             "train_loss_sd": 0.1, "test_loss": 0.3, "test_acc": 0.1 if step == 0 else a,
                             "wall_time": 0.0, "probes": probes})
    return rows


def scenario(head_minus_block, shift_block, shift_head=(1.02, 1.03, 1.01), seeds=SEEDS, none_gap=(0.0, 0.0, 0.0)):
    """Accuracies and shifts at every rate: at 0 all arms alike; at 0.2 half the rate-0.5 effects;
    at 0.5 bn-head = 0.95 and bn-block = 0.95 - gap (per seed, in points)."""
    acc, shift = {}, {}
    for rate in RATES:
        k = rate / 0.5
        for arm in ("bn-block", "bn-head", "none-block", "none-head"):
            acc[(arm, rate)] = {}
            for i, s in enumerate(seeds):
                gap = {"bn-block": head_minus_block[i], "none-block": none_gap[i]}.get(arm, 0.0)
                acc[(arm, rate)][s] = 0.95 - k * gap / 100
        shift[("bn-block", rate)] = {s: 1 + k * (shift_block[i] - 1) for i, s in enumerate(seeds)}
        shift[("bn-head", rate)] = {s: shift_head[i] for i, s in enumerate(seeds)}
    return acc, shift


def config():
    return config_to_dict(EXPERIMENT.quick_config())


def summarize(acc, shift, **kwargs):
    return EXPERIMENT.summarize(make_rows(acc, shift, **kwargs), config())


def test_block_dropout_costing_accuracy_with_a_variance_shift_is_supported():
    summary = summarize(*scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7)))
    acc, shift = summary.findings
    assert acc.claim == shift.claim == "C14"
    assert acc.verdict == "supported" and acc.estimate == pytest.approx(3.0)
    assert shift.verdict == "supported" and shift.estimate == pytest.approx(1.56, abs=0.02)
    assert summary.verdict == "supported" and summary.met
    assert "in every block): 3.00 pts [" in summary.headline and "at the head: 1.57x [" in summary.headline
    # No recalibration gain in these rows (recovered=0): the shift does not explain the gap.
    assert any(n.startswith("Both parts hold, as the rules ask, but the recalibration check separates them")
               for n in summary.notes)
    explained = summarize(*scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7)), recovered=2.5)
    assert any(n.startswith("Both parts agree with Li et al.") for n in explained.notes)
    profile = next(n for n in summary.notes if n.startswith('Figure "Variance shift per batch norm'))
    assert "bn-block: layer 1 1.000, layer 2 1.600" in profile and "the running variance is the larger, as dropout" in profile and "floor" in profile
    # The gap at the other rate is reported, without a rule.
    assert ["bn: head - block", "0.2", "", "", "", "+1.20 [+0.70, +1.70] pts"] in summary.rows  # 0.4 x the gap at 0.5


def test_no_accuracy_gap_and_an_opposite_shift_are_not_supported():
    summary = summarize(*scenario((0.1, -0.1, 0.05), (0.95, 0.96, 0.94), shift_head=(1.02, 1.02, 1.02)))
    acc, shift = summary.findings
    assert acc.verdict == "not supported" and "band of no effect" in acc.reason
    assert shift.verdict == "not supported" and "opposite" in shift.reason
    assert summary.verdict == "not supported" and not summary.met


def test_a_shift_without_an_accuracy_cost_is_mixed_and_interpreted():
    summary = summarize(*scenario((0.1, -0.1, 0.05), (1.6, 1.5, 1.7)))
    assert [f.verdict for f in summary.findings] == ["not supported", "supported"]
    assert summary.verdict == "mixed"
    assert any(n.startswith("The variance shift Li et al. describe is there") for n in summary.notes)


def test_a_small_consistent_gap_is_mixed():
    acc = summarize(*scenario((0.6, 0.7, 0.65), (1.6, 1.5, 1.7))).findings[0]
    assert acc.verdict == "mixed" and "falls short of the predicted 1.00 pts" in acc.reason


def test_the_no_norm_control_is_read_in_the_notes():
    summary = summarize(*scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7), none_gap=(3.0, 2.6, 3.3)))
    note = next(n for n in summary.notes if n.startswith("Control without batch norm"))
    assert "by +2.97 points" in note and "comes from the amount of dropout" in note
    note = next(n for n in summarize(*scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7))).notes
                if n.startswith("Control without batch norm"))
    assert "Batch norm widens the gap" in note


def test_the_recalibration_check_says_how_much_of_the_gap_is_the_shift():
    acc, shift = scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7))
    most = summarize(acc, shift, recovered=2.5)
    note = next(n for n in most.notes if n.startswith("Li et al.'s check"))
    assert "by +2.50 points" in note and "83% of its gap" in note and "most of the gap is the variance shift" in note
    assert ["bn-block: recalibrated - as trained", "0.5", "", "", "", "+2.50 [+2.50, +2.50] pts"] in most.rows
    part = next(n for n in summarize(acc, shift, recovered=0.5).notes if n.startswith("Li et al.'s check"))
    assert "17% of its gap" in part and "only part of the gap" in part
    rows = make_rows(acc, shift, recovered=0.0)
    for r in rows:  # recovered 0.4, 0, -0.4 points over the seeds: a CI around 0
        if r["arm"] == "bn-block" and r["point"][AXIS] == 0.5 and r["step"]:
            r["probes"]["test_acc_recal"] += {0: 0.004, 1: 0.0, 2: -0.004}[r["seed"]]
    none = next(n for n in EXPERIMENT.summarize(rows, config()).notes if n.startswith("Li et al.'s check"))
    assert "can be told from none" in none


def test_two_seeds_are_inconclusive():
    summary = summarize(*scenario((3.0, 2.5), (1.6, 1.5), shift_head=(1.0, 1.0), seeds=(0, 1), none_gap=(0, 0)))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]
    assert "only 2 seeds" in summary.findings[0].reason and summary.verdict == "inconclusive"


def test_a_missing_arm_is_inconclusive_not_an_error():
    acc, shift = scenario((3.0, 2.5, 3.5), (1.6, 1.5, 1.7))
    acc = {k: v for k, v in acc.items() if k[0] != "bn-head"}
    summary = summarize(acc, {k: v for k, v in shift.items() if k[0] != "bn-head"})
    assert summary.verdict == "inconclusive" and "lacks bn-head or bn-block" in summary.headline


# ---------------------------------------------------------------------------------------------
# Configs, figures, end to end


def test_configs_declare_the_rates_arms_and_rules():
    quick, full = EXPERIMENT.quick_config(), EXPERIMENT.default_config()
    assert full.train.seeds >= 5 and quick.train.seeds >= 3
    for cfg in (quick, full):
        assert 0.0 in cfg.grid[AXIS] and cfg.params["rate"] in cfg.grid[AXIS]
        assert {a: b["model.dropout_position"] for a, b in cfg.arms.items()} == {
            "bn-block": "block", "bn-head": "head", "none-block": "block", "none-head": "head"}
    for spec in EXPERIMENT.figures:
        for axis, value in spec.where:
            assert value in quick.grid[axis] and value in full.grid[axis], spec.title
    acc, shift = EXPERIMENT.rules(full.params)
    assert acc.target == 1.0 and acc.equivalence == 0.5 and shift.target == 1.1 and shift.log


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [12, 12], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 20, "train.device": "cpu",
    }, parse=False)
    cfg.grid = {AXIS: [0.0, 0.5]}
    run = tmp_path / "run"
    rows = Trainer(EXPERIMENT, cfg, run, progress=False, jobs=1).run()
    assert {(r["arm"], r["point"][AXIS], r["seed"]) for r in rows} == {
        (a, p, s) for a in cfg.arms for p in (0.0, 0.5) for s in (0, 1)}
    last = {(r["arm"], r["point"][AXIS], r["seed"]): r for r in rows if r["step"] == 20}
    assert {"var_shift_1", "var_shift_2", "var_shift"} <= set(last[("bn-block", 0.5, 0)]["probes"])
    assert "var_shift" not in last[("none-block", 0.5, 0)]["probes"]
    # At rate 0 the two positions are one network: same weights, batches, accuracy.
    assert last[("bn-block", 0.0, 1)]["test_acc"] == last[("bn-head", 0.0, 1)]["test_acc"]
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]  # 2 seeds
    assert all(len(row) == len(summary.columns) for row in summary.rows)
    paths = write_report(run)
    assert paths["html"].exists() and len(list((run / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
