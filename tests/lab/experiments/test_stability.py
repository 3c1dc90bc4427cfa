"""The stability experiment (C2): its three verdict rules on hand-made metrics rows, its
statistics' helpers, and one tiny end-to-end run with its report."""

from __future__ import annotations

import copy
import math

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.stability import accuracy_spread, loss_variation
from normlab.lab.intervals import clopper_pearson, sd_ratio_ci
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["stability"]
RATES = [0.03, 0.1, 0.3, 1.0]
STEPS, EVERY = 100, 10


def config(seeds=3, rates=RATES):
    cfg = config_to_dict(EXPERIMENT.quick_config())
    cfg["train"].update(steps=STEPS, eval_every=EVERY, seeds=seeds)
    cfg["grid"] = {"train.lr": list(rates)}
    return cfg


def job_rows(arm, rate, seed, *, cv=0.5, loss=0.1, acc=0.9, diverge_at=None):
    """One job's rows: a constant training loss ``loss`` with step-to-step SD ``cv * loss``,
    final accuracy ``acc``; with ``diverge_at``, the job stops there with a NaN loss."""
    rows = []
    for step in range(0, STEPS + 1, EVERY):
        done = diverge_at is not None and step >= diverge_at
        row = {"step": step, "arm": arm, "seed": seed, "point": {"train.lr": rate},
               "train_loss": None if step == 0 or done else loss,
               "train_loss_sd": None if step == 0 or done else cv * loss,
               "test_loss": None if done else 1.0, "test_acc": 0.1 if done else acc, "wall_time": 0.0, "probes": {}}
        if done:
            row["diverged"] = True
            rows.append(row)
            break
        rows.append(row)
    return rows


def make_rows(seeds=3, rates=RATES, *, cv=None, acc=None, diverge=None, loss=None):
    """Rows for every (arm, rate, seed). ``cv(arm, rate, seed)``, ``acc(arm, rate, seed)``,
    ``loss(arm, rate, seed)`` and ``diverge(arm, rate, seed)`` (the step it diverges at, or None)
    default to a healthy run."""
    cv = cv or (lambda arm, rate, seed: 0.5)
    loss = loss or (lambda arm, rate, seed: 0.1)
    acc = acc or (lambda arm, rate, seed: 0.9 + 0.003 * seed)
    diverge = diverge or (lambda arm, rate, seed: None)
    return [row for rate in rates for arm in ("none", "batch") for seed in range(seeds)
            for row in job_rows(arm, rate, seed, cv=cv(arm, rate, seed), acc=acc(arm, rate, seed),
                                loss=loss(arm, rate, seed), diverge_at=diverge(arm, rate, seed))]


def findings(rows, cfg=None):
    summary = EXPERIMENT.summarize(rows, cfg or config(seeds=len({r["seed"] for r in rows})))
    variation, spread, divergence = summary.findings
    return summary, variation, spread, divergence


def jitter(seed):
    return 1 + 0.05 * ((seed * 7919) % 5 - 2) / 2  # a deterministic few-percent per-seed wobble


# -- the loss-variation rule -----------------------------------------------------------------

def test_variation_supported_when_none_jitters_more():
    rows = make_rows(cv=lambda arm, rate, seed: (0.6 if arm == "none" else 0.3) * jitter(seed + rate))
    _, variation, _, _ = findings(rows)
    assert variation.verdict == "supported"
    assert variation.estimate == pytest.approx(2.0, rel=0.1)
    assert variation.low > 1.0


def test_variation_not_supported_when_bn_jitters_more():
    rows = make_rows(cv=lambda arm, rate, seed: (0.3 if arm == "none" else 0.6) * jitter(seed + rate))
    _, variation, _, _ = findings(rows)
    assert variation.verdict == "not supported"
    assert variation.high < 1.0
    assert "other side" in variation.reason


def test_variation_not_supported_when_the_arms_are_equivalent():
    rows = make_rows(cv=lambda arm, rate, seed: 0.5 * (jitter(seed) if arm == "none" else 1.0) ** 0.2)
    _, variation, _, _ = findings(rows)
    assert variation.verdict == "not supported"
    assert "band of no effect" in variation.reason


def test_variation_inconclusive_with_two_seeds():
    rows = make_rows(seeds=2, cv=lambda arm, rate, seed: 0.6 if arm == "none" else 0.3)
    summary, variation, spread, divergence = findings(rows)
    assert variation.verdict == "inconclusive" and "only 2 seeds" in variation.reason
    assert summary.verdict == "inconclusive" and not summary.met


def test_variation_inconclusive_when_the_ci_contains_one():
    rows = make_rows(cv=lambda arm, rate, seed: 0.5 * ((2.0 if seed % 2 else 0.5) if arm == "none" else 1.0))
    _, variation, _, _ = findings(rows)
    assert variation.verdict == "inconclusive"
    assert variation.low < 1.0 < variation.high


def test_diverged_pairs_are_left_out_of_the_variation_ratio():
    # Without BN every run at lr 1 diverges and, were it counted, would have no second half.
    rows = make_rows(cv=lambda arm, rate, seed: (0.6 if arm == "none" else 0.3) * jitter(seed + rate),
                     diverge=lambda arm, rate, seed: 20 if arm == "none" and rate == 1.0 else None)
    summary, variation, _, _ = findings(rows)
    assert variation.n == 3 and variation.verdict == "supported"
    assert any("lr 1 seed 0" in note and "Left out" in note for note in summary.notes)


# -- the accuracy-spread rule ----------------------------------------------------------------

def spread_acc(wide):
    def acc(arm, rate, seed):
        offsets = (-1.0, 0.2, 0.8)  # three seeds, different per rate so the pooled SD is not degenerate
        scale = 0.02 if arm == wide else 0.002
        return 0.9 + scale * offsets[(seed + RATES.index(rate)) % 3]
    return acc


def test_spread_supported_when_none_varies_more_across_seeds():
    _, _, spread, _ = findings(make_rows(acc=spread_acc("none")))
    assert spread.verdict == "supported"
    assert spread.estimate == pytest.approx(10.0, rel=1e-6)


def test_spread_not_supported_when_bn_varies_more():
    _, _, spread, _ = findings(make_rows(acc=spread_acc("batch")))
    assert spread.verdict == "not supported"


def test_spread_inconclusive_when_alike():
    def acc(arm, rate, seed):
        return 0.9 + 0.01 * ((seed + RATES.index(rate) + (arm == "none")) % 3)
    _, _, spread, _ = findings(make_rows(acc=acc))
    assert spread.verdict == "inconclusive"


def test_spread_leaves_out_diverged_runs_and_rates_one_arm_lost():
    # At lr 1 the plain network diverges in 2 of 3 seeds: that rate is left out for both arms.
    rows = make_rows(acc=spread_acc("none"),
                     diverge=lambda arm, rate, seed: 20 if arm == "none" and rate == 1.0 and seed > 0 else None)
    _, _, spread, _ = findings(rows)
    assert "pooled over lr 0.03, 0.1, 0.3" in spread.reason
    assert spread.verdict == "supported"


# -- the divergence rule ---------------------------------------------------------------------

def test_divergence_supported_when_only_none_diverges_often_enough():
    rows = make_rows(diverge=lambda arm, rate, seed: 20 if arm == "none" and rate >= 0.3 else None)
    summary, _, _, divergence = findings(rows)
    assert divergence.verdict == "supported"  # 6 of 6 discordant pairs: exact CI [0.54, 1]
    assert divergence.low > 0.5
    assert "none 6/12, batch 0/12" in summary.headline


def test_divergence_inconclusive_with_three_one_way_pairs():
    rows = make_rows(diverge=lambda arm, rate, seed: 20 if arm == "none" and rate == 1.0 else None)
    summary, _, _, divergence = findings(rows)
    assert divergence.verdict == "inconclusive"
    assert any("needs at least 6 such pairs" in note for note in summary.notes)


def test_divergence_not_supported_when_bn_diverges():
    rows = make_rows(diverge=lambda arm, rate, seed: 20 if arm == "batch" and rate >= 0.3 else None)
    _, _, _, divergence = findings(rows)
    assert divergence.verdict == "not supported"


def test_divergence_inconclusive_when_nothing_diverges():
    _, _, _, divergence = findings(make_rows())
    assert divergence.verdict == "inconclusive"
    assert "no run diverged in either arm" in divergence.reason


def test_divergence_inconclusive_when_arms_diverge_together():
    rows = make_rows(diverge=lambda arm, rate, seed: 20 if rate == 1.0 else None)
    _, _, _, divergence = findings(rows)
    assert divergence.verdict == "inconclusive" and "only together" in divergence.reason


# -- the combined verdict --------------------------------------------------------------------

def test_all_three_supported_gives_supported():
    # 3 seeds x 1 rate of one-way divergence is too few pairs; give it 6 seeds.
    rows = make_rows(seeds=6, cv=lambda arm, rate, seed: (0.6 if arm == "none" else 0.3) * jitter(seed + rate),
                     acc=spread_acc("none"),
                     diverge=lambda arm, rate, seed: 20 if arm == "none" and rate == 1.0 else None)
    summary, *parts = findings(rows)
    assert [p.verdict for p in parts] == ["supported"] * 3
    assert summary.verdict == "supported" and summary.met


def test_supported_beside_not_supported_gives_mixed():
    rows = make_rows(seeds=6, cv=lambda arm, rate, seed: (0.6 if arm == "none" else 0.3) * jitter(seed + rate),
                     acc=spread_acc("none"),
                     diverge=lambda arm, rate, seed: 20 if arm == "batch" and rate == 1.0 else None)
    summary, variation, spread, divergence = findings(rows)
    assert (variation.verdict, divergence.verdict) == ("supported", "not supported")
    assert summary.verdict == "mixed" and not summary.met


# -- notes -----------------------------------------------------------------------------------

def test_notes_say_what_the_figures_show():
    rows = make_rows(diverge=lambda arm, rate, seed: 20 if arm == "none" and rate == 1.0 else None)
    summary, *_ = findings(rows)
    assert any(note.startswith("Figures at lr 1: none: every run diverged, at steps 20, 20, 20 (its curves stop "
                               "there); batch: training loss 0.1 and step-to-step SD 0.05") for note in summary.notes)
    assert summary.rows[6][:3] == ["1", "none", "3/3"] and summary.rows[6][3] == "n/a (all diverged)"


def test_notes_flag_an_absolute_spread_that_points_the_other_way():
    # Without BN the loss is 10x lower and jitters 2x more relative to it: 5x less in absolute terms.
    rows = make_rows(cv=lambda arm, rate, seed: (0.8 if arm == "none" else 0.4) * jitter(seed + rate),
                     loss=lambda arm, rate, seed: 0.01 if arm == "none" else 0.1)
    summary, variation, _, _ = findings(rows)
    assert variation.verdict == "supported"
    assert any("absolute step-to-step SD points the other way: none / BN 0.20x" in n for n in summary.notes)
    assert summary.rows[-1][-2:] == ["0.20x", "0.10x"]


# -- helpers ---------------------------------------------------------------------------------

def test_loss_variation_is_a_ratio_of_means_over_the_second_half():
    rows = job_rows("none", 0.1, 0)
    rows[2]["train_loss_sd"] = 100.0  # step 20: first half, ignored
    rows[-1]["train_loss"], rows[-1]["train_loss_sd"] = 0.3, 0.3
    rel, absolute, level = loss_variation(rows, STEPS)
    # steps 60..100: losses 0.1 x4 and 0.3; SDs 0.05 x4 and 0.3
    assert level == pytest.approx(0.14) and absolute == pytest.approx(0.1)
    assert rel == pytest.approx(0.1 / 0.14)
    assert loss_variation(job_rows("none", 0.1, 0, diverge_at=70), STEPS) is None


def test_accuracy_spread_and_its_interval():
    sd, df = accuracy_spread([[1.0, 3.0], [2.0, 4.0, 6.0]])
    assert df == 3 and sd == pytest.approx(math.sqrt((2 + 8) / 3))
    ratio, low, high = sd_ratio_ci(2.0, 8, 1.0, 8)
    assert ratio == 2.0 and low < 2.0 < high
    assert low == pytest.approx(2.0 / math.sqrt(4.43), rel=1e-3)  # F(0.975; 8, 8) = 4.43


def test_clopper_pearson():
    assert clopper_pearson(6, 6)[1] > 0.5 > clopper_pearson(5, 5)[1]
    assert clopper_pearson(0, 4)[:2] == (0.0, 0.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(3, 2)


def test_configs_are_declared_forms():
    full, quick = EXPERIMENT.default_config(), EXPERIMENT.quick_config()
    assert full.train.seeds >= 5 and full.train.steps > quick.train.steps
    assert quick.train.seeds >= 3 and full.grid == quick.grid and len(full.grid["train.lr"]) >= 3
    assert set(full.arms) == {"none", "batch"} and full.train.optimizer == "sgd" and full.train.momentum == 0


# -- end to end ------------------------------------------------------------------------------

def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [16, 16], "train.steps": 40, "train.eval_every": 5,
        "train.seeds": 3, "train.checkpoint_every": 40, "train.device": "cpu",
    }, parse=False)
    cfg = copy.deepcopy(cfg)
    cfg.grid = {"train.lr": [0.1, 1.0]}
    run = tmp_path / "run"
    rows = Trainer(EXPERIMENT, cfg, run, progress=False, jobs=1).run()
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert len(summary.findings) == 3 and all(f.claim == "C2" for f in summary.findings)
    assert summary.verdict in ("supported", "not supported", "mixed", "inconclusive")
    assert [row[:2] for row in summary.rows[:4]] == [["0.1", "none"], ["0.1", "batch"], ["1", "none"], ["1", "batch"]]
    for row in summary.rows[:4]:
        rate, arm = float(row[0]), row[1]
        gone = sum(bool(r.get("diverged")) for r in rows if r["arm"] == arm and r["point"]["train.lr"] == rate)
        assert row[2] == f"{gone}/3"
    assert summary.findings[0].n == 3 or any("Left out" in note for note in summary.notes)
    paths = write_report(run)
    assert paths["html"].exists() and len(list((run / "figures").glob("*.png"))) == 3
