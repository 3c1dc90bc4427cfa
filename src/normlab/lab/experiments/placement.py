"""Batch norm before or after the activation (claim C13: it can go either way).

Claim tested: C13, batch norm can go before or after the activation. The network is the deep
MLP of the vanishing-gradients experiment (10 x 100, torch's default ``nn.Linear`` init, plain
SGD, batch 60, mnist-5k), with sigmoid or ReLU (grid axis ``model.activation``), in three arms
that share a seed's initial weights and batches: no norm, BN before the activation
(``Linear -> BN -> act``, Ioffe & Szegedy's placement) and BN after it (``Linear -> act -> BN``).

"Either way" is a claim of *no difference*, so the rule is an equivalence rule. Per seed,

    d = 100 * (final test accuracy with BN after - with BN before)     (percentage points)

and its mean over seeds with a 95% t-interval goes to a ``Rule(direction="equivalent")`` per
activation: supported when the CI lies wholly inside +-``params["equivalence_points"]`` (1 point,
declared before the run: a gap under one point on MNIST-scale accuracy is within what seeds
and a 1,000-digit test set move, and too small to make a practitioner choose a placement), not
supported when it lies wholly outside, inconclusive otherwise. The two findings combine into one
C13 finding. Also reported, without a verdict: steps to ``params["target_accuracy"]`` (85%, well
below the plateau of BN networks on 4,000 training digits) for each arm, and whether each
placement beats no norm (final accuracy difference with its CI).

Published anchor: none with a number. Ioffe & Szegedy (2015, Sec. 3.2) put BN before the
nonlinearity; many practitioners report that after the activation works as well or better
(practice, not a paper's measurement).

Forms: full 5 seeds x 6,000 steps (evaluation every 100 steps); quick 3 seeds x 1,500 steps
(evaluation every 50): about 115 s of CPU, 65 s wall on 2 cores with ``--jobs 2``.
"""

from __future__ import annotations

from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import geometric_mean_ci, mean_ci
from ..rows import diverged, final, steps_to
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Summary
from .registry import register
from .common import grid_inputs, job_rows

__all__ = ["Placement"]

PUBLISHED = [
    "No published number compares the two placements for this setting; the lab's figure stands alone.",
    "Ioffe & Szegedy 2015 (Sec. 3.2) add BN immediately before the nonlinearity, normalizing Wu + b rather than "
    "the layer input u, reasoning that Wu + b is more likely to have a symmetric, non-sparse ('more Gaussian') "
    "distribution than the output of another nonlinearity.",
    "Many practitioners report that BN after the activation works as well or better; this is practice "
    "(forum threads, blog benchmarks, framework examples), not a paper's controlled measurement.",
]


def _pts(mean: float, low: float, high: float) -> str:
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


class Placement(Experiment):
    name = "placement"
    claim = "C13: batch norm can go before or after the activation"
    title = "Batch norm before or after the activation, in a deep sigmoid and ReLU MLP"
    description = ("10x100 sigmoid/ReLU MLP, SGD: final accuracy (after - before, equivalence rule) and steps to "
                   "target, BN before vs after vs none")
    claims = ("C13",)
    figures = (
        FigureSpec(kind="curve", metric="test_acc", panel="model.activation", title="Test accuracy during training",
                   ylabel="test accuracy",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum."),
        FigureSpec(kind="curve", metric="train_loss", panel="model.activation", logy=True, title="Training loss",
                   ylabel="cross-entropy (mean since last evaluation)",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum."),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # The vanishing-gradients experiment's network: deep enough that where the norm sits matters
            # for every layer's input, with the default init a practitioner gets.
            model=ModelConfig(kind="mlp", widths=[100] * 10, activation="sigmoid"),
            train=TrainConfig(steps=6000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=100,
                              checkpoint_every=1000),
            arms={
                "none": {"model.norm": "none"},
                "before": {"model.norm": "batch", "model.placement": "before"},
                "after": {"model.norm": "batch", "model.placement": "after"},
            },
            grid={"model.activation": ["sigmoid", "relu"]},
            params={"target_accuracy": 0.85, "equivalence_points": 1.0},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {
            "train.steps": 1500, "train.seeds": 3, "train.eval_every": 50, "train.checkpoint_every": 500,
        })

    def rules(self, params: dict[str, Any], activations: list[str]) -> dict[str, Rule]:
        """The verdict rules, fixed before the run by the params: one equivalence rule per activation."""
        band = params.get("equivalence_points", 1.0)
        return {
            act: Rule("C13", f"final test accuracy, BN after - BN before the activation ({act}), percentage points",
                      expected=f"BN after the activation ends within +-{band:g} points of BN before it "
                               f"(95% CI of the difference inside the band)",
                      null=0.0, direction="equivalent", equivalence=band, unit=" pts", digits=2,
                      published="no published number", label=f"after - before, {act}")
            for act in activations
        }

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        target = params.get("target_accuracy", 0.85)
        band = params.get("equivalence_points", 1.0)
        steps = config["train"]["steps"]
        jobs, arms, activations, seeds = grid_inputs(rows, config, "model.activation")
        rules = self.rules(params, activations)

        def job_of(arm: str, act: str, seed: int) -> list[dict[str, Any]]:
            return job_rows(jobs, config, arm, seed, model__activation=act)

        table: list[list[str]] = []
        notes: list[str] = []
        acc: dict[tuple[str, str], dict[int, float]] = {}
        reach: dict[tuple[str, str], dict[int, int | None]] = {}
        for act in activations:
            for arm in arms:
                acc[(act, arm)], reach[(act, arm)] = {}, {}
                for s in seeds:
                    job = job_of(arm, act, s)
                    if not job:
                        continue
                    if diverged(job):
                        notes.append(f"{act}, arm {arm!r}, seed {s} diverged (loss NaN/inf) at step {job[-1]['step']}; "
                                     f"its final accuracy is that of its last evaluation.")
                    if (a := final(job, "test_acc")) is not None:
                        acc[(act, arm)][s] = a
                    reach[(act, arm)][s] = steps_to(job, "test_acc", target)

        findings: list[Finding] = []
        per_act: dict[str, Finding] = {}
        for act in activations:
            for arm in arms:
                accs = list(acc[(act, arm)].values())
                reached = [v for v in reach[(act, arm)].values() if v is not None]
                acc_text = "n/a"
                if accs:
                    m, lo, hi = mean_ci(accs, bounds=(0.0, 1.0))
                    acc_text = f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
                vs_none = ""
                if arm != "none" and "none" in arms:
                    diffs = [100 * (acc[(act, arm)][s] - acc[(act, "none")][s]) for s in seeds
                             if s in acc[(act, arm)] and s in acc[(act, "none")]]
                    vs_none = _pts(*mean_ci(diffs, bounds=(-100.0, 100.0))) if diffs else "n/a"
                table.append([act, arm, f"{len(reached)}/{len(reach[(act, arm)])}",
                              f"{sum(reached) / len(reached):.0f}" if reached else f"never (>{steps})",
                              acc_text, vs_none])
            diffs = [100 * (acc[(act, "after")][s] - acc[(act, "before")][s]) for s in seeds
                     if s in acc.get((act, "after"), {}) and s in acc.get((act, "before"), {})]
            if diffs:
                finding = rules[act].decide(*mean_ci(diffs, bounds=(-100.0, 100.0)), n=len(diffs))
            else:
                finding = rules[act].decide(None, None, None, n=0, note="no seed has both placements")
            per_act[act] = finding
            findings.append(finding)
            table.append([act, "after - before", "", "", f"{finding.text} ({finding.verdict})", ""])
        combined = combine(
            "C13", findings,
            statistic="final test accuracy, BN after - before the activation (" + ", ".join(activations) + ")",
            expected=f"BN after the activation ends within +-{band:g} points of BN before it, for "
                     + " and ".join(activations),
            published="no published number")

        speed_text = []
        for act in activations:
            before, after = reach.get((act, "before"), {}), reach.get((act, "after"), {})
            both = [before[s] / after[s] for s in seeds if before.get(s) and after.get(s)]
            if both:
                gm, lo, hi = geometric_mean_ci(both)
                speed_text.append(f"{act}: steps before / steps after = {gm:.2f}x [{lo:.2f}, {hi:.2f}] over "
                                  f"{len(both)} seed(s) where both reached it")
            missing = [s for s in seeds if s in before and s in after and not (before[s] and after[s])]
            for s in missing:
                who = [name for name, r in (("before", before), ("after", after)) if r[s] is None]
                speed_text.append(f"{act}, seed {s}: {' and '.join(who)} never reached {target:.0%} in {steps} steps")
        headline = (f"C13 {combined.verdict}: final test accuracy with BN after the activation minus before it was "
                    + "; ".join(f"{per_act[a].text} ({a})" for a in activations)
                    + f" (mean over seeds, 95% CI; 'either way' needs the CI inside +-{band:g} pts).")
        if speed_text:
            notes.append(f"Steps to {target:.0%} test accuracy (no verdict; >1x means after got there sooner): "
                         + "; ".join(speed_text) + ".")
        for act in activations:
            beats = []
            for arm in ("before", "after"):
                diffs = [100 * (acc[(act, arm)][s] - acc[(act, "none")][s]) for s in seeds
                         if s in acc.get((act, arm), {}) and s in acc.get((act, "none"), {})]
                if len(diffs) >= 2:
                    m, lo, hi = mean_ci(diffs, bounds=(-100.0, 100.0))
                    word = "beats" if lo > 0 else ("falls below" if hi < 0 else "cannot be told from")
                    higher = sum(d > 0 for d in diffs)
                    beats.append(f"BN {arm} {word} no norm ({_pts(m, lo, hi)} pts; higher in {higher}/{len(diffs)} "
                                 f"seeds)")
            if beats:
                plain = list(acc.get((act, "none"), {}).values())
                low_bar = ""
                if plain and max(plain) < 0.15:
                    low_bar = (f"; without a norm this {len(config['model']['widths'])}-layer network stayed near "
                               f"chance ({sum(plain) / len(plain):.3f}), so this is a low bar")
                notes.append(f"{act}: " + "; ".join(beats) + f" (final test accuracy, 95% CI over seeds){low_bar}.")
        for act in activations:
            means = {arm: sum(v.values()) / len(v) for arm in arms if (v := acc.get((act, arm)))}
            firsts = {arm: (sum(r) / len(r), len(r), len(reach[(act, arm)])) for arm in arms
                      if (r := [v for v in reach.get((act, arm), {}).values() if v is not None])}
            if means:
                order = sorted(means, key=means.get, reverse=True)
                text = f"Test accuracy curves ({act}): final accuracy " + ", ".join(f"{a} {means[a]:.3f}" for a in order)
                if firsts:
                    text += (f"; mean step of reaching {target:.0%}: "
                             + ", ".join(f"{a} {firsts[a][0]:.0f}" + (f" ({firsts[a][1]}/{firsts[a][2]} seeds)"
                                                                      if firsts[a][1] < firsts[a][2] else "")
                                         for a in sorted(firsts, key=lambda a: firsts[a][0])))
                never = [a for a in arms if a in means and a not in firsts]
                if never:
                    text += f"; never reached {target:.0%}: " + ", ".join(never)
                notes.append(text + ".")
        for act in activations:
            f = per_act[act]
            if f.low is not None and f.high is not None and (f.low > 0 or f.high < 0):
                better, worse = ("after", "before") if f.low > 0 else ("before", "after")
                notes.append(
                    f"{act}: BN {better} the activation ended higher than BN {worse} it ({f.text}, CI excluding 0). "
                    f"A likely reason: after the activation, BN also centers and scales the activation's outputs "
                    f"(a sigmoid's are all positive, a ReLU's non-negative) before the next layer, which plain SGD "
                    f"favours (LeCun et al. 1998, 'Efficient BackProp'); before it, BN keeps the activation's input "
                    f"in its steep range but leaves its outputs uncentred. Which effect wins depends on the "
                    f"activation, depth and data, so the gap here need not carry over.")
        both_trained = [act for act in activations
                        if all(reach.get((act, arm)) and all(v is not None for v in reach[(act, arm)].values())
                               for arm in ("before", "after"))]
        if both_trained:
            notes.append(f"In the weak sense of 'can go either way' (both placements train), the claim holds for "
                         f"{' and '.join(both_trained)}: every seed of both placements reached {target:.0%}. The "
                         f"verdict uses the strict sense, final accuracies within +-{band:g} points.")
        every = config["train"]["eval_every"]
        early = [act for act in activations
                 if all((r := [v for v in reach.get((act, arm), {}).values() if v is not None])
                        and max(r) <= 2 * every for arm in ("before", "after"))]
        if early:
            notes.append(f"Both placements reached {target:.0%} within the first two evaluations (every {every} "
                         f"steps) for {' and '.join(early)}: at that resolution steps to target hardly tells the "
                         f"placements apart.")
        notes.append(f"The equivalence band (+-{band:g} points of final test accuracy) was declared before the run. "
                     "A CI that straddles its edge is inconclusive, not a difference: more seeds (--seeds) "
                     "narrow it.")
        return Summary.of_findings(
            self, [combined], headline=headline,
            columns=["activation", "arm", f"seeds reaching {target:.0%}", f"steps to {target:.0%} (mean)",
                     "final test accuracy [95% CI]", "vs none (pts, 95% CI)"],
            rows=table, published=PUBLISHED, notes=notes,
        )


register(Placement())
