"""Learning-rate sensitivity (claim C5), and Bjorck et al. 2018's reading of it.

Claim C5: batch norm lowers a network's sensitivity to the learning rate, and allows higher
rates. Ioffe & Szegedy 2015 trained BN-Inception at 5x and 30x the base rate ("BN-x5",
"BN-x30") without ill effect. Bjorck, Gomes, Selman & Weinberger 2018 ("Understanding batch
normalization") argue that this *is* BN's benefit: at a rate the plain network can also use,
the two reach comparable accuracy; BN's gain comes from the larger rates it allows.

Setup: a 3x100 ReLU MLP (He initialization, ``init_gain`` = sqrt 2) on the embedded MNIST
subset, batch 60, plain SGD (no momentum), trained at every rate of a log grid
(``grid["train.lr"]``), with batch norm before each ReLU ("batch") and without ("none"); the
arms of one seed share their initial weights and batches. ReLU rather than sigmoid because a
plain ReLU network's updates blow up at high rates, the failure BN is said to prevent.

Statistics, per seed, then mean and 95% t-interval over seeds (Rules declared in :meth:`rules`):

* **C5, trainable width.** A grid point *trains* when its final test accuracy reaches
  ``train_fraction`` (0.9) x the best mean final accuracy of the run (any arm, any rate; one bar
  for both arms). The width is the summed log10 cell width of the rates that train (decades;
  :func:`normlab.lab.experiments.common.trainable_range`). Statistic: width(batch) - width(none).
  Expected: at least log10(5) = 0.7 decades (BN trains at 5x the rates, Ioffe & Szegedy's BN-x5);
  a CI within +-0.25 decades is "no effect". A diverged job does not train.
* **Steps to target at each arm's best rate** (reported, no rule): the first evaluated step at
  which test accuracy reaches ``target_fraction`` (0.95) x the best mean final accuracy, each
  arm at the rate with its best mean-over-seeds final accuracy.
* **C5, Bjorck et al. 2018.** With ``lr_none`` the plain network's best rate and ``lr_bn`` BN's
  (both by mean final accuracy over seeds): BN's advantage at the plain network's best rate,
  ``acc_bn(lr_none) - acc_none(lr_none)``, beside its advantage at its own best rate,
  ``acc_bn(lr_bn) - acc_none(lr_none)``. Bjorck et al. predict the first is negligible: the rule
  is an equivalence test, supported when its CI lies within +-1 accuracy point.

Quick form: 9 rates 0.001 .. 10 (half-decade steps), 3 seeds, 400 steps. Full form: 23 rates
0.0001 .. 31.6 (quarter-decade steps), 5 seeds, 2000 steps. Both evaluate every 25 steps.
"""

from __future__ import annotations

from statistics import fmean

import math
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from ..intervals import geometric_mean_ci, mean_ci
from ..rows import group_jobs, steps_to
from ..verdicts import Rule
from .base import Experiment, FigureSpec, Summary
from .registry import register
from .common import axis_widths, censor_notes, curve_note, fmt_value, job_of, log_grid

__all__ = ["LearningRateSensitivity"]

AXIS = "train.lr"
ARMS = ("none", "batch")

PUBLISHED = [
    "Ioffe & Szegedy 2015 (ImageNet, BN-Inception): trained at 5x (BN-x5) and 30x (BN-x30) the base "
    "learning rate; BN-x5 reached Inception's accuracy in about 14x fewer steps.",
    "Bjorck, Gomes, Selman & Weinberger 2018, Fig. 1 (110-layer ResNet, CIFAR-10): at a learning rate the "
    "unnormalized network can use, both networks reach comparable test accuracy; larger rates give BN higher "
    "accuracy and make the unnormalized network diverge. BN's benefit is the larger rates it allows.",
]


class LearningRateSensitivity(Experiment):
    name = "lr-sensitivity"
    claim = "C5: batch norm lowers sensitivity to the learning rate (allows higher rates)"
    title = "Learning-rate sensitivity: the range of rates that trains, with and without batch norm"
    description = ("3x100 ReLU MLP, plain SGD, over a log grid of learning rates: width of the trainable range, "
                   "BN vs none; Bjorck et al. 2018: BN's advantage at the plain network's best rate")
    claims = ("C5",)
    figures = (
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final",
            title="Final test accuracy against the learning rate", ylabel="final test accuracy",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum. A run whose loss became "
                    "NaN stopped there and shows the accuracy of the broken network (about chance).",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", where=((AXIS, 0.1),),
            title="Test accuracy during training at learning rate 0.1", ylabel="test accuracy",
            caption="A rate both networks can use. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", where=((AXIS, 1.0),),
            title="Test accuracy during training at learning rate 1", ylabel="test accuracy",
            caption="A high rate. Mean over seeds; the band spans the seeds' minimum to maximum; a line that "
                    "stops early is a run that diverged.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # He initialization (std = sqrt(2 / fan_in)), the standard one for ReLU, so that the
            # plain network starts well scaled and the grid tests the learning rate alone.
            model=ModelConfig(kind="mlp", widths=[100, 100, 100], activation="relu", init_gain=2 ** 0.5),
            # Evaluations every 25 steps: steps to the target are read at that resolution.
            train=TrainConfig(steps=2000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=25,
                              checkpoint_every=1000),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            # Down to 1e-4: in 2000 steps the plain network still trains at 1e-3, and a range cut
            # by the grid's end measures the grid, not the network.
            grid={AXIS: log_grid(-4, 1.5, 4)},
            params={"train_fraction": 0.9, "target_fraction": 0.95, "min_width_gain": round(math.log10(5), 3),
                    "width_band": 0.25, "bjorck_band": 0.01},
        )

    def quick_config(self) -> ExperimentConfig:
        config = self.default_config()
        config.train.steps, config.train.seeds = 400, 3
        config.train.checkpoint_every = 400
        config.grid = {AXIS: log_grid(-3, 1, 2)}
        return config

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule]:
        """The verdict rules, fixed before the run by the config's params: C5 (trainable width)
        and Bjorck et al. 2018 (BN's advantage at the plain network's best rate)."""
        frac = params.get("train_fraction", 0.9)
        gain = params.get("min_width_gain", 0.699)
        band = params.get("bjorck_band", 0.01)
        return (
            Rule("C5", f"width of the trainable learning-rate range, batch minus none (decades; a rate trains when "
                       f"its final test accuracy reaches {frac:.0%} of the run's best mean)",
                 expected=f"batch norm trains over a range of learning rates at least {gain:g} decades wider "
                          f"(BN trains at 5x the rates; 95% CI above 0)",
                 null=0.0, direction="greater", target=gain, equivalence=params.get("width_band", 0.25),
                 unit=" decades", digits=2,
                 published="Ioffe & Szegedy 2015: BN-Inception trained at 5x and 30x the base rate",
                 label="range of rates that trains, BN - none"),
            Rule("C5", "Bjorck et al. 2018: BN's final-accuracy advantage at the plain network's best learning rate "
                       "(batch minus none)",
                 expected=f"Bjorck et al. 2018: at the plain network's best rate the two reach comparable accuracy "
                          f"(95% CI within +-{band * 100:g} points)",
                 null=0.0, direction="equivalent", equivalence=band, digits=3,
                 published="Bjorck et al. 2018, Fig. 1: comparable accuracy at a rate both can use",
                 label="Bjorck: BN's advantage at the plain best rate"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        width_rule, bjorck_rule = self.rules(params)
        frac, target_frac = params.get("train_fraction", 0.9), params.get("target_fraction", 0.95)
        steps = config["train"]["steps"]
        rows = list(rows)
        ax = axis_widths(rows, AXIS, frac, grid=config.get("grid", {}).get(AXIS) or None)
        jobs = group_jobs(rows)
        target = target_frac * ax.best_mean if ax.best_mean is not None else None
        arms = [a for a in (config.get("arms") or {}) if a in ax.finals] or ax.arms
        seeds = ax.seeds(*ARMS)

        table: list[list[str]] = []
        notes: list[str] = []
        best_lr = {arm: ax.best(arm) for arm in arms}
        reach: dict[str, dict[Any, int | None]] = {}
        for arm in arms:
            lr = best_lr[arm]
            widths = ax.widths(arm)
            accs = [by[lr] for by in ax.finals[arm].values() if lr is not None and by.get(lr) is not None]
            reach[arm] = self._reach(jobs, arm, lr, ax.finals[arm], target)
            reached = [v for v in reach[arm].values() if v is not None]
            n_div = sum(ax.diverged[arm].values())
            table.append([
                arm, ax.range_text(arm),
                "{:.2f} [{:.2f}, {:.2f}]".format(*mean_ci(widths)) if widths else "n/a",
                fmt_value(lr) if lr is not None else "n/a",
                "{:.4f} [{:.4f}, {:.4f}]".format(*mean_ci(accs, bounds=(0.0, 1.0))) if accs else "n/a",
                (f"{fmean(reached):.0f} ({len(reached)}/{len(reach[arm])} seeds)" if reached
                 else f"never (>{steps})") if reach[arm] else "n/a",
                f"{n_div}/{len(ax.grid) * len(ax.finals[arm])}",
            ])
            notes.append(ax.accuracy_note(arm, "learning rate"))

        # C5: trainable width, batch minus none, per seed.
        diffs = ax.differences("batch", "none")
        lower = ax.lower_bound("batch", "none")
        if diffs:
            width = width_rule.decide(*mean_ci(diffs), n=len(diffs), lower_bound=lower)
            table.append(["batch - none (width)", "", width.text, "", "", "", ""])
        else:
            width = width_rule.decide(None, None, None, n=0, note="the run lacks a 'none' or 'batch' arm on the grid")
        notes.extend(censor_notes(ax, "batch", "none", "learning-rate grid"))
        notes.extend(self._edge_notes(ax, seeds, steps))

        # Bjorck et al. 2018: the advantage at the plain network's best rate vs at BN's best rate.
        lr_none, lr_bn = best_lr.get("none"), best_lr.get("batch")
        same, own = [], []
        for s in seeds:
            a_none = ax.finals["none"][s].get(lr_none)
            b_same, b_own = ax.finals["batch"][s].get(lr_none), ax.finals["batch"][s].get(lr_bn)
            if None not in (a_none, b_same, b_own):
                same.append(b_same - a_none)
                own.append(b_own - a_none)
        if same:
            bjorck = bjorck_rule.decide(*mean_ci(same), n=len(same))
            o_mean, o_low, o_high = mean_ci(own)
            # A share of the advantage is read only when BN has one at its own best rate (CI above 0).
            share = fmean(same) / o_mean if o_low > 0 else None
            table.append([f"BN advantage at lr {fmt_value(lr_none)} (none's best)", "", "", "", bjorck.text, "", ""])
            table.append([f"BN advantage at lr {fmt_value(lr_bn)} (BN's best)", "", "", "",
                          f"{o_mean:.3f} [{o_low:.3f}, {o_high:.3f}]", "", ""])
            notes.append(
                f"Bjorck et al. 2018: at the plain network's best rate ({fmt_value(lr_none)}) batch norm's final "
                f"accuracy differs from the plain network's by {fmean(same) * 100:+.1f} points; at its own best rate "
                f"({fmt_value(lr_bn)}) by {o_mean * 100:+.1f} points"
                + (f", so {share:.0%} of its advantage is left at the plain network's rate." if share is not None
                   else f": the advantage at its own best rate is not distinguishable from none (95% CI "
                        f"[{o_low:.3f}, {o_high:.3f}]), so there is little for the larger rate to explain, and "
                        f"comparable accuracy at the plain network's rate is expected either way."))
        else:
            bjorck = bjorck_rule.decide(None, None, None, n=0,
                                        note="no seed has both arms' final accuracy at the plain network's best rate")

        speed_note = self._speed_note(jobs, reach, seeds, lr_none, lr_bn, target, steps)
        if speed_note:
            notes.append(speed_note)
        notes.extend(ax.figure_note(arm, f"Figure \"{self.figures[0].title}\"") for arm in arms)
        notes.extend(curve_note(rows, AXIS, dict(spec.where)[AXIS], spec.title) for spec in self.figures
                     if spec.kind == "curve" and AXIS in dict(spec.where))
        notes.extend(self._interpretation(ax, width, bjorck, seeds, steps))
        if ax.threshold is not None:
            notes.insert(0, f"A learning rate trains when its final test accuracy reaches {ax.threshold:.3f} "
                            f"({frac:.0%} of the best mean final accuracy, {ax.best_mean:.3f}); the steps-to-target "
                            f"target is {target:.3f} ({target_frac:.0%} of it).")
        if diffs:
            headline = (f"batch norm trained over {fmean(ax.widths('batch')):.2f} decades of learning rate, no norm "
                        f"over {fmean(ax.widths('none')):.2f}: {width.text} wider (mean over {len(diffs)} seeds, "
                        f"95% CI)")
            if same:
                headline += (f"; Bjorck et al. 2018: at the plain network's best rate ({fmt_value(lr_none)}) BN's "
                             f"accuracy advantage is {bjorck.text} vs {fmean(own):.3f} at its own best "
                             f"({fmt_value(lr_bn)})")
            headline += "."
        else:
            headline = "no width to report: the run lacks a 'none' or 'batch' arm on the learning-rate grid."
        return Summary.of_findings(
            self, [width, bjorck], headline=headline,
            columns=["arm", "rates that train (in any seed)", "trainable width, decades [95% CI]",
                     "best rate", "final accuracy at best rate [95% CI]",
                     "steps to target at best rate (mean)", "diverged jobs"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _interpretation(ax, width, bjorck, seeds, steps) -> list[str]:
        """Why a verdict may differ from the published claims, from what this run shows."""
        out = []
        if width.verdict in ("mixed", "not supported") and seeds and "batch" in ax.ranges and "none" in ax.ranges:
            def mean_log(arm, end):
                vals = [getattr(ax.ranges[arm][s], end) for s in seeds]
                vals = [math.log10(v) for v in vals if v is not None]
                return sum(vals) / len(vals) if vals else None
            parts = []
            hb, hn = mean_log("batch", "high"), mean_log("none", "high")
            lb, ln = mean_log("batch", "low"), mean_log("none", "low")
            if hb is not None and hn is not None:
                parts.append(f"batch norm's largest trainable rate is {10 ** (hb - hn):.3g}x the plain network's "
                             f"(geometric mean), {'below' if hb - hn < math.log10(5) else 'at least'} the 5x of "
                             f"Ioffe & Szegedy's BN-x5")
            if lb is not None and ln is not None and lb > ln:
                parts.append(f"at the low end batch norm needs a {10 ** (lb - ln):.3g}x larger rate than the plain "
                             f"network to reach the bar in {steps} steps, which narrows its range")
            out.append("The trainable range with batch norm is not as much wider as the claim expects: "
                       + "; ".join(parts) + ". Possible reasons: a shallow MLP with He initialization is already "
                       "well conditioned, so the plain network tolerates fairly high rates; the output layer is not "
                       "normalized, and it may limit the largest rate with batch norm too; and a small data set "
                       "reaches its accuracy ceiling at many rates, so the bar separates little.")
        if bjorck.verdict == "not supported" and bjorck.estimate is not None:
            out.append(f"Contrary to Bjorck et al. 2018, batch norm keeps an accuracy difference of "
                       f"{bjorck.estimate * 100:+.1f} points at the plain network's best rate: here part of its "
                       f"effect is not the larger rate. Bjorck et al. compared fully trained ResNets on CIFAR-10; "
                       f"this run stops after {steps} steps, where a faster start still shows in the final accuracy.")
        return out

    @staticmethod
    def _edge_notes(ax, seeds, steps) -> list[str]:
        """The largest and smallest rates that trained, BN over none (per seed, geometric mean)."""
        if "batch" not in ax.ranges or "none" not in ax.ranges:
            return []
        out = []
        for end, word in (("high", "largest"), ("low", "smallest")):
            pairs = [(getattr(ax.ranges["batch"][s], end), getattr(ax.ranges["none"][s], end)) for s in seeds]
            ratios = [b / n for b, n in pairs if b is not None and n is not None]
            if not ratios:
                continue
            gm, low, high = geometric_mean_ci(ratios)
            edge = ("at_high_edge" if end == "high" else "at_low_edge")
            cut = any(getattr(ax.ranges[a][s], edge) for a in ("batch", "none") for s in seeds)
            text = (f"The {word} rate that trained: batch norm's is {gm:.3g}x the plain network's "
                    f"[{low:.3g}, {high:.3g}] (geometric mean over {len(ratios)} seeds)"
                    + (" (cut by the end of the grid in some seed)" if cut else ""))
            if end == "high":
                text += ("; Ioffe & Szegedy trained BN-Inception at 5x and 30x the base rate.")
            else:
                text += (f". At the low end both networks are limited by the {steps}-step budget (a small rate has "
                         f"not finished learning), so a longer run moves this edge down for both.")
            out.append(text)
        return out

    @staticmethod
    def _reach(jobs, arm, lr, per_seed, target) -> dict[Any, int | None]:
        """Per seed: the first evaluated step at which ``arm`` at rate ``lr`` reached ``target``."""
        if lr is None or target is None:
            return {}
        return {s: steps_to(jobs[job_of(arm, AXIS, lr, s)], "test_acc", target)
                for s in per_seed if job_of(arm, AXIS, lr, s) in jobs}

    @classmethod
    def _speed_note(cls, jobs, reach, seeds, lr_none, lr_bn, target, steps) -> str:
        """Steps to the target: none at its best rate over BN at its best rate, and over BN at none's best rate."""
        if target is None or lr_none is None or lr_bn is None or "none" not in reach or "batch" not in reach:
            return ""
        at_none = cls._reach(jobs, "batch", lr_none, {s: None for s in seeds}, target)
        parts, speedups = [], []
        for label, bn_reach in ((f"BN at its best rate {fmt_value(lr_bn)}", reach["batch"]),
                                (f"BN at the plain network's best rate {fmt_value(lr_none)}", at_none)):
            ratios = [reach["none"][s] / bn_reach[s] for s in seeds
                      if reach["none"].get(s) is not None and bn_reach.get(s) is not None]
            never_bn = sum(1 for s in seeds if bn_reach.get(s) is None)
            if ratios:
                gm, low, high = geometric_mean_ci(ratios)
                speedups.append((gm, low, high) if not never_bn else None)
                parts.append(f"{label}: {gm:.2f}x [{low:.2f}, {high:.2f}] fewer steps than the plain network at "
                             f"its best rate ({len(ratios)} seeds"
                             + (f"; BN never reached it in {never_bn}" if never_bn else "") + ")")
            else:
                speedups.append(None)
                parts.append(f"{label}: no speed-up to report (a network never reached the target in {steps} steps)")
        never_none = sum(1 for s in seeds if reach["none"].get(s) is None)
        share = ""
        own, same = speedups
        if own is not None and same is not None and own[1] > 1 and lr_bn != lr_none:
            # In log terms, the part of BN's speed-up at its own rate that it keeps at the plain network's rate.
            left = math.log(same[0]) / math.log(own[0])
            share = (f" In steps, {left:.0%} of batch norm's speed-up (in log terms) is left at the plain "
                     f"network's rate" + (": by this measure its advantage is not only the larger rate."
                                          if same[1] > 1 else ".")
                     if left > 0 else " In steps, none of batch norm's speed-up is left at the plain network's rate.")
        return (f"Steps to {target:.3f} test accuracy (geometric mean of none/BN over seeds, 95% CI): "
                + "; ".join(parts) + "." + share
                + (f" The plain network never reached the target at its best rate in {never_none} seed(s); those "
                   "seeds have no ratio." if never_none else ""))


register(LearningRateSensitivity())
