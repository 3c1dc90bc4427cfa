"""ioffe2015-mnist's declared rules (C1 speed-up, C3 drift) on hand-made metrics rows."""

from __future__ import annotations

import pytest

from normlab.lab.config import config_to_dict
from normlab.lab.experiments import all_experiments

EXPERIMENT = all_experiments()["ioffe2015-mnist"]
CONFIG = config_to_dict(EXPERIMENT.quick_config())  # target 85%, at least 3x, 1,500 steps


def rows(reach: dict[str, list[int | None]], drift: dict[str, float] | None = None, steps: int = 1500):
    """Rows where arm's seed s first reaches 0.9 accuracy at reach[arm][s] (None: never), and the
    probe's median moves by drift[arm] spreads over training."""
    drift = drift or {"none": 0.5, "batch": 0.2}
    out = []
    for arm, per_seed in reach.items():
        for seed, at in enumerate(per_seed):
            for step in range(0, steps + 1, 25):
                acc = 0.9 if at is not None and step >= at else 0.5
                median = drift[arm] * step / steps * (1 + 0.1 * seed)
                out.append({"step": step, "arm": arm, "seed": seed, "test_acc": acc, "train_loss": 1.0,
                            "probes": {"sigmoid_input_p15": median - 0.5, "sigmoid_input_p50": median,
                                       "sigmoid_input_p85": median + 0.5}})
    return out


def findings(summary):
    return {f.claim: f for f in summary.findings}


def test_supported_when_batch_norm_is_several_times_faster_and_steadier():
    summary = EXPERIMENT.summarize(rows({"none": [600, 650, 700], "batch": [100, 125, 125]}), CONFIG)
    f = findings(summary)
    assert f["C1"].verdict == "supported" and f["C3"].verdict == "supported" and summary.met
    assert "fewer steps than no norm" in summary.headline


def test_mixed_when_faster_but_short_of_3x():
    f = findings(EXPERIMENT.summarize(rows({"none": [300, 325, 300], "batch": [150, 150, 150]}), CONFIG))
    assert f["C1"].verdict == "mixed" and "falls short of the predicted 3.0x" in f["C1"].reason


def test_not_supported_when_batch_norm_is_slower_and_drifts_more():
    summary = EXPERIMENT.summarize(rows({"none": [100, 125, 100], "batch": [500, 450, 475]},
                                        drift={"none": 0.2, "batch": 0.6}), CONFIG)
    f = findings(summary)
    assert f["C1"].verdict == "not supported" and f["C3"].verdict == "not supported" and not summary.met


def test_two_seeds_are_inconclusive_with_the_reason():
    f = findings(EXPERIMENT.summarize(rows({"none": [600, 650], "batch": [100, 125]}), CONFIG))
    assert f["C1"].verdict == "inconclusive" and f["C1"].reason.startswith("only 2 seeds")


def test_a_plain_arm_that_never_reaches_the_target_gives_a_labelled_lower_bound():
    summary = EXPERIMENT.summarize(rows({"none": [None, 650, 700], "batch": [100, 125, 125]}), CONFIG)
    f = findings(summary)
    assert f["C1"].lower_bound and f["C1"].text.startswith("at least ")
    assert "lower bound" in " ".join(summary.notes)


def test_no_speed_up_is_reported_when_batch_norm_never_reaches_the_target():
    summary = EXPERIMENT.summarize(rows({"none": [600, 650, 700], "batch": [None, None, None]}), CONFIG)
    f = findings(summary)
    assert f["C1"].verdict == "inconclusive" and f["C1"].text == "n/a"
    assert summary.headline.startswith("no speed-up to report: the batch-norm arm never reached the target")
    assert "fewer steps" not in summary.headline
