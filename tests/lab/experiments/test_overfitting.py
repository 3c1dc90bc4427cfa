"""overfitting's declared rules (C6: the train-test gap, BN vs none; dropout removable from the BN
network) on hand-made metrics rows, and a tiny end-to-end run."""

from __future__ import annotations

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["overfitting"]
CONFIG = config_to_dict(EXPERIMENT.quick_config())  # dropout 0 / 0.5, gap band 1 pt, dropout margin 1 pt
JITTER = (0.0, 0.001, -0.001, 0.0005, -0.0005)  # per-seed spread of the test accuracies (negated for batch)


def rows(test: dict[tuple[str, float], float], seeds: int = 3, train: float = 1.0, jitter=JITTER):
    """Rows where (arm, dropout) ends at train accuracy ``train`` and test accuracy ``test[...]``
    (plus a per-seed jitter, of opposite sign for batch norm, so that paired differences vary over
    seeds), after rising from chance; all arms reach 99% train accuracy at step 100."""
    out = []
    for (arm, dropout), acc in test.items():
        for seed in range(seeds):
            for step, tr, te in ((0, 0.1, 0.1), (100, train, acc - 0.02), (200, train, acc + (-1 if arm == "batch" else 1) * jitter[seed])):
                out.append({"step": step, "arm": arm, "seed": seed, "point": {"model.dropout": dropout},
                            "train_loss": 0.1, "test_acc": te, "train_acc": tr, "train_test_gap": tr - te})
    return out


def findings(summary):
    gap, drop = summary.findings
    return gap, drop


def test_supported_when_batch_norm_overfits_less_and_needs_no_dropout():
    summary = EXPERIMENT.summarize(rows({("none", 0.0): 0.85, ("none", 0.5): 0.87,
                                         ("batch", 0.0): 0.90, ("batch", 0.5): 0.895}), CONFIG)
    gap, drop = findings(summary)
    assert gap.verdict == "supported" and gap.estimate == pytest.approx(5.0)
    assert drop.verdict == "supported" and drop.estimate == pytest.approx(0.5)
    assert summary.verdict == "supported" and summary.met
    assert "no norm's train-test accuracy gap minus batch norm's was 5.0 pts" in summary.headline
    assert any("comes from higher test accuracy" in n for n in summary.notes)


def test_not_supported_when_the_gaps_agree_and_dropout_helps_batch_norm():
    summary = EXPERIMENT.summarize(rows({("none", 0.0): 0.86, ("none", 0.5): 0.87,
                                         ("batch", 0.0): 0.861, ("batch", 0.5): 0.89}), CONFIG)
    gap, drop = findings(summary)
    assert gap.verdict == "not supported" and "band of no effect" in gap.reason
    assert drop.verdict == "not supported" and drop.estimate == pytest.approx(-2.9)
    assert summary.verdict == "not supported" and not summary.met


def test_mixed_when_batch_norm_overfits_less_but_still_needs_dropout():
    summary = EXPERIMENT.summarize(rows({("none", 0.0): 0.85, ("none", 0.5): 0.87,
                                         ("batch", 0.0): 0.88, ("batch", 0.5): 0.91}), CONFIG)
    gap, drop = findings(summary)
    assert (gap.verdict, drop.verdict, summary.verdict) == ("supported", "not supported", "mixed")


def test_mixed_when_the_gap_shrinks_by_less_than_the_band():
    gap, _ = findings(EXPERIMENT.summarize(rows({("none", 0.0): 0.85, ("none", 0.5): 0.86,
                                                 ("batch", 0.0): 0.855, ("batch", 0.5): 0.855},
                                                jitter=(0.0, 0.0002, -0.0002)), CONFIG))
    assert gap.verdict == "mixed" and "falls short of the predicted 1.0 pts" in gap.reason


def test_inconclusive_with_two_seeds():
    summary = EXPERIMENT.summarize(rows({("none", 0.0): 0.85, ("none", 0.5): 0.87,
                                         ("batch", 0.0): 0.90, ("batch", 0.5): 0.895}, seeds=2), CONFIG)
    gap, drop = findings(summary)
    assert gap.verdict == drop.verdict == summary.verdict == "inconclusive"
    assert gap.reason.startswith("only 2 seeds")


def test_batch_norm_that_fits_less_is_named_in_the_notes():
    test = {("none", 0.0): 0.85, ("none", 0.5): 0.87, ("batch", 0.0): 0.85, ("batch", 0.5): 0.85}
    out = rows(test)
    for r in out:  # batch norm ends fitting only 95% of its training digits
        if r["arm"] == "batch" and r["step"] == 200:
            r["train_acc"] = 0.95
            r["train_test_gap"] = 0.95 - r["test_acc"]
    summary = EXPERIMENT.summarize(out, CONFIG)
    assert summary.findings[0].verdict == "supported"  # a smaller gap ...
    assert any("lower train accuracy" in n for n in summary.notes)  # ... from fitting less, said so


def test_rules_are_declared_from_params():
    gap, drop = EXPERIMENT.rules({"gap_band": 2.0, "dropout_margin": 0.5})
    assert gap.equivalence == gap.target == 2.0 and drop.null == -0.5 and drop.direction == "greater"


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "data.limit": 200, "model.widths": [16, 16], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 10, "train.device": "cpu",
    }, parse=False)
    rows_ = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert {(r["arm"], r["point"]["model.dropout"]) for r in rows_} == {
        (arm, d) for arm in ("none", "batch") for d in (0.0, 0.5)}
    assert len(rows_) == 2 * 2 * 2 * 3 and all("train_test_gap" in r for r in rows_)
    summary = EXPERIMENT.summarize(rows_, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    assert [r[:2] for r in summary.rows] == [["none", "0"], ["none", "0.5"], ["batch", "0"], ["batch", "0.5"]]
    report = write_report(tmp_path / "run")
    assert "C6" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
