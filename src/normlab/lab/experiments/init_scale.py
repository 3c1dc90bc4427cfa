"""Sensitivity to the initial weight scale (claim C4).

Claim C4: batch norm lowers a network's sensitivity to its initial weights. A layer followed by
batch norm gives the same output whatever the scale of its weights (BN divides it out), so only
the last layer's scale and the effective learning rate (lr / scale^2 for the normalized layers)
still depend on it; without BN, a scale too small makes the signal and gradients vanish layer by
layer, and one too large makes them explode.

Setup: a 4x100 ReLU MLP on the embedded MNIST subset, batch 60, plain SGD at lr 0.1, with
Gaussian initial weights of std ``init_gain / sqrt(fan_in)`` in every layer (zero biases), the
gain on a wide log grid (``grid["model.init_gain"]``), with batch norm before each ReLU
("batch") and without ("none"). Four hidden layers so that a per-layer factor compounds; ReLU
so that He's gain is the one that keeps the signal's scale. The grid also holds the standard
gains, marked on the figure and reported in the table:

* torch's default for ``nn.Linear`` (kaiming-uniform with a = sqrt 5: uniform with bound
  1/sqrt(fan_in), std 1/sqrt(3 fan_in)): gain 1/sqrt 3 = 0.577 (as a Gaussian of that std);
* LeCun (1998), and Xavier/Glorot (2010) for square layers: gain 1;
* He et al. (2015), for ReLU: gain sqrt 2.

Statistic (Rule declared in :meth:`rules`): a gain *trains* when its final test accuracy reaches
``train_fraction`` (0.9) x the best mean final accuracy of the run (any arm, any gain; one bar for
both arms); the trainable width is the summed log10 cell width of the gains that train, in decades
(:func:`normlab.lab.experiments.common.trainable_range`; the standard gains make the grid
non-uniform, and each point's cell runs to the geometric midpoints with its neighbours). Per seed,
width(batch) - width(none); mean and 95% t-interval over seeds. Expected: batch norm trains over
a wider range, by at least 1 decade (a gain 10x off the standard still trains); a CI within
+-0.25 decades is "no effect". No published number anchors this claim.

Quick form: gains 0.01 .. 100 in half decades plus the three standard gains (12 points), 3 seeds,
400 steps, evaluated every 50. Full form: gains 0.001 .. 1000 in third-decades plus the
standard gains (21 points), 5 seeds, 2000 steps, evaluated every 100.
"""

from __future__ import annotations

from statistics import fmean

import math
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from ..intervals import mean_ci
from ..verdicts import Rule
from .base import Experiment, FigureSpec, Summary
from .registry import register
from .common import axis_widths, censor_notes, curve_note, fmt_value, log_grid, mean_by_value

__all__ = ["InitScale", "STANDARD_GAINS"]

AXIS = "model.init_gain"

# (gain, short name for the figure's marks, name for the table): the standard initializations,
# as gains of std = gain / sqrt(fan_in).
STANDARD_GAINS = (
    (round(1 / math.sqrt(3), 4), "torch", "torch default (1/sqrt 3)"),
    (1.0, "LeCun", "LeCun / Xavier (1)"),
    (round(math.sqrt(2), 4), "He", "He (sqrt 2)"),
)


def _grid(low_exp: float, high_exp: float, per_decade: int) -> list[float]:
    """A log grid with the standard gains added (each value once, sorted)."""
    return sorted(set(log_grid(low_exp, high_exp, per_decade)) | {g for g, _, _ in STANDARD_GAINS})


class InitScale(Experiment):
    name = "init-scale"
    claim = "C4: batch norm lowers sensitivity to the initial weights"
    title = "Initial weight scale: the range of scales that trains, with and without batch norm"
    description = ("4x100 ReLU MLP, SGD, Gaussian init of std gain/sqrt(fan_in) over a log grid of gains: "
                   "width of the trainable range, BN vs none")
    claims = ("C4",)
    figures = (
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final",
            title="Final test accuracy against the initial weight scale", ylabel="final test accuracy",
            caption="Initial weights: Gaussian with std gain / sqrt(fan_in). Mean over seeds; the band spans the "
                    "seeds' minimum to maximum; vertical lines mark the standard initializations. A run whose loss "
                    "became NaN stopped there and shows the accuracy of the broken network.",
            marks=tuple((g, mark) for g, mark, _ in STANDARD_GAINS),
        ),
        FigureSpec(
            kind="curve", metric="test_acc", where=((AXIS, round(math.sqrt(2), 4)),),
            title="Test accuracy during training from He initialization (gain sqrt 2)", ylabel="test accuracy",
            caption="The standard scale for ReLU. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", where=((AXIS, 0.1),),
            title="Test accuracy during training from a small initial scale (gain 0.1)", ylabel="test accuracy",
            caption="Weights 14x smaller than He's. Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            model=ModelConfig(kind="mlp", widths=[100, 100, 100, 100], activation="relu", init_gain=2 ** 0.5),
            # lr 0.1: a rate at which both networks train well from He's initialization (see the
            # lr-sensitivity experiment), so that the grid tests the initial scale alone.
            train=TrainConfig(steps=2000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=100,
                              checkpoint_every=1000),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={AXIS: _grid(-3, 3, 3)},
            params={"train_fraction": 0.9, "min_width_gain": 1.0, "width_band": 0.25},
        )

    def quick_config(self) -> ExperimentConfig:
        config = self.default_config()
        config.train.steps, config.train.seeds, config.train.eval_every = 400, 3, 50
        config.train.checkpoint_every = 400
        config.grid = {AXIS: _grid(-2, 2, 2)}
        return config

    def rules(self, params: dict[str, Any]) -> tuple[Rule]:
        """The verdict rule, fixed before the run by the config's params."""
        frac, gain = params.get("train_fraction", 0.9), params.get("min_width_gain", 1.0)
        return (
            Rule("C4", f"width of the trainable range of initial weight scales, batch minus none (decades; a scale "
                       f"trains when its final test accuracy reaches {frac:.0%} of the run's best mean)",
                 expected=f"batch norm trains over a range of initial scales at least {gain:g} decade(s) wider "
                          f"(95% CI above 0)",
                 null=0.0, direction="greater", target=gain, equivalence=params.get("width_band", 0.25),
                 unit=" decades", digits=2, label="range of scales that trains, BN - none"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        (rule,) = self.rules(params)
        frac = params.get("train_fraction", 0.9)
        rows = list(rows)
        ax = axis_widths(rows, AXIS, frac, grid=config.get("grid", {}).get(AXIS) or None)
        arms = [a for a in (config.get("arms") or {}) if a in ax.finals] or ax.arms
        standard = [(g, name) for g, _, name in STANDARD_GAINS if g in ax.grid]

        table: list[list[str]] = []
        notes: list[str] = []
        for arm in arms:
            widths = ax.widths(arm)
            row = [arm, ax.range_text(arm),
                   "{:.2f} [{:.2f}, {:.2f}]".format(*mean_ci(widths)) if widths else "n/a"]
            for g, _ in standard:
                accs = [v for by in ax.plotted[arm].values() if (v := by.get(g)) is not None]
                div = ax.diverged[arm].get(g, 0)
                row.append("{:.4f} [{:.4f}, {:.4f}]".format(*mean_ci(accs, bounds=(0.0, 1.0)))
                           + (f" ({div} diverged)" if div else "") if accs else "n/a")
            row.append(f"{sum(ax.diverged[arm].values())}/{len(ax.grid) * len(ax.finals[arm])}")
            table.append(row)
            notes.append(ax.accuracy_note(arm, "initial scale (gain)"))

        diffs = ax.differences("batch", "none")
        if diffs:
            finding = rule.decide(*mean_ci(diffs), n=len(diffs), lower_bound=ax.lower_bound("batch", "none"))
            table.append(["batch - none (width)", "", finding.text] + [""] * (len(standard) + 1))
            headline = (f"batch norm trained from initial scales spanning {fmean(ax.widths('batch')):.2f} decades, "
                        f"no norm {fmean(ax.widths('none')):.2f}: {finding.text} wider (mean over {len(diffs)} "
                        f"seeds, 95% CI).")
        else:
            finding = rule.decide(None, None, None, n=0, note="the run lacks a 'none' or 'batch' arm on the grid")
            headline = "no width to report: the run lacks a 'none' or 'batch' arm on the initial-scale grid."
        notes.extend(censor_notes(ax, "batch", "none", "initial-scale grid"))
        notes.extend(ax.figure_note(arm, f"Figure \"{self.figures[0].title}\"") for arm in arms)
        notes.extend(curve_note(rows, AXIS, dict(spec.where)[AXIS], spec.title) for spec in self.figures
                     if spec.kind == "curve" and AXIS in dict(spec.where))
        notes.extend(n for arm in arms for n in self._edge_notes(ax, arm, config["train"]["steps"]))
        if finding.verdict in ("mixed", "not supported"):
            notes.append(
                f"The range of initial scales that trains is not as much wider with batch norm as expected "
                f"({finding.text}). Possible reasons: with {len(config['model']['widths'])} hidden layers the "
                f"per-layer factor gain/sqrt 2 compounds only that many times, so the plain network tolerates a "
                f"fair range; with batch norm, large scales lower the effective learning rate (lr / scale^2), so "
                f"within {config['train']['steps']} steps they learn too slowly to reach the bar; and the output "
                f"layer, which batch norm does not normalize, still feels the scale.")
        if ax.threshold is not None:
            notes.insert(0, f"An initial scale trains when its final test accuracy reaches {ax.threshold:.3f} "
                            f"({frac:.0%} of the best mean final accuracy, {ax.best_mean:.3f}).")
        if len(standard) < len(STANDARD_GAINS):
            notes.append("Some standard gains are not on this run's grid; the table shows those that are.")
        return Summary.of_findings(
            self, [finding], headline=headline,
            columns=["arm", "gains that train (in any seed)", "trainable width, decades [95% CI]"]
                    + [f"final accuracy at {name} [95% CI]" for _, name in standard] + ["diverged jobs"],
            rows=table, notes=notes,
            published=["No published number anchors C4. Ioffe & Szegedy 2015 (section 3.3) argue that BN makes "
                       "back-propagation through a layer unaffected by the scale of its parameters "
                       "(BN(aWu) = BN(Wu)), so training depends less on the initialization."],
        )

    @staticmethod
    def _edge_notes(ax, arm: str, steps: int) -> list[str]:
        """Why ``arm`` fails outside its range, read off the data: no learning, divergence, or slow learning."""
        if ax.threshold is None:
            return []
        # Where the arm trains on average, a diverged run counting as not training.
        trains = mean_by_value(ax.finals.get(arm, {}))
        above = [x for x in ax.grid if trains.get(x) is not None and trains[x] >= ax.threshold]
        if not above:
            return []
        means = ax.plotted_means(arm)
        out = []
        below_range = [x for x in ax.grid if x < above[0]]
        above_range = [x for x in ax.grid if x > above[-1]]
        for side, xs in (("small", below_range), ("large", above_range)):
            vals = [means[x] for x in xs if means.get(x) is not None]
            if not vals:
                continue
            div = sum(ax.diverged[arm].get(x, 0) for x in xs)
            n = len(xs) * len(ax.finals[arm])
            edge = above[0] if side == "small" else above[-1]
            where = f"gains {'below' if side == 'small' else 'above'} {fmt_value(edge)}"
            if div:
                text = (f"{arm!r} at {where}: {div} of {n} runs diverged (loss NaN/inf)"
                        + (": without normalization the signal grows by about gain/sqrt 2 per ReLU layer until the "
                           "loss overflows." if arm == "none" and side == "large" else "."))
            elif arm == "none" and side == "small":
                text = (f"{arm!r} at {where}: no run diverged, and the mean final accuracy is at most {max(vals):.3f}: "
                        f"the signal shrinks by about gain/sqrt 2 per ReLU layer, so the output and the early layers' "
                        f"gradients vanish and SGD barely moves in {steps} steps.")
            elif arm != "none" and side == "large":
                text = (f"{arm!r} at {where}: no run diverged; the mean final accuracy falls to {min(vals):.3f}. "
                        f"A normalized layer's output ignores its weights' scale, but its effective learning rate "
                        f"scales as lr / scale^2, so large initial weights learn slowly: this edge is set by the "
                        f"{steps}-step budget and would move with a longer run.")
            else:
                text = (f"{arm!r} at {where}: no run diverged; the mean final accuracy is "
                        f"{min(vals):.3f} .. {max(vals):.3f}.")
            out.append(text)
        return out


register(InitScale())
