"""wu-he2018-batch-size (C10, C12) on hand-made metrics rows, its derived job settings, batch
renorm's scaled schedule, and one tiny end-to-end run (issue 13 item 1)."""

from __future__ import annotations

import math

import pytest

from normlab.lab.config import ConfigError, apply_overrides, arm_config, check_user_overrides, config_to_dict
from normlab.lab.data import load_dataset
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.wu_he_batch_size import renorm_probe, renorm_schedule_for
from normlab.lab.models import build_model
from normlab.lab.report import write_report
from normlab.lab.trainer import Interrupted, Job, Trainer, run_job

EXPERIMENT = all_experiments()["wu-he2018-batch-size"]
AXIS = "train.batch_size"
SIZES = [2, 8, 32]


def make_rows(errors, *, steps=100, diverged=()):
    """Metrics rows for ``errors = {arm: {seed: {batch size: final test error in %}}}``: each job
    is evaluated at step 0 (accuracy 0.1) and at ``steps``; a job ``(arm, seed, size)`` in
    ``diverged`` ends with ``"diverged": True``."""
    rows = []
    for arm, per_seed in errors.items():
        for seed, by_size in per_seed.items():
            for size, err in by_size.items():
                for step, acc in ((0, 0.1), (steps, 1 - err / 100)):
                    rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: size}, "train_loss": 0.3,
                                 "train_loss_sd": 0.1, "test_loss": 0.3, "test_acc": acc, "wall_time": 0.0,
                                 "probes": {"test_error": 100 * (1 - acc)}})
                if (arm, seed, size) in diverged:
                    rows[-1].update(diverged=True, train_loss=None)
    return rows


def config(arms=("batch", "group", "layer"), sizes=SIZES):
    cfg = config_to_dict(EXPERIMENT.default_config())
    cfg["arms"] = {arm: {"model.norm": arm} for arm in arms}
    cfg["grid"] = {AXIS: list(sizes)}
    return cfg


def scenario(losses, seeds=(0, 1, 2), base=5.0):
    """Errors where arm ``a`` ends at ``base`` % at the largest batch and ``base + losses[a][i]``
    at the smallest in seed i (a number: the same for every seed); the middle size in between."""
    errors = {}
    for arm, loss in losses.items():
        errors[arm] = {}
        for i, seed in enumerate(seeds):
            d = loss[i] if isinstance(loss, (list, tuple)) else loss
            errors[arm][seed] = {SIZES[0]: base + d, SIZES[1]: base + d / 2, SIZES[2]: base}
    return errors


def summarize(errors, **kwargs):
    cfg = config(arms=tuple(errors), **kwargs)
    return EXPERIMENT.summarize(make_rows(errors), cfg)


def findings(summary):
    return {(f.claim, f.label): f for f in summary.findings}


C10 = ("C10", "BN's loss - GN's loss")


# ---------------------------------------------------------------------------------------------
# C10: batch norm's loss minus group norm's (difference in differences)


def test_c10_supported_when_batch_norm_loses_more_than_the_target():
    s = summarize(scenario({"batch": [6.0, 8.0, 10.0], "group": [0.2, -0.3, 0.1], "layer": 0.0}))
    c10 = findings(s)[C10]
    # Oracle: per-seed differences 5.8, 8.3, 9.9 -> mean 8.0, t_{0.975,2} = 4.303.
    diffs = [5.8, 8.3, 9.9]
    mean = sum(diffs) / 3
    half = 4.303 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert c10.estimate == pytest.approx(mean) and c10.low == pytest.approx(mean - half)
    assert c10.verdict == "supported" and c10.met
    assert "batch norm lost" in s.headline and "C10 supported" in s.headline


def test_c10_mixed_when_batch_norm_loses_more_but_less_than_the_target():
    c10 = findings(summarize(scenario({"batch": [1.4, 1.5, 1.6], "group": 0.0})))[C10]
    assert c10.verdict == "mixed" and c10.estimate == pytest.approx(1.5)


def test_c10_not_supported_when_both_lose_the_same_or_group_norm_loses_more():
    same = findings(summarize(scenario({"batch": [3.0, 3.2, 2.9], "group": [3.1, 3.0, 3.0]})))[C10]
    assert same.verdict == "not supported" and "band of no effect" in same.reason
    opposite = findings(summarize(scenario({"batch": [0.0, 0.1, -0.1], "group": [4.0, 5.0, 4.5]})))[C10]
    assert opposite.verdict == "not supported" and "opposite" in opposite.reason


def test_c10_inconclusive_with_two_seeds_or_a_wide_interval():
    two = findings(summarize(scenario({"batch": [6.0, 8.0], "group": 0.0}, seeds=(0, 1))))[C10]
    assert two.verdict == "inconclusive" and "only 2 seeds" in two.reason
    s = summarize(scenario({"batch": [-8.0, 1.0, 12.0], "group": 0.0}))
    assert findings(s)[C10].verdict == "inconclusive"
    assert any("cannot tell" in n and "most at batch 2" in n for n in s.notes)


def test_c10_inconclusive_note_says_when_the_interval_rules_out_the_predicted_loss():
    s = summarize(scenario({"batch": [-1.2, -0.2, 0.4], "group": 0.0}))  # CI about [-2.3, +1.7]
    assert findings(s)[C10].verdict == "inconclusive" and findings(s)[C10].high < 2.0
    note = next(n for n in s.notes if "cannot tell" in n)
    assert "lies below the predicted 2 points" in note and "Reasons it may differ" in note
    assert "The full form trains longer" not in note  # these rows come with the full form's 8 epochs


def test_c10_inconclusive_without_a_group_norm_arm():
    s = summarize(scenario({"batch": 8.0, "layer": 0.0}))
    c10 = findings(s)[C10]
    assert c10.verdict == "inconclusive" and "'group' arm" in c10.reason
    assert "No C10 difference" in s.headline


def test_diverged_job_counts_with_its_broken_networks_error():
    errors = scenario({"batch": 0.0, "group": 0.0})
    errors["batch"][1][2] = 90.0  # a broken network guesses
    rows = make_rows(errors, diverged={("batch", 1, 2)})
    s = EXPERIMENT.summarize(rows, config(arms=("batch", "group")))
    assert findings(s)[C10].estimate == pytest.approx((90.0 - 5.0) / 3)
    assert any("seed 1 diverged" in n and "90.0%" in n for n in s.notes)
    assert s.rows[0][-1] == "1/9"  # the batch arm's diverged jobs


def test_a_norm_that_learned_at_no_batch_size_makes_its_verdicts_inconclusive():
    # Group norm at chance (90% error for 10 classes) everywhere: flat, but it learned nothing.
    errors = scenario({"batch": [55.0, 60.0, 65.0], "group": [0.1, -0.1, 0.0], "layer": 0.0})
    for seed in errors["group"]:
        errors["group"][seed] = {b: 89.9 + (seed % 2) * 0.1 for b in SIZES}
    s = EXPERIMENT.summarize(make_rows(errors), config())
    f = findings(s)
    assert f[C10].verdict == "inconclusive" and "group norm learned at no batch size" in f[C10].reason
    assert f[("C12", "group norm's loss")].verdict == "inconclusive"
    assert f[("C12", "layer norm's loss")].verdict == "supported"  # layer norm learned (5% error)
    assert any(n.startswith("Did not learn at any batch size: 'group'") for n in s.notes)
    assert "C10 inconclusive: group norm learned at no batch size" in s.headline
    # Just under the bar (80% = chance - 10 points) counts as learning: the rule decides as usual.
    for seed in errors["group"]:
        errors["group"][seed] = {2: 79.0, 8: 79.0, 32: 79.0}
    assert findings(EXPERIMENT.summarize(make_rows(errors), config()))[C10].verdict == "supported"


# ---------------------------------------------------------------------------------------------
# C12: group, layer, instance norm flat in the batch size (equivalence within +-2 points)


def test_c12_supported_when_group_layer_and_instance_norm_stay_flat():
    s = summarize(scenario({"batch": 6.0, "group": [0.2, -0.1, 0.3], "layer": [0.0, 0.4, -0.2],
                            "instance": [-0.3, 0.1, 0.0]}))
    f = findings(s)
    assert [f[("C12", f"{n} norm's loss")].verdict for n in ("group", "layer", "instance")] == ["supported"] * 3
    assert s.verdict == "supported" and s.met


def test_c12_not_supported_when_a_per_example_norm_loses_error_with_the_batch():
    s = summarize(scenario({"batch": 6.0, "group": [4.0, 4.5, 5.0], "layer": 0.0}))
    f = findings(s)
    assert f[("C12", "group norm's loss")].verdict == "not supported"
    assert f[("C12", "layer norm's loss")].verdict == "supported"
    assert s.verdict == "mixed"
    assert any("never read the batch" in n for n in s.notes)


def test_c12_inconclusive_when_the_interval_reaches_past_the_band_or_with_two_seeds():
    wide = findings(summarize(scenario({"batch": 6.0, "group": [-3.0, 0.5, 3.0]})))[("C12", "group norm's loss")]
    assert wide.verdict == "inconclusive" and "overlaps the edge" in wide.reason
    two = findings(summarize(scenario({"batch": 6.0, "group": 0.0}, seeds=(0, 1))))[("C12", "group norm's loss")]
    assert two.verdict == "inconclusive" and "only 2 seeds" in two.reason


def test_c12_inconclusive_without_a_per_example_norm():
    f = [x for x in summarize(scenario({"batch": 6.0, "none": 0.0})).findings if x.claim == "C12"]
    assert len(f) == 1 and f[0].verdict == "inconclusive" and "no group, layer or instance" in f[0].reason


def test_note_when_every_norm_does_better_at_the_small_batch():
    errors = scenario({"batch": [-3.0, -3.5, -4.0], "group": [-4.0, -4.5, -3.0]})
    s = EXPERIMENT.summarize(make_rows(errors), config(arms=("batch", "group")))
    assert any(n.startswith("Every norm's error was lower at batch 2 than at batch 32") for n in s.notes)
    assert not any(n.startswith("Every norm") for n in summarize(scenario({"batch": 6.0, "group": 0.0})).notes)


def test_summary_table_and_figure_notes_read_the_errors():
    s = summarize(scenario({"batch": 6.0, "group": 0.0}))
    assert s.columns[1:4] == [f"test error at batch {b} (%) [95% CI]" for b in SIZES]
    assert s.rows[0][:4] == ["batch", "11.0 [11.0, 11.0]", "8.0 [8.0, 8.0]", "5.0 [5.0, 5.0]"]
    assert s.rows[0][4] == "+6.0 [+6.0, +6.0]"
    assert any("'batch' 11.0 / 8.0 / 5.0" in n and "'batch' +6.0, 'group' +0.0" in n for n in s.notes)
    assert "'batch' from 90.0% at step 0 to 11.0% at step 100" in " ".join(s.notes)  # the batch-2 curve
    assert any(n.startswith("Figure \"Training loss") and "1.0x what it is at batch 32, while the second changed by "
               "+6.0 points" in n for n in s.notes)


# ---------------------------------------------------------------------------------------------
# Derived settings and batch renorm's schedule


def test_job_config_derives_lr_steps_and_evaluations_from_the_batch_size():
    cfg = apply_overrides(EXPERIMENT.quick_config(), {"data.name": "synthetic", "data.limit": 1000,
                                                      "params.epochs": 3.0, "params.evals": 4}, parse=False)
    n = len(load_dataset("synthetic", limit=1000).y_train)  # the oracle: what the job trains on
    assert n == 1000
    for size in (2, 8, 32):
        job = EXPERIMENT.job_config(arm_config(cfg, "batch", {AXIS: size}))
        assert job.train.lr == pytest.approx(0.1 * size / 32)  # Wu & He: 0.1 x B / 32
        assert job.train.steps == round(3 * n / size)
        assert job.train.eval_every == math.ceil(job.train.steps / 4)
        assert job.train.steps * size == pytest.approx(3 * n, abs=size)  # equal epochs


def test_job_config_rejects_bad_params():
    cfg = apply_overrides(EXPERIMENT.quick_config(), {"data.name": "synthetic", "params.epochs": 0.0}, parse=False)
    with pytest.raises(ConfigError, match=r"params.epochs must be a positive number, got 0.0"):
        EXPERIMENT.job_config(arm_config(cfg, "batch", {AXIS: 8}))
    cfg = apply_overrides(EXPERIMENT.quick_config(), {"data.name": "synthetic"}, parse=False)
    cfg.params["evals"] = 2.5  # a config file's params are not type-checked against the defaults
    with pytest.raises(ConfigError, match=r"params.evals must be a positive integer, got 2.5"):
        EXPERIMENT.job_config(arm_config(cfg, "batch", {AXIS: 8}))


def test_a_users_learning_rate_or_steps_is_refused():
    cfg = apply_overrides(EXPERIMENT.quick_config(), {"train.lr": 0.5})
    with pytest.raises(ConfigError, match="derives train.lr in every job"):
        check_user_overrides(cfg, {"train.lr": "--set train.lr=0.5"}, EXPERIMENT.derived)
    with pytest.raises(ConfigError, match="derives train.steps"):
        check_user_overrides(cfg, {"train.steps": "--steps 100"}, EXPERIMENT.derived)


def test_renorm_schedule_is_ioffes_scaled_to_the_job():
    params = EXPERIMENT.default_config().params
    s = renorm_schedule_for(2000, params)
    # Batch norm for 5% of the steps, d_max 5 at 25%, r_max 3 at 40% (Ioffe: 5k, 25k, 40k of a nominal 100k).
    assert [s["r_max"](k) for k in (0, 100, 450, 800, 2000)] == pytest.approx([1.0, 1.0, 2.0, 3.0, 3.0])
    assert [s["d_max"](k) for k in (100, 300, 500, 2000)] == pytest.approx([0.0, 2.5, 5.0, 5.0])
    with pytest.raises(ConfigError, match="renorm_warmup must lie in"):
        renorm_schedule_for(100, {**params, "renorm_warmup": 0.5})


def test_renorm_probe_sets_the_schedule_records_it_and_restores_on_removal():
    model = build_model(apply_overrides(EXPERIMENT.quick_config(), {"model.norm": "renorm"}).model, (1, 8, 8), 10)
    layers = [m for m in model.modules() if type(m).__name__ == "BatchRenorm2d"]
    paper = layers[0].r_max
    schedule = renorm_schedule_for(100, EXPERIMENT.default_config().params)
    read, remove = renorm_probe(schedule).attach(model)
    assert len(layers) == 4 and all(m.r_max is schedule["r_max"] and m.d_max is schedule["d_max"] for m in layers)
    for m in layers:
        m.num_batches_tracked.fill_(30)
    assert read() == {"renorm_r_max": pytest.approx(1 + 2 * 25 / 35), "renorm_d_max": pytest.approx(5.0)}
    remove()
    assert all(m.r_max is paper for m in layers)


def test_renorm_schedule_survives_a_resumed_job(tmp_path):
    """The schedule is no part of a checkpoint: the probe sets it again when a job resumes."""
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "data.limit": 80, "model.widths": [4, 4], "train.checkpoint_every": 1000,
        "params.epochs": 1.0, "params.evals": 4, "train.device": "cpu"}, parse=False)
    cfg.arms = {"renorm": {"model.norm": "renorm"}}

    def job(run):
        return Job(EXPERIMENT.name, str(tmp_path / run), config_to_dict(cfg), "renorm", 0, ((AXIS, 2),))

    whole = run_job(job("whole"))
    polls = {"n": 0}

    def stop_at_step_13():
        polls["n"] += 1
        return polls["n"] == 13

    with pytest.raises(Interrupted):
        run_job(job("resumed"), stop=stop_at_step_13)
    resumed = run_job(job("resumed"))
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in whole]
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed] == strip
    assert [r["step"] for r in whole] == [0, 10, 20, 30, 40]
    # 40 steps: r_max 1 to step 2, 3 at step 16; d_max 5 at step 10.
    assert [r["probes"]["renorm_r_max"] for r in whole[2:]] == pytest.approx([3.0] * 3)
    assert whole[1]["probes"]["renorm_r_max"] == pytest.approx(1 + 2 * 8 / 14)


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "data.limit": 64, "model.widths": [4, 4], "train.seeds": 3,
        "params.epochs": 1.0, "train.device": "cpu"}, parse=False)
    cfg.arms = {norm: {"model.norm": norm} for norm in ("batch", "renorm", "group")}
    cfg.grid = {AXIS: [2, 8]}
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    last = {(r["arm"], r["point"][AXIS], r["seed"]): r["step"] for r in rows}
    assert len(last) == 18 and {size: {s for (_, b, _), s in last.items() if b == size} for size in (2, 8)} == {
        2: {32}, 8: {8}}  # equal epochs: 64 examples at batch 2 and at batch 8
    for r in rows:  # the figures' error is the trainer's own accuracy, read again
        assert r["probes"]["test_error"] == pytest.approx(100 * (1 - r["test_acc"]))
        assert ("renorm_r_max" in r["probes"]) == (r["arm"] == "renorm")
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert {f.claim for f in summary.findings} == {"C10", "C12"}
    # 32 steps on 64 examples: a norm may not learn yet, and then says so instead of measuring.
    assert all(f.n == 3 or "learned at no batch size" in f.reason for f in summary.findings)
    assert any("batch renorm's" in n for n in summary.notes)
    out = write_report(tmp_path / "run", experiment=EXPERIMENT)
    assert out["html"].exists() and "C10" in out["md"].read_text()
    assert len(list((tmp_path / "run").glob("**/*.png"))) == len(EXPERIMENT.figures)
