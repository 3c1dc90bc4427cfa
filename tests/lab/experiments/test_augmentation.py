"""augmentation's declared rule (C16: the gain from augmentation, batch norm's minus no norm's) on
hand-made metrics rows, and a tiny end-to-end run."""

from __future__ import annotations

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["augmentation"]
CONFIG = config_to_dict(EXPERIMENT.quick_config())  # grid data.augment none / shift+rotate, band 1 pt
JITTER = (0.0, 0.002, -0.002, 0.001, -0.001)


def rows(test: dict[tuple[str, str], float], seeds: int = 3, jitter=JITTER):
    """Rows where (arm, augment) ends at test accuracy ``test[...]`` plus a per-seed jitter (of
    opposite sign for augmented batch norm, so that paired gains vary over seeds)."""
    out = []
    for (arm, aug), acc in test.items():
        sign = -1 if (arm, aug) == ("batch", "shift+rotate") else 1
        for seed in range(seeds):
            for step, te in ((0, 0.1), (400, acc - 0.05), (800, acc + sign * jitter[seed])):
                out.append({"step": step, "arm": arm, "seed": seed, "point": {"data.augment": aug},
                            "train_loss": 0.1, "test_acc": te, "train_acc": 1.0, "train_test_gap": 1.0 - te})
    return out


def test_supported_when_batch_norm_gains_more_from_augmentation():
    summary = EXPERIMENT.summarize(rows({("none", "none"): 0.85, ("none", "shift+rotate"): 0.87,
                                         ("batch", "none"): 0.85, ("batch", "shift+rotate"): 0.90}), CONFIG)
    (finding,) = summary.findings
    assert finding.verdict == "supported" and finding.estimate == pytest.approx(3.0) and summary.met
    assert "batch norm gains more (+5.0 vs +2.0 pts)" in " ".join(summary.notes)
    assert summary.rows[1][0] == "batch" and summary.rows[1][-1].startswith("+5.0")


def test_mixed_when_batch_norm_gains_more_by_less_than_the_band():
    (finding,) = EXPERIMENT.summarize(rows({("none", "none"): 0.85, ("none", "shift+rotate"): 0.87,
                                            ("batch", "none"): 0.85, ("batch", "shift+rotate"): 0.875},
                                           jitter=(0.0, 0.0002, -0.0002)), CONFIG).findings
    assert finding.verdict == "mixed" and "falls short of the predicted 1.0 pts" in finding.reason


def test_not_supported_when_both_gain_alike():
    (finding,) = EXPERIMENT.summarize(rows({("none", "none"): 0.85, ("none", "shift+rotate"): 0.87,
                                            ("batch", "none"): 0.88, ("batch", "shift+rotate"): 0.90}), CONFIG).findings
    assert finding.verdict == "not supported" and "band of no effect" in finding.reason


def test_not_supported_when_batch_norm_gains_less():
    summary = EXPERIMENT.summarize(rows({("none", "none"): 0.80, ("none", "shift+rotate"): 0.88,
                                         ("batch", "none"): 0.86, ("batch", "shift+rotate"): 0.88}), CONFIG)
    assert summary.findings[0].verdict == "not supported" and "opposite" in summary.findings[0].reason
    # Batch norm started higher: the notes say a smaller gain need not mean it learns less.
    assert any("less left for augmentation to add" in n for n in summary.notes)


def test_inconclusive_with_two_seeds_or_a_wide_ci():
    base = {("none", "none"): 0.85, ("none", "shift+rotate"): 0.87, ("batch", "none"): 0.85,
            ("batch", "shift+rotate"): 0.90}
    (two,) = EXPERIMENT.summarize(rows(base, seeds=2), CONFIG).findings
    assert two.verdict == "inconclusive" and two.reason.startswith("only 2 seeds")
    (wide,) = EXPERIMENT.summarize(rows({**base, ("batch", "shift+rotate"): 0.875}, jitter=(0.0, 0.03, -0.03)),
                                   CONFIG).findings
    assert wide.verdict == "inconclusive" and "contains 0.0 pts" in wide.reason


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "data.limit": 200, "model.widths": [4, 4, 4, 4], "train.steps": 20,
        "train.seeds": 2, "train.eval_every": 10, "train.checkpoint_every": 10, "train.device": "cpu",
    }, parse=False)
    out = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert {(r["arm"], r["point"]["data.augment"]) for r in out} == {
        (arm, aug) for arm in ("none", "batch") for aug in ("none", "shift+rotate")}
    # Augmentation changes training, and only training: at step 0 the pairs agree.
    final = {(r["arm"], r["point"]["data.augment"], r["seed"]): r["train_loss"] for r in out if r["step"] == 20}
    assert final[("batch", "none", 0)] != final[("batch", "shift+rotate", 0)]
    start = {(r["arm"], r["point"]["data.augment"], r["seed"]): r["test_acc"] for r in out if r["step"] == 0}
    assert start[("batch", "none", 0)] == start[("batch", "shift+rotate", 0)]
    summary = EXPERIMENT.summarize(out, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    report = write_report(tmp_path / "run")
    assert "C16" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
