"""inference-stats (C8, C12): the verdict rules on hand-made metrics rows, the measurements
(batch-mate dependence against a float64 formula, the EMAs kept beside a batch norm against
networks built with those momenta), the derived settings, and one tiny end-to-end run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab.config import ConfigError, ModelConfig, apply_overrides, check_user_overrides, config_to_dict
from normlab.lab.data import load_dataset
from normlab.lab.experiments import all_experiments
from normlab.lab.batchmates import SHADOWS, batch_mate_dependence, norms_in_training_mode
from normlab.lab.models import build_model
from normlab.lab.report import write_report
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["inference-stats"]
AXIS = "train.batch_size"
SIZES = (16, 128)
MOMENTA = (0.01, 0.1, 0.5)
SEEDS = (0, 1, 2)
FREE = ("group", "layer", "instance")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as every lab job runs: tiny models on shared cores slow down a hundredfold
    when torch's threads wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config():
    return config_to_dict(EXPERIMENT.quick_config())


def per_seed(spec, k):
    return spec[k] if isinstance(spec, (list, tuple)) else spec


def make_rows(*, seeds=SEEDS, bn_eval=0.0, bn_train=0.05, free=0.0, gains=0.01, drop_ema=()):
    """Rows of a run on the quick config: every arm at batch sizes 16 and 128, evaluated at steps 0,
    100 and 200 (the final one). ``bn_eval`` / ``bn_train``: batch norm's dependence at every
    evaluation (a number, or one per seed); ``free``: the other arms' dependence in both modes (a
    number, or ``{arm: value}``); ``gains``: recalibrated minus EMA accuracy at the final evaluation
    (a number, or ``{(batch size, momentum): number or per-seed list}``; 0.03 before it). Jobs
    ``(size, seed)`` in ``drop_ema`` have no EMA values (a resumed job)."""
    rows = []
    for arm in ("batch", *FREE):
        for size in SIZES:
            for k, seed in enumerate(seeds):
                for step in (0, 100, 200):
                    probes = {}
                    if arm == "batch":
                        probes["dep_eval"], probes["dep_train"] = per_seed(bn_eval, k), per_seed(bn_train, k)
                        probes["recal_acc"] = 0.9
                        if step > 0 and (size, seed) not in drop_ema:
                            probes["ema_check"] = 1e-7
                            for m in MOMENTA:
                                g = gains.get((size, m), 0.01) if isinstance(gains, dict) else gains
                                g = per_seed(g, k) if step == 200 else 0.03
                                probes[f"ema_acc_m{m:g}"] = 0.9 - g
                                probes[f"gain_m{m:g}"] = g
                    else:
                        v = free.get(arm, 0.0) if isinstance(free, dict) else free
                        probes["dep_eval"] = probes["dep_train"] = v
                    rows.append({"step": step, "arm": arm, "seed": seed, "point": {AXIS: size}, "train_loss": 0.5,
                                 "train_loss_sd": 0.1, "test_loss": 0.5, "test_acc": 0.9 if step else 0.1,
                                 "wall_time": 0.0, "probes": probes})
    return rows


def summarize(**kwargs):
    summary = EXPERIMENT.summarize(make_rows(**kwargs), config())
    ev, tr, non, lag, free = summary.findings
    return summary, ev, tr, non, lag, free


# ---------------------------------------------------------------------------------------------
# Verdicts on hand-made rows


def test_every_rule_supported():
    summary, ev, tr, non, lag, free = summarize(gains=[0.010, 0.012, 0.011])
    assert [f.claim for f in summary.findings] == ["C8", "C8", "C8", "C8", "C12"]
    assert all(f.verdict == "supported" for f in summary.findings), [f.reason for f in summary.findings]
    assert summary.verdict == "supported" and summary.met
    assert ev.text == "0.0000% [0.0000, 0.0000]" and tr.estimate == pytest.approx(5.0)
    assert "+1.10 (batch 16, momentum 0.01)" in summary.headline


def test_eval_mode_dependence_above_tolerance_is_not_supported():
    _, ev, tr, *_ = summarize(bn_eval=[2e-4, 3e-4, 2.5e-4])
    assert ev.verdict == "not supported" and "wholly outside" in ev.reason
    assert tr.verdict == "supported"


def test_eval_mode_dependence_straddling_the_tolerance_is_inconclusive():
    _, ev, *_ = summarize(bn_eval=[0.0, 0.0, 3e-5])
    assert ev.verdict == "inconclusive" and "overlaps the edge" in ev.reason


def test_training_mode_batch_norm_without_dependence_is_not_supported():
    _, _, tr, *_ = summarize(bn_train=0.0)
    assert tr.verdict == "not supported" and "other side" in tr.reason


def test_recalibration_worse_than_the_ema_is_not_supported():
    summary, _, _, non, lag, _ = summarize(gains=[-0.02, -0.025, -0.03])
    assert non.verdict == "not supported" and non.label == "recalibrated - EMA"
    assert lag.verdict == "not supported" and "opposite" in lag.reason
    assert summary.verdict == "mixed" and not summary.met


def test_recalibration_slightly_worse_within_the_margin_is_mixed():
    gains = {(16, 0.1): [-0.001, -0.002, -0.0015]}
    _, _, _, non, _, _ = summarize(gains=gains)
    assert non.verdict == "mixed"
    assert "batch 16, momentum 0.1: mixed" in non.reason and "falls short of the predicted 0.00 points" in non.reason
    assert "batch 128, momentum 0.1: supported" in non.reason


def test_no_lag_at_the_slowest_momentum_is_not_supported_and_one_batch_size_mixed():
    flat = {(16, 0.01): [0.0, 0.0002, -0.0002], (128, 0.01): [0.0, 0.0005, -0.0005]}
    _, _, _, non, lag, _ = summarize(gains=flat)
    assert lag.verdict == "not supported" and "band of no effect" in lag.reason
    assert non.verdict == "supported"  # no gain, and no loss either: recalibration is as good as the EMA
    lagging = {(16, 0.01): [0.0, 0.0002, -0.0002], (128, 0.01): [0.05, 0.06, 0.07]}
    _, _, _, _, lag, _ = summarize(gains=lagging)
    assert lag.verdict == "mixed"
    assert "batch 16: not supported" in lag.reason and "batch 128: supported" in lag.reason


def test_a_batch_dependent_instance_arm_makes_c12_mixed():
    _, _, _, _, _, free = summarize(free={"instance": 0.01})
    assert free.claim == "C12" and free.verdict == "mixed"
    assert "instance: not supported" in free.reason and "group: supported" in free.reason


def test_two_seeds_are_inconclusive():
    summary, *findings = summarize(seeds=(0, 1))
    assert all(f.verdict == "inconclusive" for f in findings)
    assert "only 2 seeds" in findings[0].reason and summary.verdict == "inconclusive"


def test_resumed_job_without_emas_is_left_out_and_noted():
    summary, _, _, non, _, _ = summarize(drop_ema={(128, 1)})
    assert any("No final EMA values for batch, batch 128, seed 1" in n for n in summary.notes)
    assert "batch 128, momentum 0.01: inconclusive" in non.reason and "only 2 seeds" in non.reason


def test_notes_describe_the_figures():
    summary, *_ = summarize(bn_train=[0.05, 0.06, 0.07])
    text = " ".join(summary.notes)
    assert "'batch' 0.06 at batch 16, 0.06 at batch 128; 'group' 0 at batch 16" in text
    assert ("EMA momentum 0.01\" (mean line over seeds): batch 16: +3.00 points at step 100, +1.00 at the end "
            "(step 200), highest +3.00 at step 100, +2.00 averaged over the evaluations") in text
    assert "lines of 'group', 'layer', 'instance' lie on top of each other at 0" in text
    assert "from batch 16 to 128 it falls 1x, where 1/sqrt(batch) predicts 2.8x" in text
    assert "every arm's line is at exactly 0: the probe outputs agreed bitwise" in text
    assert "matched its running statistics within 1.0e-07" in text
    assert "fell by more than 5 points from one evaluation to the next" in text


def test_rules_follow_the_params():
    rules = EXPERIMENT.rules({"tolerance": 1e-4, "momenta": [0.2, 0.05], "lag_band": 0.01})
    assert rules["eval"].equivalence == pytest.approx(0.01) and rules["train"].null == pytest.approx(0.01)
    assert "momentum 0.05" in rules["lag"].statistic and rules["lag"].equivalence == pytest.approx(1.0)
    assert rules["noninferior"].null == pytest.approx(-0.5) and rules["noninferior"].target == 0.0


def test_summary_rejects_another_grid_axis():
    cfg = config()
    cfg["grid"]["train.momentum"] = [0.0, 0.9]
    with pytest.raises(ValueError, match="grid axis 'train.batch_size' only"):
        EXPERIMENT.summarize(make_rows(), cfg)


# ---------------------------------------------------------------------------------------------
# Derived settings


def test_job_config_derives_lr_steps_and_evaluations():
    base = EXPERIMENT.quick_config()
    for size, lr, steps, every in ((16, 0.05, 1600, 200), (128, 0.4, 200, 25)):
        cfg = EXPERIMENT.job_config(apply_overrides(base, {AXIS: size}, parse=False))
        assert (cfg.train.lr, cfg.train.steps, cfg.train.eval_every) == (pytest.approx(lr), steps, every)
    assert set(EXPERIMENT.derived) == {"train.lr", "train.steps", "train.eval_every"}
    with pytest.raises(ConfigError, match="derives train.lr"):
        check_user_overrides(apply_overrides(base, {"train.lr": 0.1}), ["train.lr"], EXPERIMENT.derived)


@pytest.mark.parametrize("override, match", [
    ({AXIS: 1}, r"train.batch_size >= 2"),
    ({"params.momenta": [0.1, 1.5]}, r"params.momenta must be a non-empty list of EMA momenta in \(0, 1\]"),
    ({"params.momenta": []}, r"params.momenta must be a non-empty list"),
    ({"params.recal_examples": 0}, r"params.recal_examples must be > 0, got 0"),
])
def test_job_config_rejects_bad_settings(override, match):
    with pytest.raises(ConfigError, match=match):
        EXPERIMENT.job_config(apply_overrides(EXPERIMENT.quick_config(), override, parse=False))


# ---------------------------------------------------------------------------------------------
# Measurements


def test_batch_mate_dependence_matches_a_float64_formula():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    x = torch.randn(11, 3, dtype=torch.float64)
    probes, a, b = x[:2], x[2:6], x[6:10]

    def by_hand(mates):  # training-mode batch norm, written out
        batch = torch.cat([probes, mates])
        z = (batch - batch.mean(0)) / (batch.var(0, unbiased=False) + bn.eps).sqrt()
        return (z * bn.weight + bn.bias)[:2]

    ya, yb = by_hand(a), by_hand(b)
    expected = float((ya - yb).abs().max().detach() / ya.square().mean().sqrt().detach())
    assert batch_mate_dependence(bn.train(), probes, a, b) == pytest.approx(expected, rel=1e-12)
    assert batch_mate_dependence(bn.eval(), probes, a, b) == 0.0
    assert math.isnan(batch_mate_dependence(lambda x: x * math.nan, probes, a, b))  # a broken network
    with pytest.raises(ValueError, match="two equally large, non-empty sets of batch-mates"):
        batch_mate_dependence(bn, probes, a, b[:2])


def test_norms_in_training_mode_leaves_dropout_in_eval_mode():
    net = build_model(ModelConfig(kind="cnn", widths=[4, 4], activation="relu", norm="batch", dropout=0.5), (1, 8, 8), 3)
    modes = {type(m).__name__: m.training for m in norms_in_training_mode(net).modules()}
    assert modes == {"Sequential": False, "Block": False, "Conv2d": False, "BatchNorm2d": True, "ReLU": False,
                     "Dropout": False, "AdaptiveAvgPool2d": False, "Flatten": False, "Linear": False}


def _trained(momentum_of_norms=None, steps=30, attach=True, seed=0):
    """A small batch-norm CNN trained on synthetic data (a shadow-EMA probe attached first), and the data."""
    data = load_dataset("synthetic", limit=200)
    torch.manual_seed(seed)
    net = build_model(ModelConfig(kind="cnn", widths=[4, 8], activation="relu", norm="batch"), data.input_shape, 10)
    if momentum_of_norms is not None:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum_of_norms
    cfg = EXPERIMENT.quick_config()
    remove = None
    if attach:
        _, remove = EXPERIMENT.probes(cfg, "batch")[0].attach(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (16,), generator=g)
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), data, remove


def test_shadow_emas_equal_the_running_statistics_of_networks_built_with_those_momenta():
    net, data, remove = _trained()
    shadow = SHADOWS[net]
    assert shadow.valid and shadow.updates == 30 and shadow.check(net) < 1e-5
    for momentum in (0.01, 0.5):
        oracle, _, _ = _trained(momentum_of_norms=momentum, attach=False)
        for p, q in zip(net.parameters(), oracle.parameters()):  # the momentum never enters a training step
            assert torch.equal(p, q)
        fresh = copy.deepcopy(net)
        shadow.load(fresh, momentum)
        for mine, theirs in zip(fresh.modules(), oracle.modules()):
            if isinstance(mine, nn.BatchNorm2d):
                torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    remove()
    assert net not in SHADOWS


def test_measurements_record_both_modes_and_the_emas_beside_the_recalibrated_accuracy():
    net, data, remove = _trained()
    cfg = apply_overrides(EXPERIMENT.quick_config(), {AXIS: 16}, parse=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    updates = SHADOWS[net].updates
    with torch.no_grad():
        out = EXPERIMENT.measurements(net, data, cfg, "batch")
    assert out["dep_eval"] == 0.0 and out["dep_train"] > 1e-3
    assert out["ema_check"] < 1e-5
    own = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert out["ema_acc_m0.1"] == pytest.approx(own)  # the model's own momentum: its own running statistics
    for m in ("0.01", "0.1", "0.5"):
        assert out[f"gain_m{m}"] == pytest.approx(out["recal_acc"] - out[f"ema_acc_m{m}"])
    # The measurement changed nothing: not the model, and not the EMAs (the copies' forwards do not count).
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert SHADOWS[net].updates == updates
    remove()


def test_measurements_of_a_batch_independent_norm_have_no_emas():
    data = load_dataset("synthetic", limit=200)
    net = build_model(ModelConfig(kind="cnn", widths=[4, 8], activation="relu", norm="layer"), data.input_shape, 10)
    cfg = apply_overrides(EXPERIMENT.quick_config(), {AXIS: 16}, parse=False)
    with torch.no_grad():
        out = EXPERIMENT.measurements(net.eval(), data, cfg, "layer")
    assert out == {"dep_eval": 0.0, "dep_train": 0.0}


def test_a_resumed_model_gets_no_ema_values():
    net, data, remove = _trained(attach=False)  # running statistics already updated, as after a resume
    _, remove = EXPERIMENT.probes(EXPERIMENT.quick_config(), "batch")[0].attach(net)
    assert not SHADOWS[net].valid
    cfg = apply_overrides(EXPERIMENT.quick_config(), {AXIS: 16}, parse=False)
    with torch.no_grad():
        out = EXPERIMENT.measurements(net, data, cfg, "batch")
    assert "recal_acc" in out and not any(k.startswith(("ema_", "gain_")) for k in out)
    remove()


def test_batch_larger_than_the_test_split_is_refused():
    data = load_dataset("synthetic", limit=200)
    net = build_model(ModelConfig(kind="cnn", widths=[4], activation="relu", norm="layer"), data.input_shape, 10)
    cfg = apply_overrides(EXPERIMENT.quick_config(), {AXIS: len(data.y_test) + 1}, parse=False)
    with pytest.raises(ValueError, match=r"needs 2 <= train.batch_size <= 400"):
        EXPERIMENT.measurements(net.eval(), data, cfg, "layer")


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [4, 8], "train.seeds": 2, "train.device": "cpu",
        "params.examples": 160, "params.evaluations": 2, "params.recal_examples": 64,
    }, parse=False)
    cfg.grid = {AXIS: [8, 16]}
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    steps = {(r["arm"], r["point"][AXIS]): r["step"] for r in rows}
    assert steps == {(arm, size): 160 // size for arm in ("batch", *FREE) for size in (8, 16)}
    assert len(rows) == 4 * 2 * 2 * 3  # arms x batch sizes x seeds x evaluations (step 0 and 2 more)
    last = [r for r in rows if r["arm"] == "batch" and r["step"] == 20]
    assert all(r["probes"]["dep_eval"] == 0.0 and r["probes"]["dep_train"] > 1e-3 for r in last)
    assert all(r["probes"]["ema_acc_m0.1"] == pytest.approx(r["test_acc"]) for r in last)
    assert all(r["probes"]["ema_check"] < 1e-5 for r in last)
    assert all(r["probes"]["dep_eval"] == r["probes"]["dep_train"] == 0.0 for r in rows if r["arm"] != "batch")
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    report = write_report(tmp_path / "run")
    assert "C12" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
    assert math.isfinite(summary.findings[1].estimate)


def test_interpretation_follows_the_gains():
    gains = {(16, 0.01): 0.05, (16, 0.1): 0.02, (16, 0.5): 0.005, (128, 0.01): 0.2, (128, 0.1): 0.1, (128, 0.5): 0.03}
    summary, *_ = summarize(gains=gains)
    text = " ".join(summary.notes)
    assert "batch 16 / momentum 0.01 (+5.0), batch 16 / momentum 0.1 (+2.0), batch 128 / momentum 0.01" in text
    assert "13% (batch 128) of its weight on torch's initial values" in text  # 0.99 ** 200
    assert "At batch 16 the gain shrinks as the momentum grows (0.01: +5.0, 0.1: +2.0, 0.5: +0.5 points)" in text
    assert "At every momentum the gain is larger at batch 128 than at batch 16" in text
    assert "EMA lag is" not in text
    flat = {(size, m): [0.0, 0.0002, -0.0002] for size in SIZES for m in MOMENTA}
    summary, *_ = summarize(gains=flat)
    text = " ".join(summary.notes)
    assert "Wu & Johnson's EMA lag is not supported here" in text
    assert "gained more than a point" not in text and "gain shrinks" not in text


def test_a_diverged_network_is_measured_without_error_and_noted():
    net, data, remove = _trained()
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    cfg = apply_overrides(EXPERIMENT.quick_config(), {AXIS: 16}, parse=False)
    with torch.no_grad():
        out = EXPERIMENT.measurements(net, data, cfg, "batch")
    assert out == {}
    remove()
    rows = make_rows()
    last = [r for r in rows if (r["arm"], r["seed"], r["point"][AXIS], r["step"]) == ("layer", 1, 128, 200)][0]
    last["diverged"] = True
    summary = EXPERIMENT.summarize(rows, config())
    assert any("Diverged (loss NaN or infinite" in n and "layer, batch 128, seed 1 (step 200)" in n for n in summary.notes)
