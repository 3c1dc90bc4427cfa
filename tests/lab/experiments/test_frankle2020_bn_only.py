"""frankle2020-bn-only's declared rules (X1: BN-only vs output-only, BN-only growth with size) on
hand-made metrics rows, the derived widths, and one tiny end-to-end run."""

from __future__ import annotations

import pytest

from normlab.lab.config import ConfigError, apply_overrides, arm_config, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments.frankle2020_bn_only import widths_for

EXPERIMENT = all_experiments()["frankle2020-bn-only"]
CONFIG = config_to_dict(EXPERIMENT.quick_config())  # depth 3 and 4 at width 16


def rows(acc: dict[tuple[str, int], float], seeds: int = 3, steps: int = 100):
    """Rows where arm at depth d ends at acc[(arm, d)] (+ a little per seed)."""
    out = []
    for (arm, depth), a in acc.items():
        for seed in range(seeds):
            for step in range(0, steps + 1, 50):
                out.append({"step": step, "arm": arm, "seed": seed, "point": {"params.depth": depth},
                            "test_acc": 0.1 if step == 0 else a + 0.003 * seed, "train_loss": 1.0, "probes": {}})
    return out


def accs(bn3, bn4, out4, all4=0.97, out3=0.6, all3=0.95):
    return {("all", 3): all3, ("bn-only", 3): bn3, ("output-only", 3): out3,
            ("all", 4): all4, ("bn-only", 4): bn4, ("output-only", 4): out4}


def verdicts(summary):
    return [f.verdict for f in summary.findings]


def test_supported_when_bn_only_beats_output_only_and_grows_with_depth():
    summary = EXPERIMENT.summarize(rows(accs(bn3=0.7, bn4=0.85, out4=0.6)), CONFIG)
    assert verdicts(summary) == ["supported", "supported"] and summary.met
    assert "depth 4, width 16" in summary.headline
    assert any("BN-only / all" == r[1] and r[2] == f"{0.85 / 0.97:.2f}" for r in summary.rows if r[0].startswith("depth 4"))


def test_not_supported_when_output_only_wins_and_bn_only_shrinks():
    summary = EXPERIMENT.summarize(rows(accs(bn3=0.8, bn4=0.7, out4=0.9)), CONFIG)
    assert verdicts(summary) == ["not supported", "not supported"] and summary.verdict == "not supported"
    assert "a linear classifier on the random features" in " ".join(summary.notes)


def test_mixed_when_bn_only_wins_but_does_not_grow():
    summary = EXPERIMENT.summarize(rows(accs(bn3=0.9, bn4=0.8, out4=0.6)), CONFIG)
    assert verdicts(summary) == ["supported", "not supported"] and summary.verdict == "mixed"


def test_two_seeds_are_inconclusive():
    summary = EXPERIMENT.summarize(rows(accs(bn3=0.7, bn4=0.85, out4=0.6), seeds=2), CONFIG)
    assert set(verdicts(summary)) == {"inconclusive"} and summary.findings[0].reason.startswith("only 2 seeds")


def test_one_network_size_leaves_growth_inconclusive():
    one = {k: v for k, v in accs(bn3=0.7, bn4=0.85, out4=0.6).items() if k[1] == 4}
    summary = EXPERIMENT.summarize(rows(one), CONFIG)
    assert verdicts(summary) == ["supported", "inconclusive"]
    assert "the grid has one network size only" in summary.findings[1].reason


def test_widths_are_derived_from_depth_and_width():
    config = EXPERIMENT.default_config()
    job = EXPERIMENT.job_config(arm_config(config, "bn-only", {"params.depth": 4, "params.width": 32}))
    assert job.model.widths == [32, 64, 128, 256] and job.train.trainable == "norm"
    assert widths_for(2, 16) == [16, 32]
    with pytest.raises(ConfigError, match=r"params.depth must be a positive int .* got 0"):
        widths_for(0, 16)


def test_tiny_end_to_end_run(tmp_path):
    from normlab.lab.report import write_report
    from normlab.lab.trainer import Trainer

    config = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "params.width": 4, "train.steps": 10, "train.eval_every": 5, "train.seeds": 2},
        parse=False)
    config.grid = {"params.depth": [1, 2]}
    out = Trainer(EXPERIMENT, config, tmp_path / "run", progress=False, jobs=1).run()
    assert {r["arm"] for r in out} == set(EXPERIMENT.default_config().arms) and len(out) == 3 * 2 * 2 * 3
    summary = EXPERIMENT.summarize(out, config_to_dict(config))
    assert set(verdicts(summary)) == {"inconclusive"}  # 2 seeds
    write_report(tmp_path / "run", experiment=EXPERIMENT)
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
