"""Cooijmans et al. (2016), *Recurrent Batch Normalization*: sequential and permuted MNIST.

Claim tested: C11. The folklore says batch norm is hard to use in recurrent networks;
Cooijmans et al. showed that an LSTM whose input-to-hidden, hidden-to-hidden and cell terms are
batch-normalized with statistics kept per time step (BN-LSTM) converges faster than the plain
LSTM and ends at least as accurate. Here three arms share a seed's initial weights, batches and
optimizer (``model.kind = "lstm"``, :class:`normlab.lab.models.SequenceClassifier`):

* ``none``: ``torch.nn.LSTM`` (its one bias trained, initialized as the others);
* ``batch``: :class:`normlab.BNLSTM` (per-step statistics, gains 0.1 as in the paper);
* ``layer``: :class:`normlab.LNLSTM` (Ba et al. 2016), an extra arm reported without a verdict.

Each image (1 x 28 x 28) is read row by row, 28 steps of 28 pixels (grid axis
``model.sequence = "rows"``), or with its 784 pixels first put in one fixed random order
(``"permuted"``, seed ``model.permute_seed``) and then cut into 28 steps of 28; the last hidden
state feeds a linear classifier. The paper reads one pixel per step (784 steps), which is
far too slow for CPU runs; with 28 steps the permuted task keeps its scrambled spatial
structure but not its long-range memory demand (see the notes of a run).

Statistics, per seed and sequence variant, declared before the run (:meth:`SeqMnist.rules`):

* speed-up = steps of the LSTM / steps of the BN-LSTM to ``params["target_accuracy"]`` test
  accuracy (the first evaluation at or above it), geometric mean over seeds with a 95%
  t-interval of the logs. Expected (the paper: "BN-LSTM converges faster"): CI above 1x and the
  estimate at least ``params["min_speedup"]`` (1.5x); a CI wholly inside 1x /(1.1) .. 1x * 1.1 is
  "no effect worth the name" (not supported). An LSTM seed that never reached the target counts
  at the step budget (the speed-up is then a lower bound, labelled "at least"); a BN-LSTM seed
  that never reached it counts at the budget too (an upper bound of that seed's ratio, which can
  only flatter BN), and a seed where neither reached it is left out (the notes say which).
* final test accuracy, BN-LSTM - LSTM in percentage points, mean over seeds with a t-interval:
  a non-inferiority rule, expected (the paper's 99.0% vs 98.9% and 95.4% vs 90.2%: BN at least
  as accurate) the CI wholly above ``-params["margin_points"]`` (-1 point); wholly below it
  is not supported.

The two variants' findings combine into one speed and one accuracy finding for C11
(:func:`~normlab.lab.verdicts.combine`), and those into the experiment's verdict.

Published anchor: Cooijmans et al. 2016 (pixel-by-pixel, hidden 100, RMSProp lr 1e-3, batch
64): test accuracy 99.0% (BN-LSTM) vs 98.9% (LSTM) on sequential MNIST and 95.4% vs 90.2% on
permuted MNIST; their validation curves show the BN-LSTM converging faster.

Also recorded, without a verdict: the BN-LSTM's test accuracy when each test batch is
normalized by its own statistics, as in training (``probes["test_acc_batch_stats"]``, third
figure): the gap to its accuracy with running statistics is batch norm's train/inference
discrepancy in this recurrent network.

Forms: full: hidden 100 (the paper's), Adam lr 1e-3 (the lab has no RMSProp), batch 64, 5
seeds x 2,000 steps on the 4,000 training digits of mnist-5k, evaluated every 20 steps, target
85%. Quick: hidden 32, 3 seeds x 600 steps, evaluated every 30, target 80% (the smaller LSTM
learns more slowly: a pilot of the plain LSTM on seed 100, outside the default seeds, reached
about 80% at step 300-350 on both variants and about 85% at step 800; 85% with hidden 100
likewise lies well below its plateau of about 93% rows / 89% permuted). The quick form's LSTMs
are smaller than the paper's so that it fits about two minutes on 2 cores (the BN-LSTM's
Python loop over steps is the cost); the claim and the rules are unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ...layers.recurrent import RecurrentBatchNorm
from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import geometric_mean_ci, mean_ci
from ..rows import diverged, final, steps_to
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Summary, register
from .common import grid_inputs, job_rows

__all__ = ["SeqMnist"]

AXIS = "model.sequence"
BATCH_STATS = "test_acc_batch_stats"  # the BN-LSTM's test accuracy with each test batch's own statistics

PUBLISHED = [
    "Cooijmans et al. 2016 (pixel-by-pixel MNIST, 784 steps of one pixel, hidden 100): test accuracy "
    "LSTM 98.9%, BN-LSTM 99.0%; permuted pixel order: LSTM 90.2%, BN-LSTM 95.4%.",
    "Cooijmans et al. 2016, validation accuracy against training iterations on (permuted) pixel MNIST: the "
    "BN-LSTM converges faster than the LSTM (the paper gives no number of steps).",
    "Ba et al. 2016 (layer normalization) report faster convergence than the plain LSTM too, without "
    "depending on the batch; here LN is an extra arm without a verdict.",
]


def _pts(mean: float, low: float, high: float) -> str:
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def speedups(reach_none: dict[int, int | None], reach_bn: dict[int, int | None], budget: int
             ) -> tuple[list[float], list[int], list[int], list[int]]:
    """Per seed (both arms present), steps of the plain arm over steps of ``reach_bn``'s arm to
    the target: ``(ratios, lower, upper, dropped)``. A plain seed that never got there counts at
    ``budget`` (``lower``: its ratio is a lower bound); a normalized seed that never got there
    counts at ``budget`` too (``upper``: an upper bound); seeds where neither did are ``dropped``.

    >>> speedups({0: 100, 1: None, 2: 300, 3: None}, {0: 50, 1: 100, 2: None, 3: None}, 400)
    ([2.0, 4.0, 0.75], [1], [2], [3])
    """
    ratios, lower, upper, dropped = [], [], [], []
    for seed in sorted(set(reach_none) & set(reach_bn)):
        plain, normed = reach_none[seed], reach_bn[seed]
        if plain is None and normed is None:
            dropped.append(seed)
            continue
        if plain is None:
            lower.append(seed)
        if normed is None:
            upper.append(seed)
        ratios.append((plain if plain is not None else budget) / (normed if normed is not None else budget))
    return ratios, lower, upper, dropped


class SeqMnist(Experiment):
    name = "cooijmans2016-seqmnist"
    claim = ("C11: batch norm in a recurrent network (BN-LSTM, per-step statistics) converges faster than a plain "
             "LSTM and ends at least as accurate")
    title = "Cooijmans et al. 2016: batch-normalized LSTM on sequential and permuted MNIST"
    description = ("MNIST read row by row (28 steps of 28 pixels), plain and permuted: nn.LSTM vs BNLSTM vs LNLSTM, "
                   "steps to target and final accuracy")
    claims = ("C11",)
    figures = (
        FigureSpec(kind="curve", metric="test_acc", panel=AXIS,
                   title="Test accuracy against training steps (as their accuracy-vs-iterations figure)",
                   ylabel="test accuracy",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum. One panel per sequence: "
                           "rows in order, or the pixels in one fixed random order."),
        FigureSpec(kind="curve", metric="train_loss", panel=AXIS, logy=True, title="Training loss",
                   ylabel="cross-entropy (mean since last evaluation)",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum."),
        FigureSpec(kind="curve", metric=BATCH_STATS, panel=AXIS,
                   title="BN-LSTM test accuracy with each test batch's own statistics (as in training)",
                   ylabel="test accuracy, batch statistics",
                   caption="Only the BN-LSTM has this line: the test set in batches of the training batch size, each "
                           "normalized by its own statistics at every step instead of the running ones. Where it "
                           "lies above the BN-LSTM's line of the first figure, the running statistics cost accuracy."),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # The paper's hidden size; the LSTM has sigmoid gates and a tanh cell (activation "tanh").
            model=ModelConfig(kind="lstm", widths=[100], activation="tanh", permute_seed=0),
            # Adam at the paper's RMSProp rate and batch (the lab's optimizers are SGD and Adam).
            train=TrainConfig(steps=2000, batch_size=64, optimizer="adam", lr=1e-3, seeds=5, eval_every=20,
                              checkpoint_every=500),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"},
                  "layer": {"model.norm": "layer"}},
            grid={AXIS: ["rows", "permuted"]},
            # 85%: well below the plain LSTM's plateau (about 93% rows, 89% permuted on 4,000 training
            # digits), where both arms still climb and the ratio of steps means something.
            params={"target_accuracy": 0.85, "min_speedup": 1.5, "margin_points": 1.0,
                    "other_targets": [0.8, 0.88]},
        )

    def quick_config(self) -> ExperimentConfig:
        # Hidden 32 instead of 100: the BN-LSTM's step-by-step loop is the run's cost. The smaller
        # LSTM learns more slowly, so the target moves down with it (see the module docstring).
        return apply_overrides(self.default_config(), {
            "model.widths": [32], "train.steps": 600, "train.seeds": 3, "train.eval_every": 30,
            "train.checkpoint_every": 300, "params.target_accuracy": 0.8, "params.other_targets": [0.75, 0.85],
        }, parse=False)

    def measurements(self, model: torch.nn.Module, data: Any, config: ExperimentConfig, arm: str) -> dict[str, float]:
        """For a model with recurrent batch norms: test accuracy with batch statistics (``BATCH_STATS``).

        The test set in batches of ``train.batch_size`` (the last one shorter), each normalized by
        its own per-step statistics as in training, on a copy (training mode updates the running
        statistics). It tells how much of the BN-LSTM's test accuracy its running statistics cost.
        """
        if not any(isinstance(m, RecurrentBatchNorm) for m in model.modules()):
            return {}
        probe = copy.deepcopy(model).train()  # the LSTM has no dropout: training mode only switches the norms
        batch, n, correct = config.train.batch_size, len(data.y_test), 0
        with torch.no_grad():
            for start in range(0, n, batch):
                x, y = data.x_test[start:start + batch], data.y_test[start:start + batch]
                correct += int((probe(x).argmax(1) == y).sum())
        return {BATCH_STATS: correct / n}

    def rules(self, params: dict[str, Any], sequences: list[str]) -> dict[tuple[str, str], Rule]:
        """The verdict rules, fixed before the run by the params: ``{("speed" | "accuracy", sequence): Rule}``."""
        target, min_speedup = params.get("target_accuracy", 0.85), params.get("min_speedup", 1.5)
        margin = params.get("margin_points", 1.0)
        rules: dict[tuple[str, str], Rule] = {}
        for seq in sequences:
            rules[("speed", seq)] = Rule(
                "C11", f"speed-up to {target:.0%} test accuracy, steps LSTM / steps BN-LSTM ({seq}, geometric mean)",
                expected=f"the BN-LSTM reaches {target:.0%} test accuracy in at least {min_speedup:g}x fewer steps "
                         f"than the LSTM (95% CI above 1x)",
                null=1.0, target=min_speedup, equivalence=0.1, log=True,
                published="BN-LSTM converges faster (Cooijmans et al. 2016; no number of steps given)",
                label=f"speed-up, {seq}")
            rules[("accuracy", seq)] = Rule(
                "C11", f"final test accuracy, BN-LSTM - LSTM ({seq}), percentage points",
                expected=f"the BN-LSTM ends no more than {margin:g} point(s) below the LSTM (95% CI of the "
                         f"difference above -{margin:g})",
                null=-margin, unit=" pts", digits=2,
                published="99.0% vs 98.9% (MNIST), 95.4% vs 90.2% (permuted), pixel by pixel",
                label=f"final accuracy BN - LSTM, {seq}")
        return rules

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        target = params.get("target_accuracy", 0.85)
        margin = params.get("margin_points", 1.0)
        budget = config["train"]["steps"]
        jobs, arms, sequences, seeds = grid_inputs(rows, config, AXIS)
        rules = self.rules(params, sequences)

        acc: dict[tuple[str, str], dict[int, float]] = {}
        reach: dict[tuple[str, str], dict[int, int | None]] = {}
        per_step: dict[tuple[str, str], list[float]] = {}
        notes: list[str] = []
        for seq in sequences:
            for arm in arms:
                acc[(seq, arm)], reach[(seq, arm)], per_step[(seq, arm)] = {}, {}, []
                for s in seeds:
                    job = job_rows(jobs, config, arm, s, model__sequence=seq)
                    if not job:
                        continue
                    if diverged(job):
                        notes.append(f"{seq}, arm {arm!r}, seed {s} diverged (loss NaN/inf) at step {job[-1]['step']}; "
                                     f"its final accuracy is that of its last evaluation.")
                    if (a := final(job, "test_acc")) is not None:
                        acc[(seq, arm)][s] = a
                    reach[(seq, arm)][s] = steps_to(job, "test_acc", target)
                    last = max(job, key=lambda r: r["step"])
                    if last["step"] > 0 and last.get("wall_time"):
                        per_step[(seq, arm)].append(last["wall_time"] / last["step"])

        table: list[list[str]] = []
        speed_parts: list[Finding] = []
        acc_parts: list[Finding] = []
        for seq in sequences:
            for arm in arms:
                accs = list(acc[(seq, arm)].values())
                reached = [v for v in reach[(seq, arm)].values() if v is not None]
                acc_text = "n/a"
                if accs:
                    m, lo, hi = mean_ci(accs, bounds=(0.0, 1.0))
                    acc_text = f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
                speed_text, diff_text = "", ""
                if arm != "none" and "none" in arms:
                    ratios, lower, upper, _ = speedups(reach[(seq, "none")], reach[(seq, arm)], budget)
                    if ratios:
                        gm, lo, hi = geometric_mean_ci(ratios)
                        speed_text = (("at least " if lower and not upper else "")
                                      + f"{gm:.2f}x [{lo:.2f}, {hi:.2f}]")
                    diffs = self._diffs(acc, seq, arm, seeds)
                    diff_text = _pts(*mean_ci(diffs, bounds=(-100.0, 100.0))) if diffs else "n/a"
                table.append([seq, arm, f"{len(reached)}/{len(reach[(seq, arm)])}",
                              f"{sum(reached) / len(reached):.0f}" if reached else f"never (>{budget})",
                              acc_text, speed_text, diff_text])
                for s, v in reach[(seq, arm)].items():
                    if v is None:
                        notes.append(f"{seq}, arm {arm!r}, seed {s} never reached {target:.0%} in {budget} steps"
                                     + ("; it counts at the step budget, so that seed's speed-up is a lower bound."
                                        if arm == "none" else
                                        "; it counts at the step budget, so that seed's speed-up over the LSTM is "
                                        "an upper bound (it flatters this arm)."))

            speed_parts.append(self._speed_finding(rules[("speed", seq)], reach, seq, budget, notes))
            diffs = self._diffs(acc, seq, "batch", seeds)
            if diffs:
                acc_parts.append(rules[("accuracy", seq)].decide(*mean_ci(diffs, bounds=(-100.0, 100.0)),
                                                                  n=len(diffs)))
            else:
                acc_parts.append(rules[("accuracy", seq)].decide(None, None, None, n=0,
                                                                  note="no seed has both the LSTM and the BN-LSTM"))
        min_speedup = params.get("min_speedup", 1.5)
        speed = combine("C11", speed_parts,
                        statistic=f"speed-up to {target:.0%} test accuracy, steps LSTM / steps BN-LSTM ("
                                  + ", ".join(sequences) + ")",
                        expected=f"the BN-LSTM reaches {target:.0%} in at least {min_speedup:g}x fewer steps than the "
                                 f"LSTM (95% CI above 1x), for " + " and ".join(sequences),
                        published="BN-LSTM converges faster (Cooijmans et al. 2016)")
        accuracy = combine("C11", acc_parts,
                           statistic="final test accuracy, BN-LSTM - LSTM (" + ", ".join(sequences) + "), points",
                           expected=f"the BN-LSTM ends no more than {margin:g} point(s) below the LSTM, for "
                                    + " and ".join(sequences),
                           published="99.0% vs 98.9% (MNIST), 95.4% vs 90.2% (permuted)")
        for seq, sp, ap in zip(sequences, speed_parts, acc_parts):
            table.append([seq, "BN-LSTM vs LSTM", "", "", "", f"{sp.text} ({sp.verdict})", f"{ap.text} ({ap.verdict})"])

        speed_words = []
        for seq, p in zip(sequences, speed_parts):
            bn_reach = reach.get((seq, "batch"), {})
            if bn_reach and all(v is None for v in bn_reach.values()):
                # No speed-up for an arm that never got there: say so instead of a ratio.
                plain = [v for v in reach.get((seq, "none"), {}).values() if v is not None]
                speed_words.append(f"never ({seq}: no seed in {budget} steps; the LSTM reached it in "
                                   f"{len(plain)}/{len(reach.get((seq, 'none'), {}))} seeds)")
            else:
                speed_words.append(f"{p.text} fewer steps than the LSTM ({seq})")
        measured = any(p.estimate is not None for p in speed_parts)
        headline = (f"C11 {combine('C11', [speed, accuracy]).verdict}: the BN-LSTM reached {target:.0%} test accuracy "
                    + "; ".join(speed_words) + (" (geometric mean over seeds, 95% CI)" if measured else "")
                    + "; final accuracy BN-LSTM - LSTM: "
                    + "; ".join(f"{p.text} ({seq})" for seq, p in zip(sequences, acc_parts)) + ".")
        notes += self._figure_notes(sequences, arms, acc, reach, target)
        notes += self._loss_notes(jobs, config, sequences, arms, seeds)
        notes += self._batch_stats_notes(jobs, config, sequences, seeds)
        notes += self._other_targets(jobs, config, sequences, arms, seeds, params.get("other_targets", []), budget)
        notes += self._layer_notes(sequences, arms, acc, reach, seeds, budget)
        times = [f"{seq} {arm} {1000 * sum(v) / len(v):.1f} ms" for seq in sequences for arm in arms
                 if (v := per_step[(seq, arm)])]
        if times:
            notes.append("Wall time per training step (mean over seeds, evaluations excluded): " + ", ".join(times)
                         + ". The plain arm runs torch's fused nn.LSTM, the normalized ones a Python loop over steps, "
                           "so time per step compares implementations as much as norms; the verdict counts steps.")
        short = [seq for seq, f in zip(sequences, speed_parts) if f.verdict != "supported"]
        if short:
            notes.append(f"Why the speed-up may differ from the paper's ({', '.join(short)}): the paper's largest gain "
                         "(permuted, 784 steps of one pixel) is where information and gradients must cross hundreds of "
                         "steps, and Cooijmans et al. attribute part of it to better gradient flow through time (their "
                         "study of the BN gain's initialization); over 28 steps a plain LSTM with its forget gate open "
                         "at the start has little such trouble. Per-step statistics also need every step's input to "
                         "vary across the batch, which steps that see blank image rows hardly do.")
        notes.append("Scale: this reads 28 steps of 28 pixels, not the paper's 784 steps of one pixel, on 4,000 "
                     "training digits, with Adam (the paper: RMSProp, 60,000 digits). With 28 steps the permuted "
                     "variant scrambles the spatial layout but does not ask the LSTM to carry information across "
                     "hundreds of steps, which is where the paper's permuted gap (95.4% vs 90.2%) comes from; a "
                     "smaller gap here would not contradict it.")
        notes.append(f"The rules were declared before the run: a speed-up of at least {min_speedup:g}x with its CI above "
                     f"1x (a CI inside 0.91x..1.1x counts as no speed-up), and a final-accuracy difference whose CI "
                     f"lies above -{margin:g} point(s). A CI that straddles a bound is inconclusive: more seeds "
                     f"(--seeds) narrow it.")
        return Summary.of_findings(
            self, [speed, accuracy], headline=headline,
            columns=["sequence", "arm", f"seeds reaching {target:.0%}", f"steps to {target:.0%} (mean)",
                     "final test accuracy [95% CI]", "speed-up vs LSTM (steps none / arm)",
                     "final accuracy vs LSTM (pts)"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    @staticmethod
    def _diffs(acc: dict[tuple[str, str], dict[int, float]], seq: str, arm: str, seeds: list[int]) -> list[float]:
        """Per seed with both arms: 100 * (final accuracy of ``arm`` - of ``none``), in points."""
        mine, plain = acc.get((seq, arm), {}), acc.get((seq, "none"), {})
        return [100 * (mine[s] - plain[s]) for s in seeds if s in mine and s in plain]

    @staticmethod
    def _speed_finding(rule: Rule, reach: dict[tuple[str, str], dict[int, int | None]], seq: str, budget: int,
                       notes: list[str]) -> Finding:
        if (seq, "none") not in reach or (seq, "batch") not in reach:
            return rule.decide(None, None, None, n=0, note="the run lacks the 'none' or the 'batch' arm")
        ratios, lower, upper, dropped = speedups(reach[(seq, "none")], reach[(seq, "batch")], budget)
        if dropped:
            notes.append(f"{seq}: neither the LSTM nor the BN-LSTM reached the target in seed(s) "
                         f"{', '.join(map(str, dropped))}; those seeds have no speed-up.")
        if not ratios:
            return rule.decide(None, None, None, n=0, note="no seed where either arm reached the target")
        if lower and upper:
            notes.append(f"{seq}: the speed-up mixes lower bounds (seeds {', '.join(map(str, lower))}: the LSTM never "
                         f"got there) and upper bounds (seeds {', '.join(map(str, upper))}: the BN-LSTM never did); "
                         f"it is neither bound.")
        return rule.decide(*geometric_mean_ci(ratios), n=len(ratios), lower_bound=bool(lower) and not upper)

    @staticmethod
    def _figure_notes(sequences, arms, acc, reach, target) -> list[str]:
        """What the accuracy-against-steps panels show, in words."""
        notes = []
        for seq in sequences:
            means = {arm: sum(v.values()) / len(v) for arm in arms if (v := acc.get((seq, arm)))}
            firsts = {arm: (sum(r) / len(r), len(r), len(reach[(seq, arm)])) for arm in arms
                      if (r := [v for v in reach.get((seq, arm), {}).values() if v is not None])}
            if not means:
                continue
            order = sorted(means, key=means.get, reverse=True)
            text = (f"Test accuracy against steps ({seq} panel): the lines end at " + ", ".join(
                f"{a} {means[a]:.3f}" for a in order))
            if firsts:
                text += (f"; they first cross {target:.0%} at step (mean over the seeds that did) "
                         + ", ".join(f"{a} {firsts[a][0]:.0f}" + (f" ({firsts[a][1]}/{firsts[a][2]} seeds)"
                                                                  if firsts[a][1] < firsts[a][2] else "")
                                     for a in sorted(firsts, key=lambda a: firsts[a][0])))
            never = [a for a in arms if a in means and a not in firsts]
            if never:
                text += f"; never reached {target:.0%}: " + ", ".join(never)
            notes.append(text + ".")
        return notes

    @staticmethod
    def _loss_notes(jobs, config, sequences, arms, seeds) -> list[str]:
        """What the training-loss panels show at their end, in words."""
        notes = []
        for seq in sequences:
            ends = {}
            for arm in arms:
                losses = [v for s in seeds if (job := job_rows(jobs, config, arm, s, model__sequence=seq))
                          and (v := final(job, "train_loss")) is not None]
                if losses:
                    ends[arm] = sum(losses) / len(losses)
            if ends:
                notes.append(f"Training loss ({seq} panel): the lines end at " + ", ".join(
                    f"{a} {ends[a]:.3f}" for a in sorted(ends, key=ends.get)) + " (mean cross-entropy over the last "
                    "evaluation interval, mean over seeds).")
        return notes

    @staticmethod
    def _batch_stats_notes(jobs, config, sequences, seeds) -> list[str]:
        """The BN-LSTM's final accuracy with running vs batch statistics (the third figure), in words."""
        notes = []
        for seq in sequences:
            pairs = [(a, b) for s in seeds if (job := job_rows(jobs, config, "batch", s, model__sequence=seq))
                     and (a := final(job, "test_acc")) is not None and (b := final(job, BATCH_STATS)) is not None]
            if not pairs:
                continue
            running = sum(a for a, _ in pairs) / len(pairs)
            batch = sum(b for _, b in pairs) / len(pairs)
            text = (f"BN-LSTM, {seq}: final test accuracy {running:.3f} with its running statistics and {batch:.3f} "
                    f"with each test batch's own statistics (third figure; mean of {len(pairs)} seeds)")
            if batch - running > 0.05:
                text += (f": the running statistics cost {100 * (batch - running):.1f} points, batch norm's "
                         "train/inference discrepancy. A likely reason: where few inputs vary at a step (the top and "
                         "bottom rows of a digit are blank in most images), that step's batch statistics come from a "
                         "handful of pixels and swing from batch to batch; a batch of N bounds a normalized value by "
                         "sqrt(N - 1) while the running statistics do not, and the recurrence carries the mismatch "
                         "into every later step. In a permuted order every step mixes pixels from the whole image")
            else:
                text += ": the running statistics cost little here"
            notes.append(text + ".")
        return notes

    @staticmethod
    def _other_targets(jobs, config, sequences, arms, seeds, targets, budget) -> list[str]:
        if "none" not in arms or "batch" not in arms:
            return []
        parts = []
        for other in targets:
            for seq in sequences:
                reach = {arm: {s: steps_to(j, "test_acc", other) for s in seeds
                               if (j := job_rows(jobs, config, arm, s, model__sequence=seq))}
                         for arm in ("none", "batch")}
                ratios, lower, upper, _ = speedups(reach["none"], reach["batch"], budget)
                if ratios:
                    bound = " (lower bound)" if lower and not upper else ""
                    parts.append(f"{other:.0%} {seq}: {geometric_mean_ci(ratios)[0]:.2f}x{bound}")
        if not parts:
            return []
        return ["Speed-up LSTM / BN-LSTM at other targets (geometric mean over seeds, no verdict): "
                + ", ".join(parts) + "."]

    def _layer_notes(self, sequences, arms, acc, reach, seeds, budget) -> list[str]:
        if "layer" not in arms or "none" not in arms:
            return []
        parts = []
        for seq in sequences:
            ratios, lower, upper, _ = speedups(reach[(seq, "none")], reach[(seq, "layer")], budget)
            diffs = self._diffs(acc, seq, "layer", seeds)
            text = f"{seq}: "
            if ratios:
                gm, lo, hi = geometric_mean_ci(ratios)
                text += (("at least " if lower and not upper else "") + f"{gm:.2f}x [{lo:.2f}, {hi:.2f}] fewer steps")
            else:
                text += "no speed-up measured"
            if len(diffs) >= 2:
                text += f", final accuracy {_pts(*mean_ci(diffs, bounds=(-100.0, 100.0)))} pts"
            parts.append(text)
        bn_vs_ln = []
        for seq in sequences:
            bn, ln = acc.get((seq, "batch"), {}), acc.get((seq, "layer"), {})
            d = [100 * (bn[s] - ln[s]) for s in seeds if s in bn and s in ln]
            if len(d) >= 2:
                bn_vs_ln.append(f"{seq} {_pts(*mean_ci(d, bounds=(-100.0, 100.0)))} pts")
        return ["LN-LSTM vs LSTM (extra arm, no verdict; 95% CI over seeds): " + "; ".join(parts) + "."
                + (" Final accuracy BN-LSTM - LN-LSTM: " + "; ".join(bn_vs_ln) + "." if bn_vs_ln else "")]


register(SeqMnist())
