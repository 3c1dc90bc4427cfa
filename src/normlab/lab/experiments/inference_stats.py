"""Inference statistics: batch-mate dependence (C8, C12) and running averages vs population statistics (C8).

Claim C8: at inference batch norm normalizes with moving averages, so a prediction does not
depend on the rest of the batch. Claim C12: group, layer and instance norm compute their
statistics per example, so they never depend on the batch. Wu & Johnson 2021 ("Rethinking
'Batch' in BatchNorm", Sec. 3) add the caveat this experiment also measures: the exponential
moving average (EMA) a batch norm keeps lags behind the weights it was collected under, and
"precise" population statistics, recomputed at the final weights, close that gap.

Setup: a small ReLU CNN (``model.kind="cnn"``, every hidden block ``conv -> norm -> ReLU``) on
the embedded MNIST subset, SGD with momentum, with batch ("batch"), group ("group"), layer
("layer", one group) and instance ("instance") norm; a grid over the training batch size
(small, large). The learning rate follows the linear scaling rule of Goyal et al. 2017, the
setting of Wu & Johnson's large-batch runs, and every batch size sees as many training
examples, with as many evaluations (:attr:`InferenceStats.derived`)::

    train.lr = base_lr x batch_size / base_batch
    train.steps = examples // batch_size,   train.eval_every = steps // evaluations

Arms of one seed share initial weights and batches.

(a) Batch-mate dependence, at every evaluation (:func:`batch_mate_dependence`). ``P`` fixed
probe examples (the first of the test split) are run in two batches of the training batch
size, once with batch-mates ``A`` and once with batch-mates ``B`` (disjoint draws from the rest
of the test split, fixed generator, the same for every arm, seed and evaluation)::

    dependence = max_{i<P, k} |f_k(x_i; A) - f_k(x_i; B)| / RMS_{i<P, k} f_k(x_i; A)

the largest change of a probe logit, relative to the probes' RMS logit. It is measured in eval
mode (the model as the trainer evaluates it) and in training mode (a copy whose norms are put
in training mode; every other module stays in eval mode, so dropout cannot add a change of its
own).

(b) Running averages vs population statistics (batch-norm arms only), at every evaluation:

* the test accuracy with the EMA of the batch statistics at each momentum of
  ``params.momenta`` (torch's convention: the weight of the newest batch; Wu & Johnson's
  lambda is 1 - momentum). A batch norm's running statistics never enter a training step (it
  normalizes with the batch's own statistics), so the momentum does not change the weights: one
  run serves every momentum. A probe (:meth:`InferenceStats.probes`) keeps, beside the model's
  own running statistics, an EMA per momentum of every batch norm's batch mean and unbiased
  variance, updated at every training step by torch's rule
  ``ema <- (1 - momentum) ema + momentum * batch statistic`` from torch's initial values (mean
  0, variance 1), i.e. exactly what the network would hold had it been built with that
  momentum. The EMA at the model's own momentum (0.1) is checked against its running
  statistics at every evaluation (``ema_check``, the largest relative difference);
* the test accuracy after :func:`normlab.surgery.recalibrate_bn` with ``params.recal_examples``
  training examples in batches of the training batch size (fixed generator): the exact
  population statistics at the current weights (Wu & Johnson's PreciseBN);
* ``gain_m{momentum} = recalibrated accuracy - EMA accuracy``.

Recorded values (``row["probes"]``): ``dep_eval``, ``dep_train`` (every arm); ``recal_acc``,
``ema_acc_m{m}``, ``gain_m{m}``, ``ema_check`` (batch-norm arms, after the first training step;
a job resumed from a checkpoint has no EMA values after the resume: they cannot be rebuilt).

Rules (declared in :meth:`InferenceStats.rules`; seeds are the unit, 95% t-intervals):

* C8 (a), eval mode: per seed the largest eval-mode dependence of batch norm over every batch
  size and evaluation; expected within ``tolerance`` (relative 1e-5, float32 precision: its unit
  roundoff is 6e-8, and a per-example reduction over the few hundred values of a channel or
  group, summed in another order, differs by at most ~1e-6 relative; a training-mode change
  is the sampling error of the batch statistics, ~1/sqrt(values per channel), over 1e-3 even
  at batch 128).
* C8 (a), training mode: per seed the smallest training-mode dependence of batch norm over
  every batch size and evaluation; expected above ``tolerance``.
* C8 (b), recalibrated >= EMA: per batch size and momentum, per seed the final ``gain``.
  Non-inferiority: supported when the 95% CI lies above ``-noninferiority_margin`` (half an
  accuracy point) and the estimate is >= 0; mixed when the CI clears the margin but the
  estimate is below 0; not supported when the CI lies wholly below the margin. Wu & Johnson
  find PreciseBN more accurate and steadier than the EMA (Sec. 3), so recalibration costing
  more than half a point would contradict them. The cells are combined.
* C8 (b), the EMA lags: at the slowest momentum (the smallest of ``params.momenta``: the longest
  memory, hence the largest lag), per batch size the final gain; expected above 0 (95% CI),
  a CI within +-``lag_band`` (0.2 points, 2 test digits) being no lag worth the name. Combined
  over batch sizes.
* C12: per batch-independent norm (group, layer, instance), per seed the largest dependence
  over both modes, every batch size and evaluation; expected within ``tolerance``. Combined.

Quick form: widths [8, 16, 16], batch sizes 16 and 128, 25,600 training examples (1,600 and 200
steps), 8 evaluations after step 0, 3 seeds. Full form: widths [16, 32, 32], batch sizes 16 and
256, 102,400 examples (6,400 and 400 steps), 16 evaluations, 5 seeds. Both: base rate 0.4 at
batch 128, SGD momentum 0.9, He initialization, momenta 0.01, 0.1 and 0.5, 2,048 examples to
recalibrate with. (At these widths the lab's "group" arm has one channel per group, the
registry's default for at most 32 channels; see the notes.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import torch
from torch import nn

from ...surgery import recalibrate_bn
from ..config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import mean_ci
from ..rows import final, group_jobs, value
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Probe, Summary
from . import _inference_notes as _notes
from .registry import register
from ..batchmates import (SHADOWS, ShadowEMA, accuracy, batch_mate_dependence, mate_batches,  # noqa: F401
                          momentum_key, norms_in_training_mode, recalibration_batches, with_running_stats)

__all__ = ["InferenceStats", "batch_mate_dependence", "norms_in_training_mode"]

AXIS = "train.batch_size"
BATCH_ARM = "batch"
INDEPENDENT = ("group", "layer", "instance")
FIGURE_MOMENTA = (0.01, 0.1, 0.5)  # the default params.momenta; the gain figures draw these

PUBLISHED = [
    "Ioffe & Szegedy 2015, Sec. 3.1: at inference the normalization uses population statistics, so "
    "'the output depends only on the input, deterministically'.",
    "Wu & Johnson 2021 ('Rethinking \"Batch\" in BatchNorm', Sec. 3; ResNet-50, ImageNet): during "
    "training the EMA's validation accuracy is lower and far more variable than PreciseBN's (population "
    "statistics recomputed at the current weights from 10^3-10^4 samples); the gap is largest with large "
    "batches (batch 8192, linearly scaled learning rate) and with a long EMA memory; at the end of a standard "
    "schedule, where the learning rate has decayed, the two are close.",
    "Ba et al. 2016 (layer norm), Ulyanov et al. 2016 (instance norm), Wu & He 2018 (group norm): statistics "
    "per example, the same computation in training and at inference, no dependence on the batch.",
]

def _combined(claim: str, rule: Rule, parts: list[Finding], why: str) -> Finding:
    """One finding for ``rule`` over its parts (cells, batch sizes, norms), labelled as the rule."""
    if not parts:
        return rule.decide(None, None, None, n=0, note=why)
    out = combine(claim, parts, statistic=rule.statistic, expected=rule.expected, published=rule.published)
    out.label = rule.label
    return out


class InferenceStats(Experiment):
    name = "inference-stats"
    claim = ("C8: at inference batch norm uses running statistics, so a prediction does not depend on the "
             "batch (and precise statistics close the EMA's lag); C12: group, layer and instance norm never "
             "depend on the batch")
    title = "Inference statistics: batch-mate dependence, and running averages vs population statistics"
    description = ("ReLU CNN with BN/GN/LN/IN at small and large batch: change of an example's output when its "
                   "batch-mates change (eval vs training mode); EMA at several momenta vs recalibrated statistics")
    claims = ("C8", "C12")
    derived = {
        "train.lr": "params.base_lr x train.batch_size / params.base_batch (linear scaling, Goyal et al. 2017)",
        "train.steps": "params.examples / train.batch_size (every batch size sees as many examples)",
        "train.eval_every": "train.steps / params.evaluations (as many evaluations at every batch size)",
    }
    figures = (
        FigureSpec(
            kind="grid", metric="dep_train", axis=AXIS, reduce="final", logx=True,
            title="Batch-mate dependence in training mode (final network)",
            ylabel="largest change of a probe logit / RMS logit",
            caption="Change of the probe examples' outputs when all their batch-mates are replaced, with the norms in "
                    "training mode, at the last evaluation. Mean over seeds; the band spans the seeds' minimum to "
                    "maximum.",
        ),
        FigureSpec(
            kind="grid", metric="dep_eval", axis=AXIS, reduce="best", logx=True,
            title="Batch-mate dependence in eval mode (largest over training)",
            ylabel="largest change of a probe logit / RMS logit",
            caption="The same change in eval mode (as the trainer evaluates), the largest over every evaluation. "
                    "Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        *(FigureSpec(
            kind="curve", metric=f"gain_{momentum_key(m)}", panel=AXIS,
            title=f"Recalibrated minus running-average test accuracy, EMA momentum {m:g}",
            ylabel="accuracy difference (fraction)",
            caption=f"Batch norm only: test accuracy after recalibrate_bn (population statistics at the current "
                    f"weights) minus test accuracy with the EMA of momentum {m:g} (torch's convention; "
                    f"{'as the model keeps it' if m == 0.1 else 'kept beside the model'}), one panel "
                    f"per batch size. "
                    f"Mean over seeds; the band spans the seeds' minimum to maximum.",
        ) for m in FIGURE_MOMENTA),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # A CNN: instance norm needs spatial positions. He initialization for the ReLUs.
            model=ModelConfig(kind="cnn", widths=[16, 32, 32], activation="relu", init_gain=2 ** 0.5),
            # batch_size, lr, steps and eval_every are set per job (grid and job_config).
            train=TrainConfig(steps=3200, batch_size=32, optimizer="sgd", momentum=0.9, lr=0.1, seeds=5,
                              eval_every=200, checkpoint_every=1000),
            arms={norm: {"model.norm": norm} for norm in (BATCH_ARM, *INDEPENDENT)},
            grid={AXIS: [16, 256]},
            params={
                # train.lr = base_lr x batch / base_batch (Goyal et al.'s linear scaling rule; 0.4 gave
                # batch norm its lowest training loss at both quick batch sizes among 0.1, 0.2, 0.4, 0.8),
                # for `examples` training examples (25.6 epochs of the 4,000 training digits), with
                # `evaluations` evaluations after step 0.
                "base_lr": 0.4, "base_batch": 128, "examples": 102400, "evaluations": 16,
                "tolerance": 1e-5, "probe_examples": 4, "mates_seed": 0,
                "momenta": list(FIGURE_MOMENTA), "recal_examples": 2048, "recal_seed": 0,
                "noninferiority_margin": 0.005, "lag_band": 0.002,
            },
        )

    def quick_config(self) -> ExperimentConfig:
        config = apply_overrides(self.default_config(), {
            "model.widths": [8, 16, 16], "train.steps": 800, "train.seeds": 3, "train.eval_every": 100,
            "train.checkpoint_every": 1000, "params.examples": 25600, "params.evaluations": 8,
        }, parse=False)
        config.grid = {AXIS: [16, 128]}
        return config

    def job_config(self, config: ExperimentConfig) -> ExperimentConfig:
        """The job's learning rate (linear scaling rule), steps (as many examples at every batch size)
        and evaluation interval (as many evaluations); checks the params it measures with.

        Raises:
            ConfigError: a batch size below 2 (no batch-mates), or a param out of its range.
        """
        p = config.params
        if config.train.batch_size < 2:
            raise ConfigError(f"inference-stats needs train.batch_size >= 2 (an example needs batch-mates to "
                              f"replace), got {config.train.batch_size}.")
        momenta = p.get("momenta")
        if not isinstance(momenta, list) or not momenta or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m <= 1 for m in momenta):
            raise ConfigError(f"params.momenta must be a non-empty list of EMA momenta in (0, 1] (torch's "
                              f"convention: the weight of the newest batch), got {momenta!r}.")
        for key in ("base_lr", "base_batch", "examples", "evaluations", "tolerance", "probe_examples",
                    "recal_examples"):
            if not p.get(key, 0) > 0:
                raise ConfigError(f"params.{key} must be > 0, got {p.get(key)!r}.")
        lr, steps, every = _notes.schedule(p, config.train.batch_size)
        return apply_overrides(config, {"train.lr": lr, "train.steps": steps, "train.eval_every": every}, parse=False)

    def probes(self, config: ExperimentConfig, arm: str) -> list[Probe]:
        momenta = [float(m) for m in config.params.get("momenta", FIGURE_MOMENTA)]

        def attach(model: nn.Module):
            shadow = ShadowEMA(model, momenta)
            SHADOWS[model] = shadow

            def remove() -> None:
                shadow.remove()
                SHADOWS.pop(model, None)

            return (lambda: {}), remove  # the values come from measurements(), which has the data

        return [Probe("ema", attach)]

    def measurements(self, model: nn.Module, data: Any, config: ExperimentConfig, arm: str) -> dict[str, float]:
        params = config.params
        batch = config.train.batch_size
        probes, mates_a, mates_b = mate_batches(data, batch, params)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return {}  # a diverged network (the trainer's last row says so): nothing to measure
        out = {"dep_eval": batch_mate_dependence(model, probes, mates_a, mates_b)}
        trained = norms_in_training_mode(copy.deepcopy(model))
        out["dep_train"] = batch_mate_dependence(trained, probes, mates_a, mates_b)
        del trained
        if not with_running_stats(model):
            return out
        recal = recalibrate_bn(model, recalibration_batches(data, batch, params))
        out["recal_acc"] = accuracy(recal, data.x_test, data.y_test)
        shadow = SHADOWS.get(model)
        # Before the first training step the EMAs are torch's initial values, not an average of anything.
        if shadow is not None and shadow.valid and shadow.updates > 0 and shadow.norms:
            out["ema_check"] = shadow.check(model)
            ema_model = recal  # any copy of the model will do: its running statistics are overwritten
            for m in [float(v) for v in params["momenta"]]:
                shadow.load(ema_model, m)
                acc = accuracy(ema_model, data.x_test, data.y_test)
                out[f"ema_acc_{momentum_key(m)}"] = acc
                out[f"gain_{momentum_key(m)}"] = out["recal_acc"] - acc
        return out

    # ------------------------------------------------------------------------------------------
    # Verdicts

    def rules(self, params: dict[str, Any]) -> dict[str, Rule]:
        """The verdict rules, fixed before the run by the config's params: ``eval`` and ``train``
        (C8 a), ``noninferior`` (C8 b, per cell), ``lag`` (C8 b, per batch size), ``independent``
        (C12, per norm). Dependences are in percent of the RMS logit, accuracies in points."""
        tol = 100 * float(params.get("tolerance", 1e-5))
        margin = 100 * float(params.get("noninferiority_margin", 0.005))
        band = 100 * float(params.get("lag_band", 0.002))
        slow = min(float(m) for m in params.get("momenta", FIGURE_MOMENTA))
        return {
            "eval": Rule(
                "C8", "batch norm in eval mode: largest change of an example's output when its batch-mates are "
                      "replaced (% of the RMS output; every batch size and evaluation)",
                expected=f"eval-mode batch norm does not depend on the batch: the change is zero to float precision "
                         f"(95% CI within +-{tol:g}%)",
                null=0.0, direction="equivalent", equivalence=tol, unit="%", digits=4,
                published="Ioffe & Szegedy 2015, Sec. 3.1: the output depends only on the input",
                label="BN eval-mode dependence"),
            "train": Rule(
                "C8", "batch norm in training mode: smallest change of an example's output when its batch-mates are "
                      "replaced (% of the RMS output; every batch size and evaluation)",
                expected=f"training-mode batch norm depends on the batch: the change exceeds float precision "
                         f"({tol:g}%; 95% CI above it)",
                null=tol, direction="greater", unit="%", digits=4,
                published="batch statistics: the output depends on the batch-mates", label="BN training-mode dependence"),
            "noninferior": Rule(
                "C8", "Wu & Johnson 2021: final test accuracy with recalibrated (population) statistics minus with the "
                      "EMA (accuracy points)",
                expected=f"recalibrated statistics are at least as accurate as the EMA at every momentum and batch "
                         f"size (estimate >= 0, 95% CI above -{margin:g} points)",
                null=-margin, direction="greater", target=0.0, unit=" points", digits=2,
                published="Wu & Johnson 2021, Sec. 3: PreciseBN more accurate and steadier than the EMA",
                label="recalibrated - EMA"),
            "lag": Rule(
                "C8", f"Wu & Johnson 2021: the EMA lags the weights: final test accuracy recalibrated minus EMA at the "
                      f"slowest momentum {slow:g} (accuracy points)",
                expected=f"with the longest EMA memory (momentum {slow:g}) recalibration gains accuracy (95% CI above "
                         f"0; within +-{band:g} points is no gain worth the name)",
                null=0.0, direction="greater", equivalence=band, unit=" points", digits=2,
                published="Wu & Johnson 2021, Sec. 3: EMA below PreciseBN during training, most with large batches",
                label=f"EMA lag at momentum {slow:g}"),
            "independent": Rule(
                "C12", "group / layer / instance norm: largest change of an example's output when its batch-mates are "
                       "replaced (% of the RMS output; both modes, every batch size and evaluation)",
                expected=f"batch-independent norms do not depend on the batch in either mode (95% CI within "
                         f"+-{tol:g}%)",
                null=0.0, direction="equivalent", equivalence=tol, unit="%", digits=4,
                published="Ba et al. 2016; Ulyanov et al. 2016; Wu & He 2018: statistics per example",
                label="GN/LN/IN dependence"),
        }

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        rules = self.rules(params)
        tol = float(params.get("tolerance", 1e-5))
        momenta = [float(m) for m in params.get("momenta", FIGURE_MOMENTA)]
        slow = min(momenta) if momenta else None
        rows = list(rows)
        grid = config.get("grid", {}) or {}
        if set(grid) - {AXIS}:
            raise ValueError(f"inference-stats summarizes runs over the grid axis {AXIS!r} only, got the axes "
                             f"{sorted(grid)}; run other settings as separate runs (normlab run ... --set KEY=VALUE).")
        default_size = config.get("train", {}).get("batch_size")
        by_job: dict[tuple[str, Any, Any], list[dict[str, Any]]] = {}
        for j, job_rows in group_jobs(rows).items():
            by_job[(j.arm, dict(j.point).get(AXIS, default_size), j.seed)] = job_rows
        arms = [a for a in (config.get("arms") or {})] or sorted({a for a, _, _ in by_job})
        arm_norm = {a: ((config.get("arms") or {}).get(a) or {}).get("model.norm", a) for a in arms}
        sizes = list(grid.get(AXIS) or sorted({size for _, size, _ in by_job}))
        seeds = sorted({s for _, _, s in by_job})

        def job(arm: str, size: Any, seed: Any) -> list[dict[str, Any]]:
            return by_job.get((arm, size, seed), [])

        def values(job_rows: list[dict[str, Any]], key: str) -> list[float]:
            return [v for v in (value(r, key) for r in job_rows) if v is not None]

        def per_seed(arm_list: Sequence[str], keys: Sequence[str], reduce) -> dict[Any, float]:
            """Per seed, ``reduce`` over every job of ``arm_list`` (all batch sizes) and evaluation of ``keys``;
            a seed lacking any of those jobs' values is left out."""
            out = {}
            for s in seeds:
                vals, complete = [], True
                for a in arm_list:
                    for size in sizes:
                        got = [v for k in keys for v in values(job(a, size, s), k)]
                        complete = complete and bool(got)
                        vals += got
                if complete and vals:
                    out[s] = reduce(vals)
            return out

        bn_arms = [a for a in arms if arm_norm[a] == "batch"]
        free_arms = [a for a in arms if arm_norm[a] in INDEPENDENT]
        notes: list[str] = []
        findings: list[Finding] = []

        def decide(rule: Rule, vals: Sequence[float], scale: float, why: str) -> Finding:
            if not vals:
                return rule.decide(None, None, None, n=0, note=why)
            return rule.decide(*(scale * v for v in mean_ci(list(vals))), n=len(vals))

        # (a) C8: batch norm's dependence in eval mode (largest) and training mode (smallest).
        bn_eval = per_seed(bn_arms, ["dep_eval"], max)
        bn_train = per_seed(bn_arms, ["dep_train"], min)
        f_eval = decide(rules["eval"], list(bn_eval.values()), 100, "no batch-norm arm with batch-mate measurements")
        f_train = decide(rules["train"], list(bn_train.values()), 100, "no batch-norm arm with batch-mate measurements")
        findings += [f_eval, f_train]

        # (b) C8: recalibrated vs EMA, per batch size and momentum, at the final evaluation.
        gains: dict[tuple[Any, float], dict[Any, float]] = {}
        for size in sizes:
            for m in momenta:
                cell = {}
                for s in seeds:
                    vals = [g for a in bn_arms if (g := final(job(a, size, s), f"gain_{momentum_key(m)}")) is not None]
                    if vals and len(vals) == len(bn_arms):
                        cell[s] = fmean(vals)
                gains[(size, m)] = cell
        parts = []
        for (size, m), cell in gains.items():
            f = decide(rules["noninferior"], list(cell.values()), 100, "no final EMA values (resumed jobs or no BN arm)")
            f.label = f"batch {size}, momentum {m:g}"
            parts.append(f)
        rule = rules["noninferior"]
        findings.append(_combined("C8", rule, parts, "no batch size or momentum to compare"))
        lag_parts = []
        for size in sizes:
            cell = gains.get((size, slow), {}) if slow is not None else {}
            f = decide(rules["lag"], list(cell.values()), 100, "no final EMA values at the slowest momentum")
            f.label = f"batch {size}"
            lag_parts.append(f)
        rule = rules["lag"]
        findings.append(_combined("C8", rule, lag_parts, "no batch size"))

        # C12: batch-independent norms, both modes.
        free_parts = []
        for a in free_arms:
            vals = per_seed([a], ["dep_eval", "dep_train"], max)
            f = decide(rules["independent"], list(vals.values()), 100, f"no measurements for arm {a!r}")
            f.label = a
            free_parts.append(f)
        rule = rules["independent"]
        findings.append(_combined("C12", rule, free_parts, "no group, layer or instance arm"))

        table = self._table(arms, arm_norm, sizes, seeds, momenta, job, values, gains)
        notes += _notes.notes(self.figures, arms, bn_arms, sizes, seeds, momenta, job, values, gains, tol, config,
                              findings)
        headline = self._headline(bn_eval, bn_train, free_arms, per_seed, gains)
        return Summary.of_findings(
            self, findings, headline=headline,
            columns=["arm", "batch size", "statistics at inference", "final test accuracy [95% CI]",
                     "recalibrated minus this, points [95% CI]", "training-mode dependence (final, mean)",
                     "eval-mode dependence (largest)"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    # ------------------------------------------------------------------------------------------
    # The summary's parts

    @staticmethod
    def _table(arms, arm_norm, sizes, seeds, momenta, job, values, gains) -> list[list[str]]:
        def acc_text(vals: list[float]) -> str:
            return "{:.4f} [{:.4f}, {:.4f}]".format(*mean_ci(vals, bounds=(0.0, 1.0))) if vals else "n/a"

        table = []
        for a in arms:
            for size in sizes:
                runs = [job(a, size, s) for s in seeds if job(a, size, s)]
                if not runs:
                    continue
                dep_t = [v for r in runs if (v := final(r, "dep_train")) is not None]
                dep_e = [max(vs) for r in runs if (vs := values(r, "dep_eval"))]
                batch_norm = arm_norm[a] == "batch"
                table.append([
                    a, str(size),
                    "running averages (the model's own, momentum 0.1)" if batch_norm else "per example (none kept)",
                    acc_text([v for r in runs if (v := final(r, "test_acc")) is not None]), "",
                    f"{fmean(dep_t):.2e}" if dep_t else "n/a", f"{max(dep_e):.2e}" if dep_e else "n/a",
                ])
                if not batch_norm:
                    continue
                for m in momenta:
                    accs = [v for r in runs if (v := final(r, f"ema_acc_{momentum_key(m)}")) is not None]
                    cell = list(gains.get((size, m), {}).values())
                    table.append([a, str(size), f"EMA, momentum {m:g}", acc_text(accs),
                                  "{:+.2f} [{:+.2f}, {:+.2f}]".format(*(100 * v for v in mean_ci(cell))) if cell
                                  else "n/a", "", ""])
                table.append([a, str(size), "recalibrated (recalibrate_bn)",
                              acc_text([v for r in runs if (v := final(r, "recal_acc")) is not None]), "", "", ""])
        return table

    @staticmethod
    def _headline(bn_eval, bn_train, free_arms, per_seed, gains) -> str:
        parts = []
        def most(v: float) -> str:
            return "not at all (bitwise identical)" if v == 0 else f"by at most {v:.1e} (relative)"

        if bn_eval and bn_train:
            parts.append(f"when its batch-mates were replaced, an example's output changed {most(max(bn_eval.values()))} "
                         f"under eval-mode batch norm, and by at least {min(bn_train.values()):.1e} (relative) in "
                         f"training mode")
        free = per_seed(free_arms, ["dep_eval", "dep_train"], max) if free_arms else {}
        if free:
            parts.append(f"under group/layer/instance norm it changed {most(max(free.values()))} in either mode")
        cells = [f"{fmean(c.values()) * 100:+.2f} (batch {size}, momentum {m:g})"
                 for (size, m), c in gains.items() if c]
        if cells:
            parts.append("final accuracy recalibrated minus EMA, points: " + ", ".join(cells))
        return ("; ".join(parts) + ".") if parts else "nothing to report: no job recorded the batch-mate measurements."


register(InferenceStats())
