"""cooijmans2016-seqmnist (C11): the speed-up and final-accuracy rules on hand-made metrics rows,
and one tiny end-to-end run (issue 13 item 3)."""

from __future__ import annotations

import math

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.seqmnist import speedups
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["cooijmans2016-seqmnist"]
SEQS = ("rows", "permuted")
BUDGET = 400


def config():
    cfg = config_to_dict(EXPERIMENT.quick_config())  # target 80%
    cfg["train"]["steps"] = BUDGET
    cfg["train"]["eval_every"] = 100
    return cfg


def make_rows(jobs, seeds=(0, 1, 2), diverged=()):
    """Rows for ``jobs = {(sequence, arm): (reach, final)}``, each a list per seed or one value for
    every seed. A job is evaluated at steps 0, 100, ..., 400: its accuracy is 0.5 before step
    ``reach`` (None: never), 0.85 from it on (the target is 0.80), and ``final`` at step 400."""
    rows = []
    for (seq, arm), (reach, fin) in jobs.items():
        for k, seed in enumerate(seeds):
            r = reach[k] if isinstance(reach, (list, tuple)) else reach
            f = fin[k] if isinstance(fin, (list, tuple)) else fin
            assert (r is None) == (f < 0.8), "a job's final accuracy must agree with its reach"
            for step in range(0, BUDGET + 1, 100):
                acc = f if step == BUDGET else (0.85 if r is not None and step >= r else 0.5)
                rows.append({"step": step, "arm": arm, "seed": seed, "point": {"model.sequence": seq},
                             "train_loss": 0.5, "train_loss_sd": 0.1, "test_loss": 0.5, "test_acc": acc,
                             "wall_time": 0.01 * step, "probes": {}})
            if (seq, arm, seed) in diverged:
                rows[-1]["diverged"] = True
    return rows


def jobs_for(none, batch, layer=(200, 0.9), seqs=SEQS):
    """``none``/``batch``/``layer``: ``(reach, final)``, or ``{sequence: (reach, final)}``."""
    out = {}
    for seq in seqs:
        for arm, spec in (("none", none), ("batch", batch), ("layer", layer)):
            out[(seq, arm)] = spec[seq] if isinstance(spec, dict) else spec
    return out


def summarize(jobs, **kw):
    return EXPERIMENT.summarize(make_rows(jobs, **kw), config())


def test_rule_supported_when_bn_lstm_is_faster_and_as_accurate():
    summary = summarize(jobs_for(none=([300, 300, 400], [0.90, 0.91, 0.92]), batch=(100, [0.91, 0.91, 0.93])))
    assert summary.verdict == "supported" and summary.met
    speed, accuracy = summary.findings
    assert speed.claim == accuracy.claim == "C11"
    assert speed.verdict == accuracy.verdict == "supported"
    gm = math.exp((2 * math.log(3) + math.log(4)) / 3)
    assert f"{gm:.1f}x [" in summary.headline and "(rows)" in summary.headline and "(permuted)" in summary.headline
    assert "0.67 pts [-0.77, 2.10] (rows)" in summary.headline  # mean of +1, 0, +1 points
    table = {(r[0], r[1]): r for r in summary.rows}
    assert table[("rows", "batch")][3] == "100" and table[("rows", "none")][3] == "333"
    assert table[("permuted", "batch")][5].startswith(f"{gm:.2f}x [")


def test_rule_not_supported_when_bn_lstm_is_slower_and_worse():
    summary = summarize(jobs_for(none=(100, [0.93, 0.94, 0.95]), batch=([300, 300, 400], [0.89, 0.90, 0.92])))
    assert summary.verdict == "not supported" and not summary.met
    speed, accuracy = summary.findings
    assert speed.verdict == "not supported" and "other side of 1.0x" in speed.reason
    assert accuracy.verdict == "not supported" and "other side of -1.00 pts" in accuracy.reason


def test_rule_not_supported_when_the_speed_up_is_within_the_band_of_none():
    summary = summarize(jobs_for(none=([200, 200, 300], 0.9), batch=([200, 200, 300], 0.9)))
    speed, accuracy = summary.findings
    assert speed.verdict == "not supported" and "no effect worth the name" in speed.reason
    assert accuracy.verdict == "supported"  # equal accuracy is within the 1-point margin
    assert summary.verdict == "mixed"


def test_rule_mixed_when_bn_lstm_is_faster_but_short_of_the_predicted_speed_up():
    summary = summarize(jobs_for(none=(400, 0.9), batch=(300, 0.9)))
    speed, _ = summary.findings
    assert speed.verdict == "mixed" and "falls short of the predicted 1.5x" in speed.reason
    assert summary.verdict == "mixed"


def test_rule_mixed_when_the_sequence_variants_disagree():
    batch = {"rows": (100, 0.92), "permuted": ([300, 400, 400], [0.9, 0.9, 0.9])}
    summary = summarize(jobs_for(none={"rows": (300, 0.9), "permuted": (100, 0.9)}, batch=batch))
    speed, _ = summary.findings
    assert speed.verdict == "mixed"
    assert "speed-up, rows: supported" in speed.reason and "speed-up, permuted: not supported" in speed.reason


def test_rule_inconclusive_with_two_seeds():
    summary = summarize(jobs_for(none=(300, 0.9), batch=(100, 0.92)), seeds=(0, 1))
    assert summary.verdict == "inconclusive"
    assert all("only 2 seeds" in f.reason for f in summary.findings)


def test_rule_inconclusive_when_the_accuracy_ci_straddles_the_margin():
    summary = summarize(jobs_for(none=(300, 0.9), batch=(100, [0.85, 0.95, 0.89])))
    speed, accuracy = summary.findings
    assert speed.verdict == "supported" and accuracy.verdict == "inconclusive"
    assert "contains -1.00 pts" in accuracy.reason and summary.verdict == "inconclusive"


def test_speed_up_is_a_lower_bound_when_the_lstm_never_reaches_the_target():
    summary = summarize(jobs_for(none=([300, None, 400], [0.9, 0.7, 0.9]), batch=(100, 0.92)))
    speed, _ = summary.findings
    assert speed.lower_bound and "at least" in speed.text
    assert any("rows, arm 'none', seed 1 never reached 80%" in n and "lower bound" in n for n in summary.notes)
    table = {(r[0], r[1]): r for r in summary.rows}
    assert table[("rows", "batch")][5].startswith("at least ")


def test_bn_seed_that_never_reaches_counts_against_it_at_the_budget():
    summary = summarize(jobs_for(none=(100, 0.9), batch=([100, None, None], [0.9, 0.7, 0.7])))
    speed, _ = summary.findings
    assert not speed.lower_bound
    assert any("arm 'batch', seed 1 never reached 80%" in n and "upper bound" in n for n in summary.notes)
    # per seed 100/100, 100/400, 100/400: the geometric mean is 0.4x
    assert "speed-up, rows: 0.4x [0.1, 2.9] (inconclusive)" in speed.text and speed.verdict == "inconclusive"


def test_headline_reports_no_speed_up_for_a_bn_lstm_that_never_reached_the_target():
    batch = {"rows": (None, 0.3), "permuted": (100, 0.9)}
    summary = summarize(jobs_for(none=(300, 0.9), batch=batch))
    assert "reached 80% test accuracy never (rows: no seed in 400 steps; the LSTM reached it in 3/3 seeds)" in (
        summary.headline)
    assert "3.0x [3.0, 3.0] fewer steps than the LSTM (permuted)" in summary.headline
    speed, _ = summary.findings
    assert "speed-up, rows: not supported" in speed.reason  # 300/400 per seed: the ratio, an upper bound, is < 1


def test_seed_where_neither_arm_reaches_the_target_is_left_out():
    none = ([300, 300, None, 300], [0.9, 0.9, 0.7, 0.9])
    batch = ([100, 100, None, 100], [0.9, 0.9, 0.7, 0.9])
    summary = summarize(jobs_for(none=none, batch=batch), seeds=(0, 1, 2, 3))
    speed, accuracy = summary.findings
    assert speed.n == 3 and accuracy.n == 4
    assert any("neither the LSTM nor the BN-LSTM reached the target in seed(s) 2" in n for n in summary.notes)


def test_speedups_bounds():
    assert speedups({0: 100, 1: None, 2: 300, 3: None}, {0: 50, 1: 100, 2: None, 3: None}, 400) == (
        [2.0, 4.0, 0.75], [1], [2], [3])
    assert speedups({0: 100}, {1: 100}, 400) == ([], [], [], [])  # no seed with both arms


def test_notes_describe_the_figures_the_layer_arm_and_the_scale():
    jobs = jobs_for(none=([300, 300, 400], 0.9), batch=(100, 0.92), layer=(200, 0.91))
    summary = summarize(jobs, diverged={("permuted", "layer", 2)})
    text = " ".join(summary.notes)
    assert "Test accuracy against steps (rows panel): the lines end at batch 0.920, layer 0.910, none 0.900" in text
    assert "first cross 80% at step (mean over the seeds that did) batch 100, layer 200, none 333" in text
    assert "LN-LSTM vs LSTM (extra arm, no verdict" in text and "Final accuracy BN-LSTM - LN-LSTM" in text
    assert "permuted, arm 'layer', seed 2 diverged" in text
    assert "not the paper's 784 steps" in text and "Wall time per training step" in text


def test_missing_batch_arm_is_inconclusive_not_an_error():
    jobs = {k: v for k, v in jobs_for(none=(300, 0.9), batch=(100, 0.92)).items() if k[1] != "batch"}
    cfg = config()
    cfg["arms"] = {"none": {"model.norm": "none"}, "layer": {"model.norm": "layer"}}
    summary = EXPERIMENT.summarize(make_rows(jobs), cfg)
    assert summary.verdict == "inconclusive"
    assert all(f.estimate is None for f in summary.findings)


def test_rules_are_declared_from_params():
    rules = EXPERIMENT.rules({"target_accuracy": 0.9, "min_speedup": 2.0, "margin_points": 0.5}, ["rows"])
    assert rules[("speed", "rows")].target == 2.0 and rules[("speed", "rows")].log
    assert rules[("accuracy", "rows")].null == -0.5 and rules[("accuracy", "rows")].direction == "greater"
    assert "90%" in rules[("speed", "rows")].statistic


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [6], "train.steps": 20, "train.seeds": 2,
        "train.eval_every": 10, "train.checkpoint_every": 10, "train.batch_size": 16, "train.device": "cpu",
    }, parse=False)
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert {(r["arm"], r["point"]["model.sequence"]) for r in rows} == {
        (arm, seq) for arm in ("none", "batch", "layer") for seq in SEQS}
    assert len(rows) == 3 * 2 * 2 * 3  # arms x sequences x seeds x evaluations
    at_start = {(r["arm"], r["point"]["model.sequence"], r["seed"]): r["test_loss"] for r in rows if r["step"] == 0}
    assert at_start[("none", "rows", 0)] != pytest.approx(at_start[("none", "permuted", 0)], abs=1e-6)
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    speed, accuracy = summary.findings
    assert summary.verdict == "inconclusive" and "only 2 seeds" in accuracy.reason
    assert all(r["probes"].get("test_acc_batch_stats") is not None for r in rows if r["arm"] == "batch")
    assert not any("test_acc_batch_stats" in r["probes"] for r in rows if r["arm"] != "batch")
    assert [r[1] for r in summary.rows[:3]] == ["none", "batch", "layer"]
    report = write_report(tmp_path / "run")
    assert "C11" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)


def test_batch_statistics_gap_is_described():
    rows = make_rows(jobs_for(none=(300, 0.9), batch=(100, 0.9), layer=(200, 0.9)))
    for r in rows:
        if r["arm"] == "batch":
            gap = 0.08 if r["point"]["model.sequence"] == "rows" else 0.01
            r["probes"]["test_acc_batch_stats"] = r["test_acc"] + gap
    text = " ".join(EXPERIMENT.summarize(rows, config()).notes)
    assert ("BN-LSTM, rows: final test accuracy 0.900 with its running statistics and 0.980 with each test batch's "
            "own statistics") in text
    assert "the running statistics cost 8.0 points" in text
    assert "BN-LSTM, permuted: final test accuracy 0.900" in text and "cost little here" in text


def test_batch_statistics_measurement_ignores_and_keeps_the_running_statistics():
    import torch

    from normlab.lab.data import load_dataset
    from normlab.lab.models import build_model

    data = load_dataset("synthetic", limit=200)
    cfg = apply_overrides(EXPERIMENT.quick_config(), {"model.widths": [6], "train.batch_size": 32}, parse=False)
    torch.manual_seed(0)
    model = build_model(apply_overrides(cfg, {"model.norm": "batch"}).model, data.input_shape, data.num_classes)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = EXPERIMENT.measurements(model, data, cfg, "batch")["test_acc_batch_stats"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for m in model.modules():  # garbage running statistics change nothing measured with batch statistics
        if hasattr(m, "running_mean") and m.running_mean is not None:
            m.running_mean.fill_(100.0)
    assert EXPERIMENT.measurements(model, data, cfg, "batch")["test_acc_batch_stats"] == got
    with torch.no_grad():
        assert (model(data.x_test).argmax(1) == data.y_test).float().mean().item() != pytest.approx(got)
    layer = build_model(apply_overrides(cfg, {"model.norm": "layer"}).model, data.input_shape, data.num_classes)
    assert EXPERIMENT.measurements(layer, data, cfg, "layer") == {}


def test_headline_without_any_speed_up_has_no_confidence_interval_to_quote():
    summary = summarize(jobs_for(none=(None, 0.6), batch=(None, 0.7), layer=(None, 0.5)))
    assert "never (rows: no seed in 400 steps; the LSTM reached it in 0/3 seeds)" in summary.headline
    assert "geometric mean" not in summary.headline
    speed, accuracy = summary.findings
    assert speed.verdict == "inconclusive" and accuracy.verdict == "supported"  # +10 points
