"""lr-sensitivity (C5 and Bjorck et al. 2018) on hand-made metrics rows, the grid helpers of
experiments.common, and one tiny end-to-end run."""

from __future__ import annotations

import math

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.common import (axis_widths, best_value, cell_widths, fraction_threshold, log_grid,
                                            mean_by_value, trainable_range)
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["lr-sensitivity"]
AXIS = "train.lr"
GRID = log_grid(-2.5, 1, 2)  # 0.00316 .. 10, half-decade cells (the quick form's grid)
GOOD, BAD = 0.95, 0.2  # a rate that trains / one that does not (the bar is 0.9 x the best mean)


def make_rows(finals, *, steps=400, diverged=(), curves=None):
    """Metrics rows for ``finals = {arm: {seed: {lr: final test accuracy}}}``: each job is
    evaluated at step 0 (accuracy 0.1) and at ``steps``; ``curves[(arm, seed, lr)]`` gives a job's
    ``[(step, accuracy), ...]`` instead; a job in ``diverged`` ends with ``"diverged": True``."""
    rows = []
    for arm, per_seed in finals.items():
        for seed, by_lr in per_seed.items():
            for lr, acc in by_lr.items():
                points = (curves or {}).get((arm, seed, lr), [(0, 0.1), (steps, acc)])
                for step, a in points:
                    rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: lr}, "train_loss": 0.5,
                                 "train_loss_sd": 0.1, "test_loss": 0.5, "test_acc": a, "wall_time": 0.0,
                                 "probes": {}})
                if (arm, seed, lr) in diverged:
                    rows[-1]["diverged"] = True
                    rows[-1]["train_loss"] = None
    return rows


def config(grid=GRID, steps=400):
    cfg = config_to_dict(EXPERIMENT.quick_config())
    cfg["grid"] = {AXIS: list(grid)}
    cfg["train"]["steps"] = steps
    return cfg


def scenario(trains, seeds=(0, 1, 2), best=None, bjorck_gap=0.0):
    """``trains = {arm: {seed: set of lrs that train}}`` (a set for every seed when not a dict);
    the plain network's accuracy peaks at ``best`` (default: its middle trainable rate) and
    batch norm's accuracy there is the plain network's plus ``bjorck_gap`` (a number, or one per seed)."""
    finals = {}
    for arm, spec in trains.items():
        finals[arm] = {}
        for seed in seeds:
            ok = spec[seed] if isinstance(spec, dict) else spec
            finals[arm][seed] = {lr: (GOOD if lr in ok else BAD) for lr in GRID}
    plain = sorted(trains["none"][seeds[0]] if isinstance(trains["none"], dict) else trains["none"])
    best = best if best is not None else plain[len(plain) // 2]
    for i, seed in enumerate(seeds):
        finals["none"][seed][best] = 0.96
        gap = bjorck_gap[i] if isinstance(bjorck_gap, (list, tuple)) else bjorck_gap
        finals["batch"][seed][best] = 0.96 + gap
    return finals


def summarize(finals, **kwargs):
    return EXPERIMENT.summarize(make_rows(finals, **kwargs), config())


LR = dict(enumerate(GRID))  # index -> rate, for readable scenarios
PLAIN = {LR[1], LR[2], LR[3]}  # 0.01 .. 0.1: one and a half decades
WIDE = {LR[1], LR[2], LR[3], LR[4], LR[5], LR[6]}  # 0.01 .. 3.16: three decades


# ---------------------------------------------------------------------------------------------
# experiments.common


def test_cell_widths_uniform_and_uneven_log_grids():
    assert all(w == pytest.approx(0.5, abs=1e-4) for w in cell_widths(GRID).values())
    widths = cell_widths([0.1, 1.0, 1.4142, 10.0])
    # Cells end at the geometric midpoints; the end cells reach out by half their neighbour's spacing.
    assert widths[1.0] == pytest.approx((math.log10(1.4142) + 1) / 2, abs=1e-6)
    assert widths[0.1] == pytest.approx(1.0)
    # 0.1 .. 10, plus half a decade below 0.1 and half of the 1.4142 .. 10 spacing above 10.
    assert sum(widths.values()) == pytest.approx(2 + 0.5 + (1 - math.log10(1.4142)) / 2)
    assert cell_widths([0.5]) == {0.5: 0.0}
    assert cell_widths([1.0, 3.0, 5.0], log=False) == {1.0: 2.0, 3.0: 2.0, 5.0: 2.0}


def test_cell_widths_reject_non_positive_values_on_a_log_axis():
    with pytest.raises(ValueError, match="log axis needs positive"):
        cell_widths([0.0, 1.0])


def test_trainable_range_counts_cells_of_points_at_or_above_the_bar():
    by = {0.01: 0.2, 0.1: 0.9, 1.0: None, 10.0: 0.95}
    r = trainable_range(by, 0.9, grid=[0.01, 0.1, 1.0, 10.0])
    assert (r.points, r.low, r.high, r.at_low_edge, r.at_high_edge) == (2, 0.1, 10.0, False, True)
    assert r.width == pytest.approx(2.0) and r.censored
    # A point missing from the values does not train, and does not widen its neighbours' cells.
    r = trainable_range({0.1: 0.9}, 0.9, grid=[0.01, 0.1, 1.0])
    assert r.width == pytest.approx(1.0) and not r.censored
    assert trainable_range({0.1: 0.5}, 0.9).width == 0.0


def test_threshold_best_value_and_means():
    finals = {"a": {0: {1.0: 0.8, 2.0: 0.6}, 1: {1.0: 0.6, 2.0: 0.6}}, "b": {0: {1.0: 0.9, 2.0: None}}}
    assert mean_by_value(finals["a"]) == {1.0: pytest.approx(0.7), 2.0: pytest.approx(0.6)}
    assert mean_by_value(finals["b"]) == {1.0: 0.9, 2.0: None}
    assert fraction_threshold(finals, 0.5) == pytest.approx(0.45)
    assert best_value({1.0: 0.7, 2.0: 0.7, 3.0: None}) == 1.0  # a tie goes to the smaller value
    assert best_value({1.0: None}) is None


def test_diverged_job_never_trains_whatever_accuracy_it_logged():
    finals = scenario({"none": PLAIN, "batch": WIDE})
    finals["none"][0][LR[4]] = GOOD  # a broken network that happened to log a high accuracy
    ax = axis_widths(make_rows(finals, diverged={("none", 0, LR[4])}), AXIS, 0.9, grid=GRID)
    assert ax.ranges["none"][0].points == 3
    assert ax.diverged["none"][LR[4]] == 1
    assert ax.plotted["none"][0][LR[4]] == GOOD and ax.finals["none"][0][LR[4]] is None


# ---------------------------------------------------------------------------------------------
# C5: trainable width


def test_wider_range_with_batch_norm_is_supported():
    summary = summarize(scenario({"none": PLAIN, "batch": WIDE}))
    width, bjorck = summary.findings
    assert width.claim == bjorck.claim == "C5"
    assert width.verdict == "supported" and width.estimate == pytest.approx(1.5, abs=1e-3)
    assert not width.lower_bound  # neither range reaches an end of the grid
    assert bjorck.verdict == "supported" and bjorck.statistic.startswith("Bjorck et al. 2018")
    assert summary.verdict == "supported" and summary.met
    assert "1.50 decades" in summary.headline


def test_narrower_range_with_batch_norm_is_not_supported():
    trains = {"none": WIDE, "batch": {0: PLAIN, 1: PLAIN, 2: PLAIN | {LR[4]}}}
    width = summarize(scenario(trains, best=LR[2])).findings[0]
    assert width.verdict == "not supported" and width.high < 0
    assert "opposite" in width.reason


def test_equal_ranges_are_not_supported():
    width = summarize(scenario({"none": PLAIN, "batch": PLAIN})).findings[0]
    assert width.verdict == "not supported" and width.estimate == 0 and (width.low, width.high) == (0, 0)


def test_a_small_consistent_gain_is_mixed_and_interpreted():
    summary = summarize(scenario({"none": PLAIN, "batch": PLAIN | {LR[4]}}))
    width = summary.findings[0]
    assert width.verdict == "mixed"  # half a decade wider in every seed: less than log10(5)
    assert width.estimate == pytest.approx(0.5, abs=1e-3)
    note = next(n for n in summary.notes if n.startswith("The trainable range with batch norm is not as much"))
    assert "3.16x the plain network's" in note and "below the 5x" in note


def test_two_seeds_are_inconclusive():
    summary = summarize(scenario({"none": PLAIN, "batch": WIDE}, seeds=(0, 1)))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]
    assert "only 2 seeds" in summary.findings[0].reason
    assert summary.verdict == "inconclusive" and not summary.met


def test_a_range_cut_by_the_top_of_the_grid_is_a_lower_bound():
    summary = summarize(scenario({"none": PLAIN, "batch": WIDE | {LR[7]}}))
    width = summary.findings[0]
    assert width.lower_bound and width.text.startswith("at least")
    assert any("may be understated" in n for n in summary.notes)


def test_curve_figures_are_described_in_the_notes():
    finals = scenario({"none": PLAIN, "batch": WIDE})
    curves = {("none", s, 1.0): [(0, 0.1), (25, 0.1)] for s in (0, 1, 2)}
    summary = summarize(finals, curves=curves, diverged={("none", s, 1.0) for s in (0, 1, 2)})
    note = next(n for n in summary.notes if n.startswith('Figure "Test accuracy during training at learning rate 1"'))
    assert "'none' 3 of 3 runs diverged (lines stop at step 25)" in note and "'batch' ends at 0.950" in note


def test_missing_arm_gives_inconclusive_not_an_error():
    finals = scenario({"none": PLAIN, "batch": WIDE})
    del finals["batch"]
    summary = summarize(finals)
    assert summary.verdict == "inconclusive"
    assert "lacks" in summary.headline


# ---------------------------------------------------------------------------------------------
# Bjorck et al. 2018: BN's advantage at the plain network's best rate


def test_bjorck_not_supported_when_batch_norm_keeps_its_advantage_at_the_plain_rate():
    summary = summarize(scenario({"none": PLAIN, "batch": WIDE}, bjorck_gap=[0.03, 0.032, 0.028]))
    bjorck = summary.findings[1]
    assert bjorck.verdict == "not supported" and bjorck.estimate == pytest.approx(0.03)
    assert summary.verdict == "mixed"  # C5 width supported, Bjorck not
    assert any(n.startswith("Contrary to Bjorck et al. 2018") and "+3.0 points" in n for n in summary.notes)


def test_bjorck_inconclusive_when_the_interval_straddles_the_band():
    bjorck = summarize(scenario({"none": PLAIN, "batch": WIDE}, bjorck_gap=[0.0, 0.02, 0.005])).findings[1]
    assert bjorck.verdict == "inconclusive"


def test_bjorck_share_of_the_advantage_left_is_reported():
    finals = scenario({"none": PLAIN, "batch": WIDE}, bjorck_gap=0.002)
    for seed in (0, 1, 2):
        finals["batch"][seed][LR[5]] = 0.98  # BN's own best rate, 2 points above the plain network's best
    summary = summarize(finals)
    note = next(n for n in summary.notes if n.startswith("Bjorck"))
    assert "+0.2 points" in note and "+2.0 points" in note and "10% of its advantage" in note
    assert any(row[0].startswith(f"BN advantage at lr {LR[5]:.3g}") for row in summary.rows)


def test_bjorck_share_is_not_read_when_batch_norm_has_no_advantage_at_its_own_best_rate():
    finals = scenario({"none": PLAIN, "batch": WIDE}, bjorck_gap=[-0.002, 0.0, 0.001])
    summary = summarize(finals)
    note = next(n for n in summary.notes if n.startswith("Bjorck"))
    assert "of its advantage is left" not in note and "not distinguishable from none" in note


def test_steps_to_target_at_each_arm_best_rate():
    finals = scenario({"none": PLAIN, "batch": WIDE})
    for seed in (0, 1, 2):
        finals["batch"][seed][LR[5]] = 0.97  # BN's best rate
    curves = {}
    for seed in (0, 1, 2):
        curves[("none", seed, LR[2])] = [(0, 0.1), (100, 0.5), (200, 0.93), (400, 0.96)]
        curves[("batch", seed, LR[5])] = [(0, 0.1), (100, 0.93), (200, 0.95), (400, 0.97)]
    summary = summarize(finals, curves=curves)
    note = next(n for n in summary.notes if n.startswith("Steps to"))
    assert "BN at its best rate 1: 2.00x" in note and "BN at the plain network's best rate 0.0316: 0.50x" in note
    assert "none of batch norm's speed-up is left" in note
    assert summary.rows[0][5] == "200 (3/3 seeds)" and summary.rows[1][5] == "100 (3/3 seeds)"
    # Batch norm as fast at the plain network's rate as at its own: all of its speed-up is left there.
    for seed in (0, 1, 2):
        curves[("batch", seed, LR[2])] = [(0, 0.1), (100, 0.93), (400, 0.96)]
    note = next(n for n in summarize(finals, curves=curves).notes if n.startswith("Steps to"))
    assert "100% of batch norm's speed-up (in log terms) is left" in note and "not only the larger rate" in note


def test_no_speed_up_is_reported_for_a_network_that_never_reached_the_target():
    finals = scenario({"none": PLAIN, "batch": WIDE})
    for s in (0, 1, 2):  # the plain network trains (bar 0.864) but never reaches the target (0.912)
        finals["none"][s] = {lr: (0.9 if v > 0.5 else v) for lr, v in finals["none"][s].items()}
    summary = summarize(finals)
    assert summary.findings[0].verdict == "supported"
    assert "speed" not in summary.headline and "fewer steps" not in summary.headline
    assert summary.rows[0][5] == "never (>400)"
    note = next(n for n in summary.notes if n.startswith("Steps to"))
    assert "no speed-up to report" in note and "never reached the target at its best rate in 3 seed(s)" in note


# ---------------------------------------------------------------------------------------------
# Configs, figures, end to end


def test_configs_declare_the_grid_seeds_and_rules():
    quick, full = EXPERIMENT.quick_config(), EXPERIMENT.default_config()
    assert full.train.seeds >= 5 and quick.train.seeds >= 3
    assert len(full.grid[AXIS]) > len(quick.grid[AXIS]) >= 5
    assert full.train.optimizer == quick.train.optimizer == "sgd" and full.train.momentum == 0
    for spec in EXPERIMENT.figures:
        for axis, value in spec.where:
            assert value in quick.grid[axis] and value in full.grid[axis], spec.title
    width, bjorck = EXPERIMENT.rules(full.params)
    assert width.target == pytest.approx(math.log10(5), abs=1e-3) and bjorck.direction == "equivalent"


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [16, 16], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 20, "train.device": "cpu",
    }, parse=False)
    cfg.grid = {AXIS: [0.03162, 0.1, 1.0]}
    run = tmp_path / "run"
    rows = Trainer(EXPERIMENT, cfg, run, progress=False, jobs=1).run()
    assert {(r["arm"], r["point"][AXIS], r["seed"]) for r in rows} == {
        (a, lr, s) for a in ("none", "batch") for lr in (0.03162, 0.1, 1.0) for s in (0, 1)}
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert [f.verdict for f in summary.findings] == ["inconclusive", "inconclusive"]  # 2 seeds
    assert len(summary.rows[0]) == len(summary.columns)
    paths = write_report(run)
    assert paths["html"].exists() and len(list((run / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
