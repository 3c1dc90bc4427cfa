"""init-scale (C4) on hand-made metrics rows, and one tiny end-to-end run."""

from __future__ import annotations

import math

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.init_scale import STANDARD_GAINS
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["init-scale"]
AXIS = "model.init_gain"
GRID = EXPERIMENT.quick_config().grid[AXIS]  # 0.01 .. 100 in half decades, plus 0.5774 and 1.4142
G = {f"{g:g}": g for g in GRID}
STANDARD = {G["0.5774"], G["1"], G["1.4142"]}
GOOD, BAD = 0.95, 0.1


def make_rows(finals, *, steps=400, diverged=()):
    """Metrics rows for ``finals = {arm: {seed: {gain: final test accuracy}}}``, each job evaluated
    at step 0 (accuracy 0.1) and at ``steps``; a job in ``diverged`` ends with ``"diverged": True``."""
    rows = []
    for arm, per_seed in finals.items():
        for seed, by_gain in per_seed.items():
            for gain, acc in by_gain.items():
                for step, a in ((0, 0.1), (steps, acc)):
                    rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: gain}, "train_loss": 0.5,
                                 "train_loss_sd": 0.1, "test_loss": 0.5, "test_acc": a, "wall_time": 0.0,
                                 "probes": {}})
                if (arm, seed, gain) in diverged:
                    rows[-1]["diverged"] = True
    return rows


def scenario(trains, seeds=(0, 1, 2)):
    """``trains = {arm: set of gains that train}`` or ``{arm: {seed: set}}``."""
    return {arm: {s: {g: (GOOD if g in (spec[s] if isinstance(spec, dict) else spec) else BAD) for g in GRID}
                  for s in seeds} for arm, spec in trains.items()}


def summarize(finals, **kwargs):
    cfg = config_to_dict(EXPERIMENT.quick_config())
    return EXPERIMENT.summarize(make_rows(finals, **kwargs), cfg)


BN_WIDE = {g for g in GRID if 0.03 < g < 5}  # 0.0316 .. 3.16: not touching the grid's ends


def test_standard_gains_are_on_both_grids_and_marked():
    quick, full = EXPERIMENT.quick_config(), EXPERIMENT.default_config()
    gains = [g for g, _, _ in STANDARD_GAINS]
    assert gains == pytest.approx([1 / math.sqrt(3), 1.0, math.sqrt(2)], abs=1e-4)
    for g in gains:
        assert g in quick.grid[AXIS] and g in full.grid[AXIS]
    (fig, *curves) = EXPERIMENT.figures
    assert fig.kind == "grid" and fig.axis == AXIS and [x for x, _ in fig.marks] == gains
    for spec in curves:
        for axis, value in spec.where:
            assert value in quick.grid[axis] and value in full.grid[axis], spec.title
    assert full.train.seeds >= 5 and len(full.grid[AXIS]) > len(quick.grid[AXIS])
    assert quick.grid[AXIS] == sorted(quick.grid[AXIS])


def test_wider_range_with_batch_norm_is_supported():
    summary = summarize(scenario({"none": STANDARD, "batch": BN_WIDE}))
    (finding,) = summary.findings
    assert finding.claim == "C4" and finding.verdict == "supported" and summary.met
    # Cells end at geometric midpoints: batch from between 0.01 and 0.0316 to between 3.162 and 10
    # (2.5 decades), none from between 0.3162 and 0.5774 to between 1.4142 and 3.162.
    none_width = math.log10(math.sqrt(1.4142 * 3.162)) - math.log10(math.sqrt(0.3162 * 0.5774))
    assert finding.estimate == pytest.approx(2.5 - none_width, abs=1e-3)
    assert not finding.lower_bound


def test_standard_gain_accuracies_are_in_the_table():
    finals = scenario({"none": STANDARD, "batch": BN_WIDE})
    for s in (0, 1, 2):
        finals["none"][s][G["0.5774"]] = 0.90
    summary = summarize(finals)
    columns = summary.columns
    assert [c for c in columns if c.startswith("final accuracy at")] == [
        f"final accuracy at {name} [95% CI]" for _, _, name in STANDARD_GAINS]
    none_row = summary.rows[0]
    assert none_row[columns.index("final accuracy at torch default (1/sqrt 3) [95% CI]")].startswith("0.9000")
    assert none_row[columns.index("final accuracy at He (sqrt 2) [95% CI]")].startswith("0.9500")


def test_narrower_range_with_batch_norm_is_not_supported():
    finding = summarize(scenario({"none": BN_WIDE, "batch": {0: STANDARD, 1: STANDARD,
                                                             2: STANDARD | {G["3.162"]}}})).findings[0]
    assert finding.verdict == "not supported" and finding.high < 0


def test_a_small_consistent_gain_is_mixed_and_interpreted():
    summary = summarize(scenario({"none": STANDARD, "batch": STANDARD | {G["3.162"]}}))
    finding = summary.findings[0]
    assert finding.verdict == "mixed" and 0 < finding.estimate < 1  # one cell wider, under a decade
    assert any(n.startswith("The range of initial scales that trains is not as much wider") for n in summary.notes)


def test_two_seeds_are_inconclusive():
    summary = summarize(scenario({"none": STANDARD, "batch": BN_WIDE}, seeds=(0, 1)))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason


def test_diverged_runs_do_not_train_and_are_counted():
    finals = scenario({"none": STANDARD | {G["3.162"]}, "batch": BN_WIDE})
    diverged = {("none", s, G["3.162"]) for s in (0, 1, 2)}
    summary = summarize(finals, diverged=diverged)
    assert summary.rows[0][1] == "0.577 .. 1.41" and summary.rows[0][-1] == f"3/{3 * len(GRID)}"
    assert any("3 of" in n and "diverged" in n for n in summary.notes if n.startswith("'none' at gains above"))


def test_a_range_at_the_end_of_the_grid_is_a_lower_bound():
    summary = summarize(scenario({"none": STANDARD, "batch": {g for g in GRID if g < 5}}))
    finding = summary.findings[0]
    assert finding.lower_bound and finding.text.startswith("at least")
    assert any("may be understated" in n for n in summary.notes)


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [16, 16], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 20, "train.device": "cpu",
    }, parse=False)
    cfg.grid = {AXIS: [0.1, 1.0, 10.0]}
    run = tmp_path / "run"
    rows = Trainer(EXPERIMENT, cfg, run, progress=False, jobs=1).run()
    assert {(r["arm"], r["point"][AXIS], r["seed"]) for r in rows} == {
        (a, g, s) for a in ("none", "batch") for g in (0.1, 1.0, 10.0) for s in (0, 1)}
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert summary.verdict == "inconclusive"  # 2 seeds
    # Only LeCun's gain (1.0) is on this grid: the table shows that column alone and says so.
    assert [c for c in summary.columns if c.startswith("final accuracy at")] == [
        "final accuracy at LeCun / Xavier (1) [95% CI]"]
    assert any("not on this run's grid" in n for n in summary.notes)
    paths = write_report(run)
    assert paths["md"].exists() and len(list((run / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
