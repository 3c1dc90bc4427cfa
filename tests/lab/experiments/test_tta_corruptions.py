"""tta-corruptions (C8t, issue 16): the verdict rules on hand-made metrics rows, the claim's place
in the suite's index, the "series" figure kind, and one tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.lab.claims import CLAIMS, claim_order
from normlab.lab.config import ConfigError, apply_overrides, config_to_dict
from normlab.lab.experiments import all_experiments
from normlab.lab.experiments._tta_eval import methods
from normlab.lab.experiments.base import FigureSpec
from normlab.lab.figures import plot_figure
from normlab.lab.report import write_report
from normlab.lab.suite import select_experiments
from normlab.lab.trainer import Trainer

EXPERIMENT = all_experiments()["tta-corruptions"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config():
    return config_to_dict(EXPERIMENT.quick_config())


def make_rows(errors, seeds=(0, 1, 2)):
    """Final rows of a run on the quick config; ``errors(method, corruption, severity, k)`` gives the
    error of seed number ``k`` (the mean over corruptions is computed as the measurement does)."""
    params = config()["params"]
    rows = []
    for k, seed in enumerate(seeds):
        probes = {}
        for method in methods(params):
            for severity in (0, *params["severities"]):
                vals = [errors(method, c, severity, k) for c in params["corruptions"]]
                for c, v in zip(params["corruptions"], vals):
                    probes[f"err_{c}:{method}:{severity}"] = v
                probes[f"err_mean:{method}:{severity}"] = sum(vals) / len(vals)
        for step, p in ((0, {}), (600, probes)):
            rows.append({"step": step, "arm": "batch", "seed": seed, "train_loss": 0.3, "train_loss_sd": 0.1,
                         "test_loss": 0.3, "test_acc": 0.9, "wall_time": 0.0, "probes": p})
    return rows


def shifted(reduction):
    """Errors where every method but the source cuts the source's error by ``reduction(k)``
    (a fraction) at every severity above 0."""
    def errors(method, corruption, severity, k):
        source = 0.1 + 0.1 * severity + 0.01 * k
        return source if method == "source" or severity == 0 else source * (1 - reduction(k))
    return errors


def summarize(rows):
    return EXPERIMENT.summarize(rows, config())


def test_large_reductions_are_supported():
    summary = summarize(make_rows(shifted(lambda k: 0.4 + 0.02 * k)))
    assert [f.verdict for f in summary.findings] == ["supported", "supported"]
    assert summary.verdict == "supported" and summary.met
    assert summary.findings[0].estimate == pytest.approx(42.0)
    assert summary.findings[0].label == "adapt_bn N=0" and summary.findings[1].label == "TENT"
    # severity 5: source 0.60, 0.61, 0.62; adapted 0.60 x 0.60, 0.61 x 0.58, 0.62 x 0.56
    assert "source 61.0%, recalibrate_bn 35.4%, adapt_bn N=0 35.4%" in summary.headline
    assert summary.rows[2][1] == "adapt_bn N=0" and summary.rows[2][-1].startswith("42.0% [")
    assert "ours beside the published: adapt_bn N=0 42.0% (Wang et al.'s test-batch statistics: 53%" in summary.notes[0]


def test_small_reductions_are_mixed():
    summary = summarize(make_rows(shifted(lambda k: 0.05 + 0.01 * k)))
    assert [f.verdict for f in summary.findings] == ["mixed", "mixed"]
    assert "falls short of the predicted 19.0%" in summary.findings[0].reason


def test_adaptation_that_raises_the_error_is_not_supported():
    summary = summarize(make_rows(shifted(lambda k: -0.2 - 0.01 * k)))
    assert summary.verdict == "not supported"
    assert "the opposite of the claimed effect" in summary.findings[0].reason


def test_tent_and_adapt_bn_are_judged_apart():
    def errors(method, corruption, severity, k):
        source = 0.5
        if method == "TENT" and severity:
            return source * 1.1 + 0.01 * k
        return source if method == "source" or severity == 0 else 0.25 + 0.01 * k
    summary = summarize(make_rows(errors))
    assert [f.verdict for f in summary.findings] == ["supported", "not supported"]
    assert summary.verdict == "mixed"


def test_two_seeds_or_no_measurements_are_inconclusive():
    summary = summarize(make_rows(shifted(lambda k: 0.4), seeds=(0, 1)))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    rows = [r for r in make_rows(shifted(lambda k: 0.4)) if r["step"] == 0]
    summary = summarize(rows)
    assert summary.verdict == "inconclusive" and "no job recorded the corruption errors" in summary.findings[0].reason
    assert summary.rows == []


def test_the_rule_is_declared_from_the_params():
    rules = EXPERIMENT.rules({"rule_severity": 3, "rule_prior": 16, "target_reduction": 30.0})
    assert rules["adapt"].target == 30.0 and "severity 3" in rules["adapt"].statistic
    assert "adapt_bn N=16" in rules["adapt"].statistic and rules["tent"].claim == "C8t"


def test_job_config_checks_the_params():
    cfg = EXPERIMENT.quick_config()
    with pytest.raises(ConfigError, match=r"params.corruptions must be a non-empty list of \['gaussian_noise'"):
        EXPERIMENT.job_config(apply_overrides(cfg, {"params.corruptions": ["fog"]}, parse=False))
    with pytest.raises(ConfigError, match="params.rule_prior .* must be one of params.priors"):
        EXPERIMENT.job_config(apply_overrides(cfg, {"params.rule_prior": 7}, parse=False))
    with pytest.raises(ConfigError, match="params.test_batch must be an int >= 2"):
        EXPERIMENT.job_config(apply_overrides(cfg, {"params.test_batch": 1}, parse=False))


def test_the_claim_sorts_beside_c8_in_the_index_and_selects_this_experiment():
    ids = list(CLAIMS)
    assert ids[ids.index("C8") + 1] == "C8t"
    assert sorted(ids, key=claim_order) == ids
    assert [e.name for e in select_experiments(claims=["C8t"])] == ["tta-corruptions"]


def test_series_figure_draws_one_line_per_name():
    rows = make_rows(shifted(lambda k: 0.4))
    fig = plot_figure(FigureSpec(kind="series", probe="err_mean", title="t", ylabel="error", xlabel="severity"), rows)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == methods(config()["params"])
    source = ax.get_lines()[0]
    assert list(source.get_xdata()) == [0, 1, 2, 3, 4, 5]
    assert source.get_ydata()[5] == pytest.approx(0.6 + 0.01)  # mean over seeds 0.60, 0.61, 0.62
    with pytest.raises(ValueError, match="series figure 't': reduce must be 'first' or 'final'"):
        plot_figure(FigureSpec(kind="series", probe="err_mean", title="t", ylabel="", reduce="best"), rows)


def test_tiny_run_end_to_end(tmp_path):
    cfg = apply_overrides(EXPERIMENT.quick_config(), {
        "data.name": "synthetic", "model.widths": [4, 8], "train.seeds": 2, "train.steps": 20, "train.eval_every": 10,
        "train.device": "cpu", "params.recal_examples": 64, "params.corruptions": ["contrast", "shift"],
        "params.severities": [1, 5], "params.test_batch": 100,
    }, parse=False)
    rows = Trainer(EXPERIMENT, cfg, tmp_path / "run", progress=False, jobs=1).run()
    assert sorted(r["step"] for r in rows) == [0, 0, 10, 10, 20, 20]
    assert all(not r["probes"] for r in rows if r["step"] < 20)  # measured once, at the end
    last = [r for r in rows if r["step"] == 20]
    for row in last:
        probes = row["probes"]
        assert probes["err_mean:source:0"] == pytest.approx(1 - row["test_acc"], abs=0.02)  # precise vs running
        assert probes["err_mean:TENT:5"] == pytest.approx((probes["err_contrast:TENT:5"] + probes["err_shift:TENT:5"]) / 2)
        assert all(0 <= v <= 1 for v in probes.values())
    summary = EXPERIMENT.summarize(rows, config_to_dict(cfg))
    assert summary.verdict == "inconclusive" and "only 2 seeds" in summary.findings[0].reason
    assert math.isfinite(summary.findings[0].estimate)
    report = write_report(tmp_path / "run")
    assert "C8t" in report["md"].read_text()
    assert len(list((tmp_path / "run" / "figures").glob("*.png"))) == len(EXPERIMENT.figures)
