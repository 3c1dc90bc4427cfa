"""santurkar2018-noisy-bn's declared rules (drift, speed, loss variation, gradient change; all C3)
on hand-made metrics rows, and one tiny end-to-end run."""

from __future__ import annotations

import pytest

from normlab.lab.config import apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments

EXPERIMENT = all_experiments()["santurkar2018-noisy-bn"]
CONFIG = config_to_dict(EXPERIMENT.quick_config())
GOOD = {  # arm: (drift of the median in spreads, curve-area accuracy, loss variation, gradient change)
    "none": (0.2, 0.70, 0.8, 2.0),
    "batch": (0.05, 0.90, 0.2, 0.5),
    "noisy": (0.6, 0.90, 0.25, 0.6),
}


def rows(arms: dict[str, tuple[float, float, float, float]], seeds: int = 3, steps: int = 200):
    """Rows whose probed median moves by drift spreads over training, whose accuracy is the given
    curve area at every evaluation (step 0 included), with the given landscape values."""
    out = []
    for arm, (drift, acc, variation, change) in arms.items():
        for seed in range(seeds):
            jitter = 1 + 0.05 * seed
            for step in range(0, steps + 1, 50):
                median = drift * step / steps * jitter
                out.append({"step": step, "arm": arm, "seed": seed, "test_acc": acc + 0.002 * seed, "train_loss": 1.0,
                            "probes": {"layer_input_p15": median - 0.5, "layer_input_p50": median,
                                       "layer_input_p85": median + 0.5, "loss_variation": variation * jitter,
                                       "grad_change": change * jitter, "beta_smoothness": 1.0}})
    return out


def verdicts(summary):
    return [f.verdict for f in summary.findings]


def test_supported_when_noisy_bn_drifts_more_trains_as_fast_and_bn_is_smoother():
    summary = EXPERIMENT.summarize(rows(GOOD), CONFIG)
    assert verdicts(summary) == ["supported"] * 4 and summary.verdict == "supported" and summary.met
    assert "the layer's input drift more than without BN, yet noisy BN learned as fast as BN" in " ".join(summary.notes)


def test_not_supported_when_noisy_bn_is_steadier_slower_and_bn_rougher():
    bad = {"none": (0.6, 0.90, 0.1, 0.2), "batch": (0.05, 0.90, 0.5, 1.0), "noisy": (0.1, 0.70, 0.5, 1.0)}
    summary = EXPERIMENT.summarize(rows(bad), CONFIG)
    assert verdicts(summary) == ["not supported"] * 4 and summary.verdict == "not supported" and not summary.met


def test_mixed_when_noisy_bn_drifts_more_but_trains_slower():
    mixed = dict(GOOD, noisy=(0.6, 0.80, 0.25, 0.6))
    summary = EXPERIMENT.summarize(rows(mixed), CONFIG)
    assert verdicts(summary) == ["supported", "not supported", "supported", "supported"]
    assert summary.verdict == "mixed"
    assert "it did not train as fast as BN on this network" in " ".join(summary.notes)


def test_two_seeds_are_inconclusive():
    summary = EXPERIMENT.summarize(rows(GOOD, seeds=2), CONFIG)
    assert set(verdicts(summary)) == {"inconclusive"} and summary.findings[0].reason.startswith("only 2 seeds")


def test_speed_inside_the_band_edge_is_inconclusive():
    # A curve-area gap of 2 points +- seed noise straddles the +-2 point band.
    edge = dict(GOOD, noisy=(0.6, 0.88, 0.25, 0.6))
    out = rows(edge)
    for row in out:
        if row["arm"] == "noisy" and row["seed"] == 1:
            row["test_acc"] += 0.02
    assert EXPERIMENT.summarize(out, CONFIG).findings[1].verdict == "inconclusive"


def test_a_missing_arm_is_inconclusive_not_an_error():
    summary = EXPERIMENT.summarize(rows({"none": GOOD["none"], "batch": GOOD["batch"]}), CONFIG)
    assert summary.findings[0].verdict == "inconclusive" and "no seed has both arms 'noisy' and 'none'" in summary.findings[0].reason


def test_tiny_end_to_end_run(tmp_path):
    from normlab.lab.report import write_report
    from normlab.lab.trainer import Trainer

    config = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [12, 12], "train.steps": 20, "train.eval_every": 10,
        "train.seeds": 2, "params.probe_batch": 64}, parse=False)
    rows_ = Trainer(EXPERIMENT, config, tmp_path / "run", progress=False, jobs=1).run()
    probes = rows_[-1]["probes"]
    for key in ("loss_variation", "grad_change", "beta_smoothness", "layer_input_p50", "layer_input_eval_p50"):
        assert key in probes
    by_arm = {r["arm"]: r["probes"] for r in rows_ if r["step"] == 20 and r["seed"] == 0}
    # At inference noisy BN is BN (same eval-mode weights only if they trained alike; the
    # training-mode probe differs because the noise is on).
    assert by_arm["noisy"]["layer_input_p50"] != by_arm["batch"]["layer_input_p50"]
    summary = EXPERIMENT.summarize(rows_, config_to_dict(config))
    assert set(verdicts(summary)) == {"inconclusive"}  # 2 seeds
    paths = write_report(tmp_path / "run", experiment=EXPERIMENT)
    assert (tmp_path / "run" / "report.md").is_file() and paths
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
