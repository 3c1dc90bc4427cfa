"""Claim C2: batch norm makes training more stable. A ReLU MLP on MNIST, plain SGD, over a
grid of learning rates from moderate to aggressive, with and without batch norm.

Three measures of stability, each with its own declared rule (:meth:`Stability.rules`); the
experiment's verdict combines them (:meth:`Summary.of_findings`):

1. **Loss-curve variation** (the main statistic). For each job, over the evaluation windows of
   the second half of training (steps after ``params.window_from`` of the budget), the mean of
   ``train_loss_sd`` (the standard deviation of the per-step training losses within a window)
   divided by the mean of ``train_loss`` in the same windows: a coefficient of variation, the
   step-to-step jitter of the loss *relative to its level*. Relative, not absolute, because the
   absolute spread of minibatch losses shrinks with the loss itself: a network that is merely
   further along (faster, claim C1) would look "stabler" by the absolute measure. The relative
   one is what a loss curve on a log axis shows; the absolute one (mean ``train_loss_sd``) is
   in the table beside it. Statistic: per seed, the geometric mean over learning rates of
   (variation without BN) / (variation with BN); then the geometric mean over seeds with its
   95% t-interval on the log scale (:func:`~normlab.lab.intervals.geometric_mean_ci`). A
   (seed, rate) at which either arm diverged has no second half and is left out (divergence
   is measure 3); the notes list such pairs. Null 1, direction "greater", no target (no
   published size), ratios within ``1/(1+e)..(1+e)`` (``params.variation_equivalence``) count
   as no effect.
2. **Spread of final test accuracy across seeds.** Per arm, the pooled within-rate standard
   deviation of the final test accuracy over seeds (runs that diverged left out: they are
   measure 3), i.e. ``sqrt(sum_rates sum_seeds (acc - mean_rate)^2 / sum_rates (n_rate - 1))``,
   over the rates at which both arms have at least 2 runs that did not diverge (the same rates
   for both arms: the spread differs between rates, so pooling different ones would not compare
   like with like).
   Statistic: SD without BN / SD with BN, with the F-distribution 95% interval for a ratio of
   variances (degrees of freedom ``sum (n_rate - 1)`` per arm), square-rooted. That interval
   assumes normal, independent accuracies; arms of one seed share initial weights and batches,
   which pairs them, so it is an approximation (usually a conservative one).
3. **Divergence** (a loss that became NaN or infinite; the trainer stops such a job and marks
   its last row ``"diverged": true``). Counted per arm and rate. Statistic: among the
   *discordant* (seed, rate) pairs, where exactly one arm diverged, the share in which the
   network without BN is the one that diverged, with the exact (Clopper-Pearson) 95% interval:
   the exact McNemar test for paired outcomes. Null 0.5. With no discordant pair (nothing
   diverged, or both arms always together) there is nothing to tell the arms apart: inconclusive.

There is no published number for C2. The closest anchors are qualitative: Santurkar et al.
2018 (their Fig. 4: with BN the loss changes less as one steps along the gradient, a smoother
loss landscape) and Ioffe & Szegedy 2015 (BN allows higher learning rates without divergence).

Model and data: a 3x100 ReLU MLP with He-initialized weights (so that the initial weights are
sound and the question is the learning rate's, not the initialization's: C4), batch 60, plain
SGD without momentum, on the embedded ``mnist-5k`` (4,000 training / 1,000 test digits).
Learning rates 0.03, 0.1, 0.3, 1.0: half-decade steps from a usual SGD rate for such a network
to an aggressive one (the plain network diverges at 1.0 within the first evaluation window).
Full form: 8 seeds x 3,000 steps (45 epochs). Quick form: 3 seeds x 800 steps (12 epochs), about
45 CPU-seconds; with 3 seeds the divergence test needs the plain network to diverge alone at two
rates in every seed (6 one-way pairs) to exclude an even split, so its quick verdict is usually
inconclusive, and so then is the combined one.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import clopper_pearson, geometric_mean_ci, mean_ci, sd_ratio_ci
from ..rows import JobId, diverged, final, group_jobs, value
from ..verdicts import Finding, Rule
from .base import Experiment, FigureSpec, Summary
from .registry import register

__all__ = ["Stability", "accuracy_spread", "loss_variation"]

AXIS = "train.lr"
ARMS = ("none", "batch")  # the ratio is always none / batch

PUBLISHED = [
    "No published number for C2 (batch norm makes training more stable); the anchors below are the "
    "closest, and both are qualitative.",
    "Santurkar, Tsipras, Ilyas & Madry 2018, Fig. 4 (VGG on CIFAR-10): with batch norm the loss changes less "
    "from step to step along the gradient (a smoother loss landscape, more predictive gradients).",
    "Ioffe & Szegedy 2015, Sec. 3.3 and 4.2: batch norm allows higher learning rates without divergence "
    "(BN-Inception trained at 5x and 30x the base rate).",
]


def loss_variation(job_rows: list[dict[str, Any]], steps: int, window_from: float = 0.5,
                   window_to: float = 1.0) -> tuple[float, float, float] | None:
    """``(relative, absolute, level)``: the step-to-step variation of a job's training loss over
    the evaluation windows ending after ``window_from * steps`` and by ``window_to * steps``
    (default: the second half): (mean train_loss_sd / mean train_loss,
    mean train_loss_sd, mean train_loss). A ratio of means, not a mean of ratios, so that one
    window with a near-zero loss cannot dominate.

    ``None`` for a job that diverged or has no such window.

    >>> rows = [{"step": s, "train_loss": 0.5, "train_loss_sd": 0.1} for s in (0, 50, 100)]
    >>> loss_variation(rows, 100)
    (0.2, 0.1, 0.5)
    """
    if diverged(job_rows):
        return None
    pairs = [(value(r, "train_loss_sd"), value(r, "train_loss")) for r in job_rows
             if window_from * steps < r["step"] <= window_to * steps]
    pairs = [(sd, loss) for sd, loss in pairs if sd is not None and loss is not None]
    if not pairs:
        return None
    sd = sum(p[0] for p in pairs) / len(pairs)
    loss = sum(p[1] for p in pairs) / len(pairs)
    return (sd / loss if loss > 0 else math.inf), sd, loss


def accuracy_spread(groups: list[list[float]]) -> tuple[float, int]:
    """The pooled within-group standard deviation and its degrees of freedom: one group per
    learning rate, holding the final accuracies over seeds; groups of fewer than 2 add nothing.

    >>> sd, df = accuracy_spread([[0.9, 0.92], [0.5]])
    >>> round(sd, 4), df
    (0.0141, 1)
    """
    squares, df = 0.0, 0
    for group in groups:
        if len(group) < 2:
            continue
        mean = sum(group) / len(group)
        squares += sum((v - mean) ** 2 for v in group)
        df += len(group) - 1
    return (math.sqrt(squares / df) if df else math.nan), df


def _fmt_rate(rate: Any) -> str:
    return f"{rate:g}" if isinstance(rate, (int, float)) else str(rate)


class Stability(Experiment):
    name = "stability"
    claim = "C2: batch norm makes training more stable"
    title = "Training stability over learning rates: batch norm vs none (ReLU MLP, SGD, MNIST)"
    description = ("3x100 ReLU MLP, SGD at 4 learning rates: step-to-step loss variation, accuracy spread "
                   "over seeds and divergences, BN vs none")
    claims = ("C2",)
    figures = (
        FigureSpec(kind="curve", metric="train_loss", panel=AXIS, logy=True,
                   title="Training loss, one panel per learning rate",
                   ylabel="cross-entropy (mean since last evaluation)",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum. A curve that ends "
                           "early diverged (its loss became NaN or infinite)."),
        FigureSpec(kind="curve", metric="train_loss_sd", panel=AXIS, logy=True,
                   title="Step-to-step variation of the training loss, one panel per learning rate",
                   ylabel="SD of per-step losses within each evaluation window",
                   caption="The absolute spread; the verdict uses it relative to the loss (see the table). "
                           "Mean over seeds; band: seeds' min..max."),
        FigureSpec(kind="grid", metric="test_acc", axis=AXIS, reduce="final",
                   title="Final test accuracy vs learning rate", ylabel="final test accuracy",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum (a diverged run's "
                           "final accuracy is that of a NaN network)."),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            model=ModelConfig(kind="mlp", widths=[100, 100, 100], activation="relu", init_gain=2 ** 0.5),
            # eval_every sets the window of train_loss_sd: short, so that the loss's own downward
            # trend within a window adds little to its step-to-step spread.
            train=TrainConfig(steps=3000, batch_size=60, optimizer="sgd", lr=0.1, momentum=0.0, seeds=8,
                              eval_every=25, checkpoint_every=1000),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={AXIS: [0.03, 0.1, 0.3, 1.0]},
            params={"window_from": 0.5, "variation_equivalence": 0.1, "spread_equivalence": 0.25},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {"train.steps": 800, "train.seeds": 3}, parse=False)

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule, Rule]:
        """The verdict rules (loss variation, accuracy spread, divergence), fixed before the run."""
        published = ("none published; Santurkar et al. 2018 Fig. 4 and Ioffe & Szegedy 2015 (higher rates "
                     "without divergence) are qualitative")
        return (
            Rule("C2", "loss-curve variation none / BN (relative step-to-step SD of the training loss, 2nd half; "
                       "geometric mean over rates and seeds)",
                 expected="the training loss jitters less from step to step with batch norm (ratio above 1x)",
                 null=1.0, log=True, equivalence=params.get("variation_equivalence", 0.1), published=published,
                 label="loss jitter none / BN"),
            Rule("C2", "across-seed SD of final test accuracy none / BN (pooled over rates; F interval)",
                 expected="final accuracy varies less across seeds with batch norm (ratio above 1x)",
                 null=1.0, log=True, equivalence=params.get("spread_equivalence", 0.25), published=published,
                 label="accuracy spread none / BN"),
            Rule("C2", "share of discordant (seed, rate) pairs in which only the network without BN diverged "
                       "(exact McNemar; Clopper-Pearson interval)",
                 expected="when only one arm diverges, it is the one without batch norm (share above 0.5)",
                 null=0.5, digits=2, published=published, label="share of lone divergences without BN"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        window_from = params.get("window_from", 0.5)
        steps, every = config["train"]["steps"], config["train"]["eval_every"]
        var_rule, spread_rule, div_rule = self.rules(params)
        jobs = group_jobs(rows)
        rates = list(config.get("grid", {}).get(AXIS) or sorted({dict(j.point).get(AXIS) for j in jobs}))
        seeds = sorted({j.seed for j in jobs})

        def job(arm: str, rate: Any, seed: int) -> list[dict[str, Any]] | None:
            return jobs.get(JobId(arm, ((AXIS, rate),), seed))

        # Per (arm, rate): which seeds ran, which diverged (and when), final accuracies of the
        # others, and each seed's loss variation.
        ran: dict[tuple[str, Any], list[int]] = {}
        gone: dict[tuple[str, Any], dict[int, int]] = {}
        accs: dict[tuple[str, Any], list[float]] = {}
        variation: dict[tuple[str, Any, int], tuple[float, float, float]] = {}
        for rate in rates:
            for arm in ARMS:
                ran[(arm, rate)] = [s for s in seeds if job(arm, rate, s)]
                gone[(arm, rate)] = {s: job(arm, rate, s)[-1]["step"] for s in ran[(arm, rate)]
                                     if diverged(job(arm, rate, s))}
                accs[(arm, rate)] = [a for s in ran[(arm, rate)] if s not in gone[(arm, rate)]
                                     and (a := final(job(arm, rate, s), "test_acc")) is not None]
                for s in ran[(arm, rate)]:
                    if (v := loss_variation(job(arm, rate, s), steps, window_from)) is not None:
                        variation[(arm, rate, s)] = v

        # 1. Loss-curve variation: per seed, the geometric mean over rates of none / batch.
        per_seed, per_seed_abs, per_seed_level, left_out, per_rate = [], [], [], [], {}
        for s in seeds:
            logs: list[tuple[float, float, float]] = []
            for rate in rates:
                a, b = variation.get(("none", rate, s)), variation.get(("batch", rate, s))
                if a is None or b is None or not all(0 < v < math.inf for v in (*a, *b)):
                    if job("none", rate, s) or job("batch", rate, s):
                        left_out.append(f"lr {_fmt_rate(rate)} seed {s}")
                    continue
                logs.append(tuple(math.log(x / y) for x, y in zip(a, b)))
                per_rate.setdefault(rate, []).append(a[0] / b[0])
            if logs:
                rel, absolute, level = (math.exp(sum(col) / len(col)) for col in zip(*logs))
                per_seed.append(rel)
                per_seed_abs.append(absolute)
                per_seed_level.append(level)
        var = var_rule.decide(*(geometric_mean_ci(per_seed) if per_seed else (None,) * 3), n=len(per_seed))

        # 2. Accuracy spread across seeds, pooled over the rates at which both arms have at
        # least 2 runs that did not diverge (the same rates for both, so like is compared with like).
        shared = [r for r in rates if all(len(accs[(arm, r)]) >= 2 for arm in ARMS)]
        sd_none, df_none = accuracy_spread([accs[("none", r)] for r in shared])
        sd_bn, df_bn = accuracy_spread([accs[("batch", r)] for r in shared])
        if shared and sd_none > 0 and sd_bn > 0:
            spread = spread_rule.decide(*sd_ratio_ci(sd_none, df_none, sd_bn, df_bn), n=len(seeds),
                                        note=f"pooled over lr {', '.join(_fmt_rate(r) for r in shared)}")
        else:
            spread = _inconclusive(spread_rule, "no rate at which both arms have 2 or more runs that did not "
                                                "diverge (or no spread at all): nothing to compare", n=len(seeds))

        # 3. Divergence: the (seed, rate) pairs where exactly one arm diverged.
        only_none = only_bn = both = 0
        for rate in rates:
            for s in set(ran[("none", rate)]) & set(ran[("batch", rate)]):
                da, db = s in gone[("none", rate)], s in gone[("batch", rate)]
                only_none += da and not db
                only_bn += db and not da
                both += da and db
        discordant = only_none + only_bn
        if discordant:
            div = div_rule.decide(*clopper_pearson(only_none, discordant), n=len(seeds),
                                  note=f"{only_none} of {discordant} discordant pairs diverged only without BN")
        else:
            div = _inconclusive(div_rule, "no run diverged in either arm at these rates: the grid does not reach "
                                          "rates where divergence could tell the arms apart" if not both else
                                          f"the arms diverged only together ({both} pairs): no pair tells them apart",
                                n=len(seeds))

        table = []
        for rate in rates:
            for arm in ARMS:
                key = (arm, rate)
                vs = [variation[(arm, rate, s)] for s in ran[key] if (arm, rate, s) in variation]
                if accs[key]:
                    m, lo, hi = mean_ci(accs[key], bounds=(0.0, 1.0))
                    acc_text = f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
                else:
                    acc_text = "n/a (all diverged)" if ran[key] else "n/a"
                table.append([
                    _fmt_rate(rate), arm, f"{len(gone[key])}/{len(ran[key])}", acc_text,
                    f"{accuracy_spread([accs[key]])[0]:.4f}" if len(accs[key]) >= 2 else "n/a",
                    *(f"{sum(v[i] for v in vs) / len(vs):.{d}f}" if vs else "n/a" for i, d in ((0, 3), (1, 4), (2, 4))),
                ])
        abs_gm = geometric_mean_ci(per_seed_abs)[0] if per_seed_abs else None
        level_gm = geometric_mean_ci(per_seed_level)[0] if per_seed_level else None
        table.append(["all", "none / batch", f"{only_none}:{only_bn} pairs (only none : only BN)", "",
                      f"{spread.text} (pooled)", var.text,
                      f"{abs_gm:.2f}x" if abs_gm else "", f"{level_gm:.2f}x" if level_gm else ""])

        total = {arm: (sum(len(gone[(arm, r)]) for r in rates), sum(len(ran[(arm, r)]) for r in rates)) for arm in ARMS}
        headline = (f"Loss-curve variation without BN / with BN: {var.text} (step-to-step SD relative to the loss, "
                    f"2nd half, geometric mean over {len(per_seed)} seeds); diverged runs: none {total['none'][0]}/"
                    f"{total['none'][1]}, batch {total['batch'][0]}/{total['batch'][1]}; across-seed SD of final "
                    f"accuracy none / BN: {spread.text}.")
        notes = self._notes(rates, seeds, ran, gone, accs, variation, per_rate, left_out, abs_gm, level_gm,
                            var, only_none, only_bn, every)
        early = self._early_ratio(job, rates, seeds, steps, window_from)
        if early:
            notes.insert(1, f"Descriptive, not part of the rule: over the first {window_from:.0%} of the steps the "
                            f"same ratio is {early}. The rule, declared before the run, uses the later part: early "
                            "windows' SD also holds the loss's own steep descent within the window.")
        notes.append("Statistics: loss variation = mean train_loss_sd / mean train_loss over the evaluation windows "
                     f"after {window_from:.0%} of the steps (each window's SD is over its {every} per-step losses); "
                     "accuracy SD = pooled within-rate SD over seeds, runs that diverged left out, F interval for a "
                     "ratio of variances; divergence = exact McNemar test on the (seed, rate) pairs where exactly one "
                     "arm diverged, Clopper-Pearson interval.")
        return Summary.of_findings(
            self, [var, spread, div], headline=headline,
            columns=["learning rate", "arm", "diverged", "final test accuracy [95% CI]", "accuracy SD over seeds",
                     "loss variation (SD / loss, 2nd half)", "step-to-step SD (2nd half)", "training loss (2nd half)"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _early_ratio(job, rates, seeds, steps, window_from) -> str:
        """The loss-variation ratio none / BN over the first part of training, per rate and overall."""
        per_rate: dict[Any, list[float]] = {}
        for rate in rates:
            for s in seeds:
                a, b = (job(arm, rate, s) for arm in ARMS)
                va = loss_variation(a, steps, 0.0, window_from) if a else None
                vb = loss_variation(b, steps, 0.0, window_from) if b else None
                if va and vb and 0 < va[0] < math.inf and 0 < vb[0] < math.inf:
                    per_rate.setdefault(rate, []).append(va[0] / vb[0])
        if not per_rate:
            return ""
        overall = geometric_mean_ci([x for v in per_rate.values() for x in v])[0]
        return (f"{overall:.2f}x (" + ", ".join(f"lr {_fmt_rate(r)}: {geometric_mean_ci(v)[0]:.2f}x"
                                                for r, v in per_rate.items()) + ")")

    @staticmethod
    def _notes(rates, seeds, ran, gone, accs, variation, per_rate, left_out, abs_gm, level_gm, var,
               only_none, only_bn, every) -> list[str]:
        """Interpretation, and what the figures show, in words computed from the same numbers."""
        notes = []
        if per_rate:
            notes.append("Loss-curve variation none / BN per learning rate (geometric mean over seeds): "
                         + ", ".join(f"lr {_fmt_rate(r)}: {geometric_mean_ci(v)[0]:.2f}x" for r, v in per_rate.items())
                         + ".")
        if left_out:
            notes.append("Left out of the loss-variation ratio (an arm diverged there, so it has no second half): "
                         + ", ".join(left_out) + ". Leaving them out understates the instability of the arm that "
                         "diverged; the divergence count covers them.")
        if abs_gm is not None and var.estimate is not None and (abs_gm - 1) * (var.estimate - 1) < 0:
            notes.append(f"The absolute step-to-step SD points the other way: none / BN {abs_gm:.2f}x (same seeds "
                         f"and rates), with training loss in the 2nd half none / BN {level_gm:.2f}x. The relative "
                         "measure, declared before the run, divides out the loss level: a network whose loss is lower "
                         "has a smaller absolute spread of minibatch losses without being any steadier.")
        if level_gm is not None and level_gm < 1:
            notes.append(f"Without BN the training loss of the 2nd half is lower (none / BN {level_gm:.2f}x over the "
                         "compared seeds and rates): on this small training set the plain network, where it does "
                         "not diverge, fits the training data further within the step budget.")
        if var.estimate is not None and var.estimate <= 1:
            notes.append("A likely reason the relative variation does not favour BN here: in training mode each "
                         "example's output depends on the other examples of its batch, a source of "
                         "minibatch-to-minibatch loss variation that the plain network lacks; it matters most where "
                         "the plain network trains smoothly and its loss is small. Santurkar et al.'s evidence is from "
                         "deep convolutional networks (VGG), not from a 3-layer MLP.")
        if only_none and not only_bn and only_none < 6:
            notes.append(f"Every discordant pair diverged without BN ({only_none} of {only_none}), but the exact test "
                         "needs at least 6 such pairs to exclude an even split at 95%: more seeds would tell.")
        for rate in rates:
            parts = []
            for arm in ARMS:
                key = (arm, rate)
                vs = [variation[(arm, rate, s)] for s in ran[key] if (arm, rate, s) in variation]
                when = sorted(gone[key].values())
                if ran[key] and len(when) == len(ran[key]):
                    text = (f"{arm}: every run diverged, at step{'s' if len(when) > 1 else ''} "
                            f"{', '.join(map(str, when))}")
                    text += " (so no curve is drawn)" if when[-1] <= every else " (its curves stop there)"
                else:
                    text = f"{arm}: "
                    text += (f"training loss {sum(v[2] for v in vs) / len(vs):.3g} and step-to-step SD "
                             f"{sum(v[1] for v in vs) / len(vs):.3g} in the 2nd half" if vs else "no 2nd half")
                    text += f", final accuracy {sum(accs[key]) / len(accs[key]):.3f}" if accs[key] else ""
                    text += (f"; {len(when)} of {len(ran[key])} runs diverged (at step{'s' if len(when) > 1 else ''} "
                             f"{', '.join(map(str, when))})" if when else "")
                parts.append(text)
            notes.append(f"Figures at lr {_fmt_rate(rate)}: " + "; ".join(parts) + ".")
        return notes


def _inconclusive(rule: Rule, reason: str, *, n: int) -> Finding:
    finding = rule.decide(None, None, None, n=n)
    finding.reason = reason
    return finding


register(Stability())
