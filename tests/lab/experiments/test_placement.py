"""placement (C13): the equivalence rule on hand-made metrics rows, and one tiny end-to-end run."""

from __future__ import annotations

import re

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["placement"]
ACTS = ("sigmoid", "relu")


def config():
    cfg = config_to_dict(EXPERIMENT.quick_config())
    cfg["train"]["steps"] = 300
    cfg["train"]["eval_every"] = 100
    return cfg


def make_rows(finals, seeds=(0, 1, 2), reach=None, diverged=()):
    """Rows for ``finals = {(activation, arm): [final accuracy per seed]}`` (one number: every seed).
    Each job is evaluated at steps 0 (0.1), 100, 200 and 300 (the final accuracy); at step 100 its
    accuracy is 0.86 when ``reach[(activation, arm)]`` is 100, else 0.5; at 200 it is 0.86 unless
    reach is None (never reaches 85%; then its final accuracy is capped at 0.8)."""
    rows = []
    for (act, arm), per_seed in finals.items():
        for k, seed in enumerate(seeds):
            acc = per_seed[k] if isinstance(per_seed, (list, tuple)) else per_seed
            at = (reach or {}).get((act, arm), 200 if acc >= 0.85 else None)
            curve = [(0, 0.1), (100, 0.86 if at == 100 else 0.5), (200, 0.86 if at is not None else 0.5),
                     (300, acc if at is not None else min(acc, 0.8))]
            for step, a in curve:
                rows.append({"step": step, "arm": arm, "seed": seed, "point": {"model.activation": act},
                             "train_loss": 0.5, "train_loss_sd": 0.1, "test_loss": 0.5, "test_acc": a,
                             "wall_time": 0.0, "probes": {}})
            if (act, arm, seed) in diverged:
                rows[-1]["diverged"] = True
    return rows


def finals(before, after, none=0.1, acts=ACTS):
    out = {}
    for act in acts:
        out[(act, "none")], out[(act, "before")] = none, before
        out[(act, "after")] = after[act] if isinstance(after, dict) else after
    return out


def test_rule_supported_when_placements_agree_within_the_band():
    summary = EXPERIMENT.summarize(make_rows(finals([0.930, 0.935, 0.940], [0.932, 0.934, 0.941])), config())
    assert summary.verdict == "supported" and summary.met
    (finding,) = summary.findings
    assert finding.claim == "C13" and "lies within" in finding.reason
    assert "0.07 pts [" in summary.headline  # mean of +0.2, -0.1, +0.1 points


def test_rule_not_supported_when_after_is_clearly_better():
    summary = EXPERIMENT.summarize(make_rows(finals([0.90, 0.91, 0.92], [0.93, 0.94, 0.95])), config())
    assert summary.verdict == "not supported" and not summary.met
    assert "wholly outside" in summary.findings[0].reason


def test_rule_mixed_when_activations_disagree():
    after = {"sigmoid": [0.931, 0.936, 0.941], "relu": [0.96, 0.97, 0.98]}
    summary = EXPERIMENT.summarize(make_rows(finals([0.930, 0.935, 0.940], after)), config())
    assert summary.verdict == "mixed"
    reason = summary.findings[0].reason
    assert re.search(r"after - before, sigmoid: supported", reason)
    assert re.search(r"after - before, relu: not supported", reason)


def test_rule_inconclusive_when_the_ci_straddles_the_band():
    summary = EXPERIMENT.summarize(make_rows(finals([0.93, 0.93, 0.93], [0.92, 0.94, 0.955])), config())
    assert summary.verdict == "inconclusive"
    assert "overlaps the edge" in summary.findings[0].reason


def test_rule_inconclusive_with_two_seeds():
    rows = make_rows(finals([0.930, 0.935], [0.931, 0.936]), seeds=(0, 1))
    summary = EXPERIMENT.summarize(rows, config())
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason


def test_steps_to_target_and_beating_no_norm_are_reported():
    reach = {(a, "before"): 100 for a in ACTS}
    rows = make_rows(finals([0.93, 0.935, 0.94], [0.931, 0.934, 0.941], none=[0.5, 0.6, 0.55]), reach=reach)
    summary = EXPERIMENT.summarize(rows, config())
    table = {(r[0], r[1]): r for r in summary.rows}
    assert table[("relu", "before")][3] == "100" and table[("relu", "after")][3] == "200"
    assert table[("relu", "none")][2] == "0/3" and table[("relu", "none")][3] == "never (>300)"
    text = " ".join(summary.notes)
    assert "steps before / steps after = 0.50x" in text
    assert "BN before beats no norm" in text and "BN after beats no norm" in text
    assert "low bar" not in text  # the plain network trained a little here


def test_diverged_job_is_noted_and_counts_its_last_accuracy():
    rows = make_rows(finals([0.93, 0.935, 0.94], [0.931, 0.10, 0.941]), diverged={("relu", "after", 1)})
    summary = EXPERIMENT.summarize(rows, config())
    assert any("relu, arm 'after', seed 1 diverged" in n for n in summary.notes)
    assert summary.verdict == "inconclusive"  # relu's after - before: +0.1, -83.5, +0.1 points


def test_rules_are_declared_from_params():
    rules = EXPERIMENT.rules({"equivalence_points": 2.0}, ["relu"])
    assert rules["relu"].direction == "equivalent" and rules["relu"].equivalence == 2.0


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [12, 12, 12], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 10, "train.device": "cpu",
    }, parse=False)
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert {(r["arm"], r["point"]["model.activation"]) for r in rows} == {
        (arm, act) for arm in ("none", "before", "after") for act in ACTS}
    assert len(rows) == 3 * 2 * 2 * 3  # arms x activations x seeds x evaluations
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    assert [r[1] for r in summary.rows[:4]] == ["none", "before", "after", "after - before"]
    report = write_report(tmp_path / "run")
    assert "C13" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
