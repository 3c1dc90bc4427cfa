"""Weight decay with and without batch norm (claim C15), and van Laarhoven 2017's mechanism.

Claim tested: C15, batch norm makes L2 regularization (weight decay) easier to use. van Laarhoven
2017 ("L2 regularization versus batch and weight normalization") explains what decay does with
batch norm: a weight layer followed by batch norm computes the same function at any scale of its
weights ``w``, so L2 no longer limits what it can express; it only shrinks ``||w||``, and since
the gradient of a scale-invariant layer scales as ``1/||w||``, the step a weight takes relative
to its size goes as the *effective learning rate* ``lr / ||w||^2``. Larger decay -> smaller
``||w||`` -> larger effective learning rate.

Setup: a 3 x 100 ReLU MLP (He initialization, ``init_gain`` = sqrt 2), plain SGD (lr 0.1, batch
60, no momentum) on mnist-5k, with batch norm before each ReLU ("batch") and without ("none"),
at every weight decay of a log grid (``grid["train.weight_decay"]``); the decay is the
optimizer's (``torch.optim.SGD(weight_decay=...)``) on every parameter, batch norm's and the
output layer's included, as a practitioner gets it by default. Arms of one seed share their
initial weights and batches.

Statistics, per seed, then mean and 95% t-interval over seeds (Rules declared in :meth:`rules`):

* **C15, trainable width.** A decay *trains* when its final test accuracy reaches
  ``train_fraction`` (0.9) x the best mean final accuracy of the run (any arm, any decay; one bar
  for both). The width is the summed log10 cell width of the decays that train (decades;
  :func:`normlab.lab.experiments.common.trainable_range`). Statistic: width(batch) - width(none).
  Expected: at least ``min_width_gain`` (0.5 decades: batch norm tolerates a decay about 3x
  larger) with the CI above 0; a CI within +-0.25 decades is "no effect". A diverged job does
  not train.
* **van Laarhoven's mechanism.** Per job, at each evaluation, ``||W_i||`` (Frobenius norm of the
  weight of hidden layer ``i``, bias excluded) and ``lr / ||W_i||^2`` for the layers followed by
  batch norm; ``eff_lr`` is their mean over layers. Statistic: in the batch arm, ``eff_lr`` at the
  end with decay ``params["mechanism_decay"]`` (1e-2) over ``eff_lr`` with the grid's smallest
  decay, geometric mean over seeds. Expected: at least ``min_lr_gain`` (2x) with the CI above 1x.
  1e-2 is declared because ``lr * decay * steps`` is then about 1 in the quick form (the run
  lasts about one time constant of the decay); at equilibrium van Laarhoven's analysis gives
  ``||w||^2`` proportional to ``sqrt(lr / decay)``, so two decades of decay raise the effective
  rate 10x; a run shorter than equilibrium shows less, hence the lower 2x.

Reported without a rule: each arm's best decay and its accuracy, the weight norm of the plain
network (where decay does limit capacity), and the output layer's norm in both.

Published anchor: van Laarhoven 2017 (no accuracy number for this claim): with batch norm, L2
has no regularizing effect on the normalized layers; it sets their effective learning rate.

Forms: quick 8 decays 1e-4 .. 0.316 (half-decade steps), 3 seeds, 1,000 steps: about 125 s of CPU
with ``--jobs 2``; full 11 decays 1e-5 .. 1, 5 seeds, 3,000 steps. Both evaluate every 50 steps.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

from torch import nn

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from ..intervals import geometric_mean_ci, mean_ci
from ..rows import group_jobs
from ..verdicts import Rule, combine
from .base import Experiment, FigureSpec, Summary
from .common import axis_widths, censor_notes, fmt_value, log_grid
from .registry import register
from ._weight_decay_notes import curve_text, interpretation, mechanism_values

__all__ = ["WeightDecay", "weight_norms"]

AXIS = "train.weight_decay"
ARMS = ("none", "batch")
MECHANISM_DECAY = 0.01

PUBLISHED = [
    "van Laarhoven 2017, \"L2 regularization versus batch and weight normalization\": with batch norm, the "
    "function a normalized layer computes does not depend on the scale of its weights, so L2 does not regularize "
    "it; it shrinks the weights and so raises the effective learning rate lr / ||w||^2.",
    "No published accuracy figure for this claim; the lab's measurement stands alone.",
]


def weight_norms(model: nn.Module, lr: float) -> dict[str, float]:
    """Per hidden block ``i`` (1 = first): ``weight_norm_{i}`` = ``||W_i||`` (Frobenius, bias
    excluded) and, for a block with a norm after its weight layer, ``eff_lr_{i}`` = ``lr / ||W_i||^2``;
    ``weight_norm`` and ``eff_lr``: their means over blocks; ``head_weight_norm``: the output layer's.

    The layer is scale-invariant, and ``lr / ||W||^2`` its effective rate, only while the variance
    it normalizes dwarfs the norm's ``eps`` (``var + eps`` ~ ``var``): ``eff_lr_{i}`` is left out
    when the norm's mean running variance is below ``100 * eps`` (e.g. weights a large decay has
    collapsed to ~1e-12, where ``eps`` sets the scale and the ratio would read 1e20).

    >>> import torch
    >>> from normlab.lab.config import ModelConfig
    >>> from normlab.lab.models import build_model
    >>> net = build_model(ModelConfig(widths=[4], norm="batch"), (3,), 2)
    >>> with torch.no_grad():
    ...     _ = net.blocks[0].layer.weight.fill_(0.5)  # ||W|| = sqrt(12 * 0.25)
    >>> v = weight_norms(net, 0.1)
    >>> round(v["weight_norm_1"], 4), round(v["eff_lr_1"], 4)
    (1.7321, 0.0333)
    """
    out: dict[str, float] = {}
    norms, rates = [], []
    for i, block in enumerate(getattr(model, "blocks", []), start=1):
        w = float(block.layer.weight.detach().double().norm())
        out[f"weight_norm_{i}"] = w
        norms.append(w)
        norm = getattr(block, "norm", None)
        running = getattr(norm, "running_var", None)
        invariant = running is None or float(running.double().mean()) > 100 * float(getattr(norm, "eps", 0.0))
        if norm is not None and w > 0 and invariant:
            out[f"eff_lr_{i}"] = lr / w ** 2
            rates.append(out[f"eff_lr_{i}"])
    if norms:
        out["weight_norm"] = fmean(norms)
    if rates:
        out["eff_lr"] = fmean(rates)
    heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if heads:
        out["head_weight_norm"] = float(heads[-1].weight.detach().double().norm())
    return out


class WeightDecay(Experiment):
    name = "weight-decay"
    claim = "C15: batch norm makes weight decay easier to use"
    title = "Weight decay with and without batch norm, and the effective learning rate (van Laarhoven 2017)"
    description = ("3x100 ReLU MLP, SGD, over a log grid of weight decay: width of the decay range that trains, BN vs "
                   "none; weight norm and effective learning rate lr/||w||^2 of the normalized layers")
    claims = ("C15",)
    figures = (
        FigureSpec(
            kind="grid", metric="test_acc", axis=AXIS, reduce="final",
            title="Final test accuracy against the weight decay", ylabel="final test accuracy",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum. The decay applies to every "
                    "parameter (batch norm's and the output layer's included).",
        ),
        FigureSpec(
            kind="grid", metric="weight_norm", axis=AXIS, reduce="final", logy=True,
            title="Hidden layers' weight norm at the end of training", ylabel="||W|| (mean over hidden layers)",
            caption="Frobenius norm of each hidden layer's weight (bias excluded), averaged over the layers. Mean "
                    "over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="grid", metric="eff_lr", axis=AXIS, reduce="final", logy=True,
            title="Effective learning rate lr / ||W||^2 at the end of training (layers followed by batch norm)",
            ylabel="lr / ||W||^2 (mean over hidden layers)",
            caption="Only the batch-norm arm has values: without a norm after it, a layer's output depends on the "
                    "scale of its weights and lr / ||W||^2 is not its effective rate.",
        ),
        FigureSpec(
            kind="curve", metric="eff_lr", where=((AXIS, MECHANISM_DECAY),), logy=True,
            title="Effective learning rate during training, decay 0.01 (batch norm)",
            ylabel="lr / ||W||^2 (mean over hidden layers)",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="weight_norm", where=((AXIS, MECHANISM_DECAY),), logy=True,
            title="Hidden layers' weight norm during training, weight decay 0.01", ylabel="||W|| (mean over hidden layers)",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # He initialization for ReLU, as lr-sensitivity: the plain network starts well scaled, so the grid
            # tests the decay alone.
            model=ModelConfig(kind="mlp", widths=[100, 100, 100], activation="relu", init_gain=2 ** 0.5),
            train=TrainConfig(steps=3000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=50,
                              checkpoint_every=1000),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={AXIS: log_grid(-5, 0, 2)},
            params={"train_fraction": 0.9, "min_width_gain": 0.5, "width_band": 0.25,
                    "mechanism_decay": MECHANISM_DECAY, "min_lr_gain": 2.0},
        )

    def quick_config(self) -> ExperimentConfig:
        config = self.default_config()
        config.train.steps, config.train.seeds, config.train.checkpoint_every = 1000, 3, 500
        config.grid = {AXIS: log_grid(-4, -0.5, 2)}
        return config

    def measurements(self, model, data, config: ExperimentConfig, arm: str) -> dict[str, float]:
        """Weight norms of the hidden layers and, where a norm follows, ``lr / ||W||^2`` (:func:`weight_norms`)."""
        return weight_norms(model, config.train.lr)

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule]:
        """The verdict rules, fixed before the run by the config's params (both C15)."""
        frac, gain = params.get("train_fraction", 0.9), params.get("min_width_gain", 0.5)
        decay, lr_gain = params.get("mechanism_decay", MECHANISM_DECAY), params.get("min_lr_gain", 2.0)
        return (
            Rule("C15", f"width of the weight-decay range that trains, batch minus none (decades; a decay trains when "
                        f"its final test accuracy reaches {frac:.0%} of the run's best mean)",
                 expected=f"batch norm trains over a range of weight decays at least {gain:g} decades wider (95% CI "
                          f"above 0)",
                 null=0.0, direction="greater", target=gain, equivalence=params.get("width_band", 0.25),
                 unit=" decades", digits=2, published="no published number (van Laarhoven 2017: L2 acts on the "
                                                      "effective learning rate)",
                 label="range of decays that trains, BN - none"),
            Rule("C15", f"van Laarhoven 2017: effective learning rate lr / ||W||^2 of the layers followed by batch norm "
                        f"at the end, decay {decay:g} over the grid's smallest decay (geometric mean)",
                 expected=f"with batch norm a larger decay gives a larger effective learning rate: at least {lr_gain:g}x "
                          f"at decay {decay:g} (95% CI above 1x)",
                 null=1.0, direction="greater", target=lr_gain, log=True, digits=2,
                 published="van Laarhoven 2017: with BN, L2 scales the effective learning rate",
                 label=f"effective lr, decay {decay:g} / smallest"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        width_rule, lr_rule = self.rules(params)
        frac = params.get("train_fraction", 0.9)
        decay = params.get("mechanism_decay", MECHANISM_DECAY)
        steps = config["train"]["steps"]
        rows = list(rows)
        grid = config.get("grid", {}).get(AXIS) or None
        ax = axis_widths(rows, AXIS, frac, grid=grid)
        arms = [a for a in (config.get("arms") or {}) if a in ax.finals] or ax.arms
        mech = mechanism_values(group_jobs(rows), AXIS)

        table: list[list[str]] = []
        notes: list[str] = []
        for arm in arms:
            best = ax.best(arm)
            widths = ax.widths(arm)
            accs = [by[best] for by in ax.finals[arm].values() if best is not None and by.get(best) is not None]
            low_wn = mech.get((arm, min(ax.grid)), {}).get("weight_norm", [])
            table.append([
                arm, ax.range_text(arm),
                "{:.2f} [{:.2f}, {:.2f}]".format(*mean_ci(widths)) if widths else "n/a",
                fmt_value(best) if best is not None else "n/a",
                "{:.4f} [{:.4f}, {:.4f}]".format(*mean_ci(accs, bounds=(0.0, 1.0))) if accs else "n/a",
                f"{fmean(low_wn):.3g}" if low_wn else "n/a",
                (f"{fmean(v):.3g}" if (v := mech.get((arm, decay), {}).get("weight_norm")) else "n/a"),
                (f"{fmean(v):.3g}" if (v := mech.get((arm, min(ax.grid)), {}).get("eff_lr")) else "-"),
                (f"{fmean(v):.3g}" if (v := mech.get((arm, decay), {}).get("eff_lr")) else "-"),
                f"{sum(ax.diverged[arm].values())}/{len(ax.grid) * len(ax.finals[arm])}",
            ])
            notes.append(ax.accuracy_note(arm, "weight decay"))

        diffs = ax.differences("batch", "none")
        if diffs:
            width = width_rule.decide(*mean_ci(diffs), n=len(diffs), lower_bound=ax.lower_bound("batch", "none"))
            table.append(["batch - none (width)", "", width.text] + [""] * 7)
        else:
            width = width_rule.decide(None, None, None, n=0, note="the run lacks a 'none' or 'batch' arm on the grid")
        notes.extend(censor_notes(ax, "batch", "none", "weight-decay grid"))

        low = min(ax.grid) if ax.grid else None
        at_high = mech.get(("batch", decay), {}).get("eff_lr_by_seed", {})
        at_low = mech.get(("batch", low), {}).get("eff_lr_by_seed", {}) if low is not None else {}
        ratios = [at_high[s] / at_low[s] for s in sorted(set(at_high) & set(at_low)) if at_low[s] > 0]
        if ratios and decay != low:
            lr_finding = lr_rule.decide(*geometric_mean_ci(ratios), n=len(ratios))
            table.append([f"batch: eff. lr at decay {fmt_value(decay)} / at {fmt_value(low)}"] + [""] * 7
                         + [lr_finding.text, ""])
        else:
            why = (f"decay {decay:g} is not on the grid, or is its smallest" if decay not in ax.grid or decay == low
                   else "no batch-norm job recorded the effective learning rate at both decays")
            lr_finding = lr_rule.decide(None, None, None, n=0, note=why)

        notes.extend(ax.figure_note(arm, f"Figure \"{self.figures[0].title}\"") for arm in arms)
        notes.extend(interpretation(ax, mech, width, lr_finding, decay, steps, self.figures))
        jobs = group_jobs(rows)
        notes.extend(text for spec in self.figures if spec.kind == "curve"
                     if (text := curve_text(jobs, AXIS, dict(spec.where)[AXIS], spec.metric, spec.title)))
        if ax.threshold is not None:
            notes.insert(0, f"A weight decay trains when its final test accuracy reaches {ax.threshold:.3f} "
                            f"({frac:.0%} of the best mean final accuracy, {ax.best_mean:.3f}).")
        if diffs:
            headline = (f"batch norm trained over {fmean(ax.widths('batch')):.2f} decades of weight decay, no norm over "
                        f"{fmean(ax.widths('none')):.2f}: {width.text} wider (mean over {len(diffs)} seeds, 95% CI)")
            if ratios:
                headline += (f"; with batch norm, decay {fmt_value(decay)} left an effective learning rate "
                             f"{lr_finding.text} that of decay {fmt_value(low)} (van Laarhoven's mechanism)")
            headline += "."
        else:
            headline = "no width to report: the run lacks a 'none' or 'batch' arm on the weight-decay grid."
        return Summary.of_findings(
            self, [width, lr_finding], headline=headline,
            columns=["arm", "decays that train (in any seed)", "trainable width, decades [95% CI]", "best decay",
                     "final accuracy at best decay [95% CI]", "||W|| at smallest decay",
                     f"||W|| at decay {fmt_value(decay)}", "lr/||W||^2 at smallest decay",
                     f"lr/||W||^2 at decay {fmt_value(decay)}", "diverged jobs"],
            rows=table, published=PUBLISHED, notes=notes,
        )


register(WeightDecay())
