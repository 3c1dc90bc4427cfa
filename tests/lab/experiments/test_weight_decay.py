"""weight-decay (C15 and van Laarhoven 2017): the weight-norm measurement, the verdict rules on
hand-made metrics rows, and one tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.lab.config import ModelConfig, apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.common import log_grid
from normlab.lab.experiments.weight_decay import weight_norms
from normlab.lab.models import build_model
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["weight-decay"]
AXIS = "train.weight_decay"
GRID = log_grid(-4, -0.5, 2)  # the quick form's: 1e-4 .. 0.316, half-decade cells
WD = dict(enumerate(GRID))
GOOD, BAD = 0.95, 0.2
LR = 0.1


# ---------------------------------------------------------------------------------------------
# The measurement


def test_weight_norms_match_torch_and_give_effective_rates_only_where_a_norm_follows():
    torch.manual_seed(0)
    bn = build_model(ModelConfig(widths=[6, 5], norm="batch", activation="relu"), (4,), 3)
    plain = build_model(ModelConfig(widths=[6, 5], activation="relu"), (4,), 3)
    values = weight_norms(bn, LR)
    for i, block in enumerate(bn.blocks, start=1):
        norm = torch.linalg.matrix_norm(block.layer.weight.double()).item()
        assert values[f"weight_norm_{i}"] == pytest.approx(norm, rel=1e-12)
        assert values[f"eff_lr_{i}"] == pytest.approx(LR / norm ** 2, rel=1e-12)
    assert values["eff_lr"] == pytest.approx((values["eff_lr_1"] + values["eff_lr_2"]) / 2)
    assert values["head_weight_norm"] == pytest.approx(torch.linalg.matrix_norm(bn[-1].weight.double()).item())
    plain_values = weight_norms(plain, LR)
    assert "eff_lr" not in plain_values and "eff_lr_1" not in plain_values and "weight_norm_2" in plain_values


def test_no_effective_rate_where_eps_dominates_the_normalized_variance():
    net = build_model(ModelConfig(widths=[6, 5], norm="batch", activation="relu"), (4,), 3)
    with torch.no_grad():
        net.blocks[1].norm.running_var.fill_(50 * net.blocks[1].norm.eps)  # collapsed weights: var + eps ~ eps
    values = weight_norms(net, LR)
    assert "eff_lr_1" in values and "eff_lr_2" not in values and values["eff_lr"] == values["eff_lr_1"]
    assert "weight_norm_2" in values


def test_a_batch_norm_layer_is_scale_invariant_so_its_effective_rate_is_lr_over_norm_squared():
    """van Laarhoven's premise, checked: scaling a weight followed by BN by c leaves the output as
    it is and divides its gradient by c, so an SGD step moves w / ||w|| as with lr / c^2."""
    torch.manual_seed(1)
    net = build_model(ModelConfig(widths=[8], norm="batch", activation="relu"), (5,), 3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    w = net.blocks[0].layer.weight
    out = torch.nn.functional.cross_entropy(net(x), y)
    (g,) = torch.autograd.grad(out, w)
    with torch.no_grad():
        w.mul_(4.0)
    out4 = torch.nn.functional.cross_entropy(net(x), y)
    (g4,) = torch.autograd.grad(out4, w)
    torch.testing.assert_close(out4, out)
    torch.testing.assert_close(g4, g / 4.0)
    assert weight_norms(net, LR)["eff_lr_1"] == pytest.approx(LR / w.detach().double().norm().item() ** 2)


# ---------------------------------------------------------------------------------------------
# The rules, on hand-made rows


def make_rows(finals, eff=None, *, steps=1000):
    """Rows for ``finals = {arm: {seed: {decay: final accuracy}}}``; ``eff[(arm, seed, decay)]`` is
    the final effective learning rate (probes ``eff_lr``, and ``weight_norm = sqrt(lr / eff)``)."""
    rows = []
    for arm, per_seed in finals.items():
        for seed, by in per_seed.items():
            for wd, acc in by.items():
                for step in (0, steps):
                    probes = {"weight_norm": 3.0, "head_weight_norm": 2.0}
                    e = (eff or {}).get((arm, seed, wd))
                    if step == steps and e is not None:
                        probes.update({"eff_lr": e, "weight_norm": math.sqrt(LR / e)})
                    rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: wd}, "train_loss": 0.3,
                                 "train_loss_sd": 0.1, "test_loss": 0.3, "test_acc": 0.1 if step == 0 else acc,
                                 "wall_time": 0.0, "probes": probes})
    return rows


def scenario(trains, seeds=(0, 1, 2), lr_gain=(5.0, 4.0, 6.0)):
    """``trains = {arm: set of decays that train}``; batch's effective rate at the grid's smallest
    decay is 0.01 and at 0.01 that times ``lr_gain`` (one per seed)."""
    finals = {arm: {s: {wd: (GOOD if wd in ok else BAD) for wd in GRID} for s in seeds} for arm, ok in trains.items()}
    eff = {}
    for i, s in enumerate(seeds):
        for wd in GRID:
            eff[("batch", s, wd)] = 0.01 * (lr_gain[i] if wd == 0.01 else 1.0)
    return finals, eff


def config():
    return config_to_dict(EXPERIMENT.quick_config())


def summarize(finals, eff):
    return EXPERIMENT.summarize(make_rows(finals, eff), config())


PLAIN = {WD[0], WD[1], WD[2], WD[3]}  # 1e-4 .. 0.0316: two decades
WIDE = PLAIN | {WD[4], WD[5]}  # 1e-4 .. 0.1: three decades


def test_wider_range_and_a_larger_effective_rate_with_batch_norm_are_supported():
    summary = summarize(*scenario({"none": PLAIN, "batch": WIDE}))
    width, lr = summary.findings
    assert width.claim == lr.claim == "C15"
    assert width.verdict == "supported" and width.estimate == pytest.approx(1.0, abs=1e-3)
    assert lr.verdict == "supported" and lr.estimate == pytest.approx((5 * 4 * 6) ** (1 / 3))
    assert summary.verdict == "supported" and summary.met
    assert "1.00 decades" in summary.headline and "4.93x [" in summary.headline
    assert any(n.startswith("As claimed, batch norm trains over a wider range") for n in summary.notes)
    # Step 0 has no effective rate in these rows: the curve's first value is the final one, 0.01 * gain.
    assert ('Figure "Effective learning rate during training, decay 0.01 (batch norm)" (mean over seeds): '
            "'batch' from 0.05 at the start to 0.05 at the end.") in summary.notes
    assert not any(n.startswith('Figure "Effective learning rate during training') and "'none'" in n
                   for n in summary.notes)
    # Both ranges start at the grid's smallest decay: the difference is measured within the grid.
    assert not width.lower_bound
    assert any("reaches the same end in those seeds" in n for n in summary.notes)


def test_a_narrower_range_and_a_smaller_effective_rate_are_not_supported():
    summary = summarize(*scenario({"none": WIDE, "batch": PLAIN}, lr_gain=(0.5, 0.6, 0.55)))
    width, lr = summary.findings
    assert width.verdict == "not supported" and "opposite" in width.reason
    assert lr.verdict == "not supported" and "opposite" in lr.reason
    assert summary.verdict == "not supported"
    assert any(n.startswith("Contrary to van Laarhoven's mechanism") for n in summary.notes)
    assert any(n.startswith("Batch norm does not widen the range") for n in summary.notes)


def test_equal_ranges_with_the_mechanism_at_work_are_mixed():
    summary = summarize(*scenario({"none": PLAIN, "batch": PLAIN}))
    assert [f.verdict for f in summary.findings] == ["not supported", "supported"]
    assert summary.verdict == "mixed"


def test_a_small_rise_of_the_effective_rate_is_mixed():
    lr = summarize(*scenario({"none": PLAIN, "batch": WIDE}, lr_gain=(1.5, 1.4, 1.6))).findings[1]
    assert lr.verdict == "mixed" and "falls short of the predicted 2.00x" in lr.reason


def test_two_seeds_are_inconclusive():
    summary = summarize(*scenario({"none": PLAIN, "batch": WIDE}, seeds=(0, 1), lr_gain=(5.0, 4.0)))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[1].reason


def test_a_mechanism_decay_off_the_grid_is_inconclusive_not_an_error():
    cfg = config()
    cfg["params"]["mechanism_decay"] = 0.02
    summary = EXPERIMENT.summarize(make_rows(*scenario({"none": PLAIN, "batch": WIDE})), cfg)
    assert summary.findings[1].verdict == "inconclusive" and "not on the grid" in summary.findings[1].reason


def test_missing_arm_gives_inconclusive_not_an_error():
    finals, eff = scenario({"none": PLAIN, "batch": WIDE})
    del finals["batch"]
    summary = summarize(finals, eff)
    assert summary.verdict == "inconclusive" and "lacks" in summary.headline


# ---------------------------------------------------------------------------------------------
# Configs, figures, end to end


def test_configs_declare_the_grid_seeds_and_rules():
    quick, full = EXPERIMENT.quick_config(), EXPERIMENT.default_config()
    assert full.train.seeds >= 5 and quick.train.seeds >= 3
    assert len(full.grid[AXIS]) > len(quick.grid[AXIS]) >= 5
    for cfg in (quick, full):
        assert cfg.params["mechanism_decay"] in cfg.grid[AXIS] and cfg.params["mechanism_decay"] > min(cfg.grid[AXIS])
        assert cfg.train.optimizer == "sgd" and cfg.train.momentum == 0
    for spec in EXPERIMENT.figures:
        for axis, value in spec.where:
            assert value in quick.grid[axis] and value in full.grid[axis], spec.title
    width, lr = EXPERIMENT.rules(full.params)
    assert width.target == 0.5 and width.equivalence == 0.25 and lr.target == 2.0 and lr.log


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [12, 12], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 20, "train.device": "cpu",
    }, parse=False)
    cfg.grid = {AXIS: [0.0001, 0.01, 0.1]}
    run = tmp_path / "run"
    rows = Trainer(EXPERIMENT, cfg, run, progress=False, jobs=1).run()
    assert {(r["arm"], r["point"][AXIS], r["seed"]) for r in rows} == {
        (a, wd, s) for a in ("none", "batch") for wd in (0.0001, 0.01, 0.1) for s in (0, 1)}
    last = {(r["arm"], r["point"][AXIS], r["seed"]): r for r in rows if r["step"] == 20}
    assert "eff_lr_2" in last[("batch", 0.1, 0)]["probes"] and "eff_lr" not in last[("none", 0.1, 0)]["probes"]
    # A larger decay shrinks the weights more (same seed: same initial weights and batches).
    assert last[("batch", 0.1, 0)]["probes"]["weight_norm"] < last[("batch", 0.0001, 0)]["probes"]["weight_norm"]
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]  # 2 seeds
    assert all(len(row) == len(summary.columns) for row in summary.rows)
    paths = write_report(run)
    assert paths["html"].exists() and len(list((run / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
