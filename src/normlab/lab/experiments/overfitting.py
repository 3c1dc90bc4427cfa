"""Overfitting on a small training set: batch norm vs no norm, each with and without dropout.

Claim tested: C6, batch norm makes training less prone to overfitting. Published anchor: Ioffe
& Szegedy 2015 (Sec. 3.4) found that in a batch-normalized network dropout "can be either
removed or reduced in strength", and (Sec. 4.2.1) that removing it from BN-Inception sped up
training "without increasing overfitting".

Setup: a ReLU MLP with two hidden layers of 256 (He initialization), trained on the first 500
training digits of the embedded MNIST subset (a random, roughly class-balanced sample: 38 to 60
per class) and tested on the 1,000 held-out digits; SGD with momentum 0.9, learning rate 0.01,
batch 50, far past the point where the plain network fits every training digit, so it overfits.
Arms: no norm ("none") and batch norm before each ReLU ("batch"), at each dropout probability
of the grid ``model.dropout`` (0 and 0.5, after each hidden block). Arms of one seed share their
initial weights and batches. Every evaluation also measures the eval-mode loss and accuracy on
the 500 training digits (``train.eval_train``): rows carry ``train_acc``, ``test_acc`` and
``train_test_gap = train_acc - test_acc``.

Statistics, per seed, from the last evaluation, in percentage points (pts):

* **gap**: ``gap(none) - gap(batch)`` without dropout. Rule: greater than 0 (95% CI over seeds)
  with an estimate of at least ``params.gap_band`` (1 pt; a CI above 0 with a smaller estimate is
  "mixed"), a CI within ``+-params.gap_band`` being no effect worth the name.
* **dropout**: ``test_acc(batch, no dropout) - test_acc(batch, dropout 0.5)``, Ioffe's "dropout can
  be removed": a non-inferiority rule, supported when the 95% CI lies wholly above
  ``-params.dropout_margin`` (removing dropout costs less than 1 pt), not supported when it lies
  wholly below it.

The verdict combines both (supported only if both are). Reported without a verdict: the gap with
dropout, and the plain network with dropout against batch norm without it.

Forms: full, 3,000 steps (300 epochs of the 500 digits), 5 seeds, evaluated every 50 steps;
quick, 1,500 steps, 3 seeds, every 50 steps (about 85 s of user CPU with ``--jobs 2``).

>>> from normlab.lab.experiments.overfitting import Overfitting
>>> cfg = Overfitting().quick_config()
>>> cfg.data.limit, cfg.grid, cfg.train.eval_train
(500, {'model.dropout': [0.0, 0.5]}, True)
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import mean_ci
from ..rows import steps_to
from ..verdicts import Rule
from ._two_by_two import diverged_notes, finals_by_seed, group_jobs, paired, points_ci
from .base import Experiment, FigureSpec, Summary
from .registry import register

__all__ = ["Overfitting"]

AXIS = "model.dropout"

PUBLISHED = [
    "Ioffe & Szegedy 2015, Sec. 3.4: batch norm regularizes the model; in a batch-normalized network dropout "
    "\"can be either removed or reduced in strength\".",
    "Ioffe & Szegedy 2015, Sec. 4.2.1: removing dropout from BN-Inception (ImageNet) \"speeds up training, "
    "without increasing overfitting\".",
]


def _pts(mean: float, low: float, high: float) -> tuple[float, float, float]:
    return 100 * mean, 100 * low, 100 * high


class Overfitting(Experiment):
    name = "overfitting"
    claim = "C6: batch norm makes training less prone to overfitting (dropout can be removed)"
    title = "Overfitting 500 digits: train-test gap with and without batch norm and dropout"
    description = ("2x256 ReLU MLP on 500 MNIST digits, BN vs none, dropout 0 and 0.5: train and test accuracy "
                   "and their gap")
    claims = ("C6",)
    figures = (
        FigureSpec(
            kind="curve", metric="train_test_gap", panel=AXIS, title="Train-test accuracy gap during training",
            ylabel="train accuracy - test accuracy",
            caption="Accuracy on the 500 training digits minus on the 1,000 test digits, both in eval mode; one panel "
                    "per dropout probability. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", panel=AXIS, title="Test accuracy during training", ylabel="test accuracy",
            caption="One panel per dropout probability. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="train_acc", panel=AXIS, title="Train accuracy during training (eval mode)",
            ylabel="train accuracy",
            caption="Accuracy on the 500 training digits in eval mode (batch norm with its running statistics, no "
                    "dropout). Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final", title="Final test accuracy against dropout",
            ylabel="test accuracy",
            caption="At the last evaluation. Ioffe & Szegedy's claim reads as: the batch-norm line is as high at "
                    "dropout 0 as at 0.5. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            # 500 digits: few enough that the plain MLP fits all of them long before the step budget ends.
            data=DataConfig(name="mnist-5k", limit=500),
            model=ModelConfig(kind="mlp", widths=[256, 256], activation="relu", init_gain=2 ** 0.5),
            train=TrainConfig(steps=3000, batch_size=50, optimizer="sgd", lr=0.01, momentum=0.9, seeds=5,
                              eval_every=50, checkpoint_every=1000, eval_train=True),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={AXIS: [0.0, 0.5]},
            params={"gap_band": 1.0, "dropout_margin": 1.0},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {"train.steps": 1500, "train.seeds": 3}, parse=False)

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule]:
        """The verdict rules, fixed before the run by the params (both C6)."""
        band, margin = params.get("gap_band", 1.0), params.get("dropout_margin", 1.0)
        return (
            Rule("C6", "final train-test accuracy gap without a norm minus with batch norm, no dropout (points)",
                 expected="batch norm's network overfits less: its train-test accuracy gap is smaller than the plain "
                          "network's (95% CI above 0)",
                 null=0.0, direction="greater", target=band, equivalence=band, unit=" pts", digits=1,
                 published="Ioffe & Szegedy 2015: batch norm regularizes (no gap reported)", label="gap none - BN"),
            Rule("C6", "final test accuracy of batch norm without dropout minus with dropout (points)",
                 expected=f"dropout can be removed from the batch-norm network: removing it costs less than "
                          f"{margin:g} point of test accuracy (95% CI above -{margin:g})",
                 null=-margin, direction="greater", unit=" pts", digits=1,
                 published="Ioffe & Szegedy 2015: dropout removed from BN-Inception without increasing overfitting",
                 label="BN: no dropout - dropout"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        gap_rule, drop_rule = self.rules(params)
        margin = params.get("dropout_margin", 1.0)
        jobs = group_jobs(rows)
        levels = sorted(config.get("grid", {}).get(AXIS) or {dict(j.point).get(AXIS) for j in jobs} - {None})
        off, on = (levels[0], levels[-1]) if levels else (None, None)
        arms = [a for a in (config.get("arms") or {}) if any(j.arm == a for j in jobs)] or sorted({j.arm for j in jobs})

        def f(arm: str, level: Any, key: str) -> dict[Any, float]:
            return finals_by_seed(jobs, arm, AXIS, level, key)

        table = []
        for arm in arms:
            for level in levels:
                gaps = list(f(arm, level, "train_test_gap").values())
                table.append([arm, f"{level:g}", points_ci(list(f(arm, level, "train_acc").values()), bounds=(0, 1)),
                              points_ci(list(f(arm, level, "test_acc").values()), bounds=(0, 1)),
                              points_ci(gaps, signed=True), str(len(gaps))])

        gap_diff = [100 * d for d in paired(f("none", off, "train_test_gap"), f("batch", off, "train_test_gap"))]
        gap = gap_rule.decide(*(mean_ci(gap_diff) if gap_diff else (None,) * 3), n=len(gap_diff))
        drop_diff = ([100 * d for d in paired(f("batch", off, "test_acc"), f("batch", on, "test_acc"))]
                     if on != off else [])
        drop = drop_rule.decide(*(mean_ci(drop_diff) if drop_diff else (None,) * 3), n=len(drop_diff),
                                note=(f"{-margin:g} pts is the margin of this non-inferiority test (removing dropout "
                                      f"may cost less than {margin:g} point), not the value of no effect"
                                      if on != off else "the grid has one dropout level: nothing to remove"))
        headline = (f"Without dropout, no norm's train-test accuracy gap minus batch norm's was {gap.text} "
                    f"(positive: batch norm overfits less; mean over {len(gap_diff)} seeds, 95% CI); removing dropout "
                    f"{on:g} from the batch-norm network changed its test accuracy by {drop.text}."
                    if levels else "no jobs to summarize.")
        notes = diverged_notes(jobs) + self._notes(f, jobs, off, on, params)
        return Summary.of_findings(
            self, [gap, drop], headline=headline,
            columns=["arm", "dropout", "train accuracy % [95% CI]", "test accuracy % [95% CI]",
                     "train - test (pts)", "seeds"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _fitted_at(jobs, arm: str, level: Any) -> tuple[float, float] | None:
        """Means over seeds of the first step at which ``arm``'s train accuracy reaches 99%, and of
        the change of its test accuracy from that step to the end (None if a seed never got there)."""
        reach, moved = [], []
        for job, rows in jobs.items():
            if job.arm == arm and dict(job.point).get(AXIS) == level:
                at = steps_to(rows, "train_acc", 0.99)
                if at is None:
                    return None
                there = next(r["test_acc"] for r in rows if r["step"] == at)
                reach.append(at)
                moved.append(rows[-1]["test_acc"] - there)
        return (fmean(reach), fmean(moved)) if reach else None

    @staticmethod
    def _notes(f, jobs, off: Any, on: Any, params: dict[str, Any]) -> list[str]:
        """What the numbers show, in words (written from the run's values, whatever they are)."""
        notes = []
        mean = lambda d: fmean(d.values()) if d else None  # noqa: E731
        train_none, test_none = mean(f("none", off, "train_acc")), mean(f("none", off, "test_acc"))
        train_bn, test_bn = mean(f("batch", off, "train_acc")), mean(f("batch", off, "test_acc"))
        if None in (train_none, test_none, train_bn, test_bn):
            return notes
        notes.append(
            f"Without dropout the plain network ends at {100 * train_none:.1f}% train and {100 * test_none:.1f}% test "
            f"accuracy (gap {100 * (train_none - test_none):.1f} pts), batch norm's at {100 * train_bn:.1f}% and "
            f"{100 * test_bn:.1f}% (gap {100 * (train_bn - test_bn):.1f} pts). "
            + ("A smaller gap with batch norm comes from higher test accuracy, not from fitting the training digits "
               "less." if test_bn > test_none and train_bn >= train_none - 0.005 else
               "Where batch norm's gap is smaller, part of it is lower train accuracy (it fits the training digits "
               "less), not better test accuracy." if train_bn < train_none - 0.005 else
               "Batch norm does not raise test accuracy here.")
        )
        fitted = {arm: Overfitting._fitted_at(jobs, arm, off) for arm in ("none", "batch")}
        if None not in fitted.values():
            notes.append(f"Without dropout the plain network fits 99% of its training digits by step "
                         f"{fitted['none'][0]:.0f} and batch norm's by step {fitted['batch'][0]:.0f} (means over "
                         f"seeds); from there to the end their test accuracy changes by {100 * fitted['none'][1]:+.1f} "
                         f"and {100 * fitted['batch'][1]:+.1f} pts while the train accuracy stays near 100%, so the "
                         f"gap curves move by as much the other way"
                         + (": training on after memorizing does not make either network test worse."
                            if min(fitted["none"][1], fitted["batch"][1]) >= -0.005 else
                            ": training on after memorizing makes at least one of them test worse."))
        if train_none < 0.98:
            notes.append(f"The plain network fits only {100 * train_none:.1f}% of its training digits: it has not "
                         f"reached the overfitting regime this experiment is about; a longer run may.")
        if on != off:
            pairs = paired(f("batch", off, "test_acc"), f("none", on, "test_acc"))
            if pairs:
                notes.append(f"Batch norm without dropout minus no norm with dropout {on:g}, test accuracy: "
                             f"{points_ci(pairs, signed=True)} pts (does batch norm replace dropout?). Gap without "
                             f"a norm minus with batch norm, both with dropout {on:g}: "
                             f"{points_ci(paired(f('none', on, 'train_test_gap'), f('batch', on, 'train_test_gap')), signed=True)} pts.")
        notes.append("Scale: Ioffe & Szegedy's statement is about Inception on 1.2M ImageNet images, where batch norm's "
                     "noise (each example normalized with its batch-mates' statistics) comes on top of augmentation "
                     "and weight decay; "
                     "here a 2-layer MLP can memorize 500 digits, and the noise of batch statistics (batch 50) is "
                     "the only regularizer batch norm brings.")
        return notes


register(Overfitting())
