"""Li et al. 2019: dropout and batch norm, in both orders, and the variance shift (claim C14).

Claim tested: C14, batch norm works well with dropout when batch norm comes *before* dropout.
Li, Chen, Hu & Yang 2019 ("Understanding the disharmony between dropout and batch normalization
by variance shift") explain why the other order hurts: dropout scales what it keeps by
1/(1-p) in training and does nothing at test time, so a batch norm fed by dropout gathers a
running variance that differs from the variance its input has at test time (the *variance
shift*), and the mismatch grows with the rate and accumulates over layers. Their remedy: dropout
only after the last batch norm.

Setup: a 4 x 100 ReLU MLP (He initialization, ``init_gain`` = sqrt 2), plain SGD (lr 0.1, batch
60) on mnist-5k, at dropout rates ``grid["model.dropout"]`` (0 included: the no-dropout
reference), in four arms that share a seed's initial weights and batches:

* ``bn-block``: ``Linear -> BN -> ReLU -> dropout`` in every block, so each block's dropout feeds
  the next block's batch norm (Li et al.'s "dropout then BN", with the weight layer between, as in
  their ResNet/DenseNet cases; ``model.dropout_position="block"``, the lab's default);
* ``bn-head``: the same network with one dropout before the output layer, after every batch norm
  (Li et al.'s remedy; ``dropout_position="head"``);
* ``none-block``, ``none-head``: both without batch norm, the control for how much of a gap between
  the two orders is only "more dropout" (four dropout layers against one).

Statistics, per seed, then mean and 95% t-interval over seeds (Rules declared in :meth:`rules`):

* **C14, accuracy.** ``d = 100 * (acc(bn-head) - acc(bn-block))`` at ``params["rate"]`` (0.5,
  the paper's anchor rate), final test accuracy, in points. Expected: above ``params["min_gain"]``
  (1 point) with the CI above 0; a CI within +-``params["band"]`` (0.5 points) is "no effect".
* **C14, variance shift.** Per job, at the final evaluation, ``S`` = the mean over the batch
  norms after the first of each layer's shift (:mod:`._variance_shift`: per channel
  ``max(r/v, v/r)`` of running variance ``r`` and test-set variance ``v`` of the norm's input,
  averaged over channels, as Li et al.). Statistic: ``S(bn-block) / S(bn-head)`` at the anchor
  rate, geometric mean over seeds. Expected: at least ``params["min_shift"]`` (1.1x: a 10%
  mismatch of variance) with the CI above 1x.

The two findings combine into one C14 finding. Reported without a rule: the same differences at
every rate (the harm grows with the rate, Li et al. say), each arm's change from no dropout (the
published anchor's comparison), the no-norm control, the per-layer shift (figures), and Li et
al.'s direct check of the mechanism: the test accuracy after the batch norms' running statistics
are recomputed on the training set with dropout off (:func:`normlab.surgery.recalibrate_bn`,
batches of the training batch size), ``test_acc_recal``. The accuracy this recovers in the
bn-block arm is the part of its loss that the variance shift explains. (This check was added
after the first quick run, to read the no-norm control; it has no rule and decides nothing.)

Published anchor: DenseNet on CIFAR-100, 77.42% test accuracy without dropout vs 68.55% with
dropout 0.5 in every bottleneck (Li et al. 2019).

Forms: quick 3 seeds x 1,500 steps at rates 0, 0.2, 0.5, evaluating (and measuring) every 150
steps (172 s of user CPU with ``--jobs 2`` when it evaluated every 100 steps; fewer evaluations cost
less); full 5 seeds x 4,000 steps at rates 0, 0.1, 0.2, 0.3, 0.5, every 100 steps.
"""

from __future__ import annotations

import math
from typing import Any

from ...surgery import recalibrate_bn
from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import geometric_mean_ci, mean_ci
from ..rows import diverged, final, group_jobs
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Summary
from .registry import register
from ._li2019_notes import interpretation, profile_note
from ._variance_shift import variance_shift

__all__ = ["LiVarianceShift"]

AXIS = "model.dropout"
ARMS = ("bn-block", "bn-head", "none-block", "none-head")

PUBLISHED = [
    "Li, Chen, Hu & Yang 2019 (DenseNet, CIFAR-100): 77.42% test accuracy without dropout vs 68.55% with "
    "dropout 0.5 in every bottleneck (dropout feeding the next batch norm): -8.87 points.",
    "Li et al. 2019: the variance shift max(running var / test var, test var / running var) of the batch norms "
    "after dropout grows with the dropout rate and accumulates over layers; with dropout only after the last "
    "batch norm there is none, and dropout helps a little.",
]


def _pts(mean: float, low: float, high: float) -> str:
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def per_seed(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, float], dict[int, float]]:
    """``{(arm, rate): {seed: final value of key}}``; a diverged job has no value."""
    out: dict[tuple[str, float], dict[int, float]] = {}
    for job, job_rows in group_jobs(rows).items():
        rate = dict(job.point).get(AXIS)
        v = None if diverged(job_rows) else final(job_rows, key)
        if rate is not None and v is not None:
            out.setdefault((job.arm, rate), {})[job.seed] = v
    return out


def paired(values: dict[tuple[str, float], dict[int, float]], a: str, b: str, rate: float, fn) -> list[float]:
    """``fn(value of a, value of b)`` per seed that has both at ``rate``."""
    va, vb = values.get((a, rate), {}), values.get((b, rate), {})
    return [fn(va[s], vb[s]) for s in sorted(set(va) & set(vb))]


class LiVarianceShift(Experiment):
    name = "li2019-variance-shift"
    claim = "C14: batch norm works well with dropout (batch norm before dropout)"
    title = "Li et al. 2019: dropout before or after batch norm, and the variance shift"
    description = ("4x100 ReLU MLP at several dropout rates: dropout in every block (feeding the next BN) vs once "
                   "after the last BN; test accuracy and per-layer variance shift, with a no-norm control")
    claims = ("C14",)
    figures = (
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final",
            title="Final test accuracy against the dropout rate", ylabel="final test accuracy",
            caption="Rate 0 is the network without dropout (the two positions are then the same network). Mean over "
                    "seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="grid", metric="var_shift", axis=AXIS, reduce="final",
            title="Variance shift of the later batch norms, end of training",
            ylabel="variance shift (1 = none)", levels=((1.0, "no shift"),),
            caption="Per batch norm: mean over channels of max(running var / test var, test var / running var) of "
                    "its input on the test set (eval mode), averaged over the batch norms of blocks 2-4. Only arms "
                    "with batch norm have values.",
        ),
        FigureSpec(
            kind="profile", probe="var_shift", reduce="final", panel=AXIS,
            title="Variance shift per batch norm at the end of training, by dropout rate",
            ylabel="variance shift (1 = none)",
            caption="Layer i is block i's batch norm; the first sees the input, which no dropout touches. Mean "
                    "over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="grid", metric="test_acc_recal", axis=AXIS, reduce="final",
            title="Test accuracy, BN statistics recomputed without dropout",
            ylabel="final test accuracy (recalibrated)",
            caption="Li et al.'s check: each batch norm's running mean and variance recomputed on the training set "
                    "in eval mode (dropout off), then the test set evaluated. Batch-norm arms only; compare with the "
                    "first figure. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", where=((AXIS, 0.5),),
            title="Test accuracy during training at dropout rate 0.5", ylabel="test accuracy",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # He initialization for ReLU, so the plain control starts well scaled; four hidden layers so
            # that three batch norms follow a dropout in the bn-block arm (the shift accumulates with depth).
            model=ModelConfig(kind="mlp", widths=[100] * 4, activation="relu", init_gain=2 ** 0.5),
            train=TrainConfig(steps=4000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=100,
                              checkpoint_every=1000),
            arms={
                "bn-block": {"model.norm": "batch", "model.dropout_position": "block"},
                "bn-head": {"model.norm": "batch", "model.dropout_position": "head"},
                "none-block": {"model.norm": "none", "model.dropout_position": "block"},
                "none-head": {"model.norm": "none", "model.dropout_position": "head"},
            },
            grid={AXIS: [0.0, 0.1, 0.2, 0.3, 0.5]},
            # rate: Li et al.'s anchor rate. min_gain: one point (10 digits of a 1,000-digit test set),
            # a gap a practitioner would act on; band: half a point is within what seeds move.
            params={"rate": 0.5, "min_gain": 1.0, "band": 0.5, "min_shift": 1.1},
        )

    def quick_config(self) -> ExperimentConfig:
        # Evaluations every 150 steps: each measures the shift and recalibrates a copy, which is most of
        # the quick form's cost beyond training; the final evaluation (step 1500) is the same.
        config = apply_overrides(self.default_config(), {"train.steps": 1500, "train.seeds": 3,
                                                         "train.eval_every": 150, "train.checkpoint_every": 750})
        config.grid = {AXIS: [0.0, 0.2, 0.5]}
        return config

    def measurements(self, model, data, config: ExperimentConfig, arm: str) -> dict[str, float]:
        """Li et al.'s variance shift of every batch norm (``var_shift_{i}``, ``var_ratio_{i}``, and
        ``var_shift``, the mean over the norms after the first), and ``test_acc_recal``, the test
        accuracy with the statistics recomputed with dropout off; nothing without batch norm."""
        out = variance_shift(model, data.x_test)
        if out:
            fixed = recalibrate_bn(model, data.x_train.split(config.train.batch_size))
            correct = sum(int((fixed(x).argmax(1) == y).sum())
                          for x, y in zip(data.x_test.split(2000), data.y_test.split(2000)))
            out["test_acc_recal"] = correct / len(data.y_test)
        return out

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule]:
        """The verdict rules, fixed before the run by the config's params (both C14)."""
        rate, gain, band, shift = (params.get("rate", 0.5), params.get("min_gain", 1.0), params.get("band", 0.5),
                                   params.get("min_shift", 1.1))
        return (
            Rule("C14", f"final test accuracy with dropout {rate:g} once after the last batch norm minus with dropout "
                        f"{rate:g} in every block (feeding the next batch norm), percentage points",
                 expected=f"dropout after the batch norms beats dropout before them by at least {gain:g} point(s) at "
                          f"rate {rate:g} (95% CI above 0)",
                 null=0.0, direction="greater", target=gain, equivalence=band, unit=" pts", digits=2,
                 published="Li et al. 2019: -8.87 points with dropout 0.5 in every DenseNet bottleneck",
                 label=f"accuracy, BN then dropout - dropout then BN, rate {rate:g}"),
            Rule("C14", f"variance shift of the batch norms after the first, dropout {rate:g} in every block over "
                        f"dropout after the last batch norm (geometric mean)",
                 expected=f"dropout before batch norm shifts the variance at least {shift:g}x more than dropout after "
                          f"it (95% CI above 1x)",
                 null=1.0, direction="greater", target=shift, log=True, digits=2,
                 published="Li et al. 2019: the shift grows with the rate and over layers",
                 label=f"variance shift, block / head, rate {rate:g}"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        acc_rule, shift_rule = self.rules(params)
        rate = params.get("rate", 0.5)
        steps = config["train"]["steps"]
        rows = list(rows)
        acc = per_seed(rows, "test_acc")
        shift = per_seed(rows, "var_shift")
        recal = per_seed(rows, "test_acc_recal")
        rates = sorted(config.get("grid", {}).get(AXIS) or {r for _, r in acc})
        arms = [a for a in (config.get("arms") or {}) if any(k[0] == a for k in acc)] or sorted({a for a, _ in acc})

        table: list[list[str]] = []
        for arm in arms:
            for r in rates:
                accs = list(acc.get((arm, r), {}).values())
                shifts = list(shift.get((arm, r), {}).values())
                fixed = list(recal.get((arm, r), {}).values())
                table.append([arm, f"{r:g}",
                              "{:.4f} [{:.4f}, {:.4f}]".format(*mean_ci(accs, bounds=(0.0, 1.0))) if accs else "n/a",
                              f"{sum(shifts) / len(shifts):.3f}" if shifts else "-",
                              f"{sum(fixed) / len(fixed):.4f}" if fixed else "-", ""])
        gaps: dict[tuple[str, float], tuple[float, float, float] | None] = {}
        for norm in ("bn", "none"):
            for r in rates:
                d = paired(acc, f"{norm}-head", f"{norm}-block", r, lambda h, b: 100 * (h - b))
                gaps[(norm, r)] = mean_ci(d) if d else None
                if d and r > 0:
                    table.append([f"{norm}: head - block", f"{r:g}", "", "", "", _pts(*mean_ci(d)) + " pts"])
        ratios = {r: paired(shift, "bn-block", "bn-head", r, lambda b, h: b / h) for r in rates}
        recovered: dict[float, tuple[float, float, float]] = {}
        for r in rates:
            if ratios[r] and r > 0:
                table.append(["bn: shift block / head", f"{r:g}", "", "", "",
                              "{:.2f}x [{:.2f}, {:.2f}]".format(*geometric_mean_ci(ratios[r]))])
            gained = [100 * (recal[("bn-block", r)][s] - acc[("bn-block", r)][s])
                      for s in sorted(set(recal.get(("bn-block", r), {})) & set(acc.get(("bn-block", r), {})))]
            if gained and r > 0:
                recovered[r] = mean_ci(gained)
                table.append(["bn-block: recalibrated - as trained", f"{r:g}", "", "", "",
                              _pts(*recovered[r]) + " pts"])

        d = paired(acc, "bn-head", "bn-block", rate, lambda h, b: 100 * (h - b))
        if d:
            acc_finding = acc_rule.decide(*mean_ci(d), n=len(d))
        else:
            acc_finding = acc_rule.decide(None, None, None, n=0, note=f"the run lacks bn-head or bn-block at rate {rate:g}")
        if ratios.get(rate):
            shift_finding = shift_rule.decide(*geometric_mean_ci(ratios[rate]), n=len(ratios[rate]))
        else:
            shift_finding = shift_rule.decide(None, None, None, n=0,
                                              note=f"no variance shift of bn-block and bn-head at rate {rate:g}")
        finding = combine("C14", [acc_finding, shift_finding])

        notes = self._notes(acc, shift, gaps, ratios, rates, rate, rows)
        notes += interpretation(acc_finding, shift_finding, gaps, recovered.get(rate), rate, steps)
        if d:
            headline = (f"at dropout {rate:g}, final test accuracy with batch norm before dropout (dropout once, after "
                        f"the last batch norm) minus with dropout before batch norm (in every block): "
                        f"{acc_finding.text}; variance shift of the batch norms after the first, dropout in every "
                        f"block over dropout at the head: {shift_finding.text} (mean over {len(d)} seeds, 95% CI).")
        else:
            headline = f"nothing to compare: the run lacks bn-head or bn-block at dropout rate {rate:g}."
        return Summary.of_findings(
            self, [acc_finding, shift_finding], headline=headline,
            columns=["arm", "dropout rate", "final test accuracy [95% CI]", "variance shift (norms 2..D, mean)",
                     "accuracy, statistics recomputed without dropout (mean)", "difference [95% CI]"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _notes(acc, shift, gaps, ratios, rates, rate, rows) -> list[str]:
        notes = ["Variance shift as computed here: for each batch norm, on the whole test set in eval mode, the "
                 "variance v of each channel of its input (unbiased) against the layer's running variance r; per "
                 "channel max((r+eps)/(v+eps), (v+eps)/(r+eps)), averaged over channels (Li et al. average the same "
                 "ratio over a layer's neurons). 'var_shift' averages the layers after the first."]
        means = {}
        for (arm, r), by in acc.items():
            means[(arm, r)] = sum(by.values()) / len(by)
        for arm in ARMS:
            line = [f"{r:g}: {means[(arm, r)]:.3f}" for r in rates if (arm, r) in means]
            if line:
                notes.append(f"Figure \"Final test accuracy against the dropout rate\", {arm!r}: mean final accuracy "
                             + ", ".join(line) + ".")
        for arm in ("bn-block", "bn-head", "none-block", "none-head"):
            base, top = means.get((arm, 0.0)), means.get((arm, rate))
            if base is not None and top is not None:
                notes.append(f"{arm}: dropout {rate:g} changed the final accuracy by {100 * (top - base):+.1f} points "
                             f"from no dropout ({base:.3f} -> {top:.3f}); Li et al.'s DenseNet lost 8.87 points with "
                             f"dropout 0.5 in every bottleneck.")
        trend = [f"{r:g}: {gaps[('bn', r)][0]:+.2f}" for r in rates if r > 0 and gaps.get(("bn", r))]
        control = [f"{r:g}: {gaps[('none', r)][0]:+.2f}" for r in rates if r > 0 and gaps.get(("none", r))]
        if trend:
            notes.append("Accuracy of dropout after the batch norms minus dropout before them, by rate (points, mean "
                         "over seeds): " + ", ".join(trend) + (
                             ". Without batch norm, head minus block (only the amount of dropout differs): "
                             + ", ".join(control) + "." if control else "."))
        shifts = []
        for r in rates:
            for arm in ("bn-block", "bn-head"):
                by = shift.get((arm, r))
                if by:
                    shifts.append(f"{arm} at {r:g}: {sum(by.values()) / len(by):.3f}")
        if shifts:
            notes.append(f"Figure \"{LiVarianceShift.figures[1].title}\" (mean over seeds): "
                         + ", ".join(shifts) + ".")
        profile = profile_note(rows, rate)
        if profile:
            notes.append(profile)
        return notes


register(LiVarianceShift())
