"""Frankle, Schwab & Morcos 2020: train batch norm's gamma and beta, and only them (extension X1).

Question (an extension of the claims, row X1 of the suite's index): how much can a network
learn when only its batch norms' affine parameters (gamma, beta) train, every other weight
frozen at its random initialization? Frankle et al. ("Training BatchNorm and only BatchNorm: on
the expressive power of random features in CNNs", ICLR 2021) find surprisingly much: 82% on
CIFAR-10 for a deep ResNet, far more than training as many randomly chosen other parameters,
and more the deeper and wider the network.

Setting: a plain CNN (``model.kind="cnn"``: 3x3 convolutions, the first at stride 1 and the
others at stride 2, each ``conv -> BN -> ReLU``, global average pooling, a linear output), He
initialization (``init_gain = sqrt 2``, as Frankle et al.), Adam at lr 0.01, batch 60,
mnist-5k. A CNN, not an MLP, because that is where the paper's question lives: BN's per-channel
gamma and beta choose and scale random convolutional features. Adam rather than the paper's SGD
with momentum, and depth 3 and up: the reference arm must train in the quick form's few steps
(a first quick run with SGD lr 0.1, momentum 0.9 left training everything at 0.57-0.61 test
accuracy, its BN running statistics lagging the fast-moving weights; with Adam, training
everything reaches 0.90 at depth 3 and 0.96 at depth 4 in 400 steps, but only 0.65 at depth 2,
whose global pooling sees too small a receptive field). Adam also scales each parameter's step
by its own gradient history, so the three arms, whose parameters have gradients of very
different sizes, are not favoured or starved by one shared learning rate. These choices were
made on the reference arm alone, before any BN-only or output-only result. Arms, sharing a
seed's initial weights and batches (``train.trainable``):

* ``all``: every parameter trains (the reference);
* ``bn-only``: only the BN weights and biases (``"norm"``; the output layer stays random too,
  as in the paper's main experiments);
* ``output-only``: only the output layer (a linear classifier on the same random features:
  the classic random-features baseline; it has *more* trainable parameters than ``bn-only``).

Grid: ``params.depth`` (conv blocks), and in the full form ``params.width`` (channels of the
first block); a job's ``model.widths`` is derived: ``width * 2**i`` for block ``i`` (declared
in :attr:`FrankleBNOnly.derived`). The smallest network is the grid's first point (smallest
depth and width), the largest its last.

Rules (declared, extension X1; both must hold for "supported"):

1. at the largest network, final test accuracy of ``bn-only`` - ``output-only`` > 0 (mean over
   seeds, 95% CI): gamma and beta on random features beat a trained classifier on them;
2. ``bn-only`` final test accuracy, largest - smallest network > 0: BN-only training gains from
   depth and width.

Also reported: each arm's accuracy at every grid point, BN-only as a fraction of full training,
and the trainable-parameter counts.

Forms: full 5 seeds x 3,000 steps, depth 3, 4, 5 x width 16, 32 (evaluation every 100); quick
3 seeds x 300 steps, depth 3 and 4 at width 16 (evaluation every 50): about 145 s of user CPU
(about 75 s wall on 2 cores with ``--jobs 2``).
"""

from __future__ import annotations

import math
from typing import Any

from ..config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import mean_ci
from ..rows import diverged, final, group_jobs
from ..verdicts import Finding, Rule
from .base import Experiment, FigureSpec, Summary
from .registry import register

__all__ = ["FrankleBNOnly", "widths_for"]

PUBLISHED = [
    "Frankle, Schwab & Morcos 2020 (ICLR 2021): training only BatchNorm's gamma and beta, all other weights frozen "
    "at random init, a deep ResNet (ResNet-866) reaches 82% on CIFAR-10 (32% top-5 on ImageNet), far above "
    "training an equal number of randomly chosen other parameters; BN-only accuracy grows with depth and width.",
    "Frankle et al. also find that BN-only training disables about a third of the random features (gamma near 0).",
]
ARMS = {"all": {"train.trainable": "all"}, "bn-only": {"train.trainable": "norm"},
        "output-only": {"train.trainable": "output"}}


def widths_for(depth: Any, width: Any) -> list[int]:
    """The conv channels of a network of ``depth`` blocks whose first has ``width`` channels,
    doubling at each block (the others downsample by 2).

    >>> widths_for(3, 16)
    [16, 32, 64]

    Raises:
        ConfigError: ``depth`` or ``width`` not a positive int.
    """
    for key, v in (("params.depth", depth), ("params.width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive int (conv blocks / channels of the first block), got {v!r}.")
    return [width * 2**i for i in range(depth)]


def _point(config: dict[str, Any], job_point: tuple) -> tuple[int, int]:
    point = dict(job_point)
    params = config.get("params", {})
    return point.get("params.depth", params.get("depth")), point.get("params.width", params.get("width"))


class FrankleBNOnly(Experiment):
    name = "frankle2020-bn-only"
    claim = ("X1 (extension): training only batch norm's gamma and beta, on frozen random weights, learns much "
             "(Frankle et al. 2020)")
    title = "Frankle et al. 2020: training batch norm and only batch norm"
    description = ("ReLU CNN with BN, Adam: train all / only BN's gamma and beta / only the output layer, over depth "
                   "(and width): final accuracy")
    claims = ("X1",)
    derived = {"model.widths": "params.width * 2**i for conv block i = 0 .. params.depth - 1"}
    figures = (
        FigureSpec(kind="grid", metric="test_acc", axis="params.depth", reduce="final",
                   title="Final test accuracy vs depth, by what trains", ylabel="final test accuracy",
                   caption="Mean over seeds; the band spans the seeds' minimum to maximum. Chance is 0.1."),
        FigureSpec(kind="curve", metric="test_acc", panel="params.depth", title="Test accuracy during training",
                   ylabel="test accuracy", caption="Mean over seeds (and widths); band min to max."),
        FigureSpec(kind="curve", metric="train_loss", panel="params.depth", logy=True, title="Training loss",
                   ylabel="cross-entropy (mean since last evaluation)", caption="Mean over seeds; band min to max."),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            model=ModelConfig(kind="cnn", widths=widths_for(3, 16), activation="relu", norm="batch",
                              init_gain=2**0.5),
            train=TrainConfig(steps=3000, batch_size=60, optimizer="adam", lr=0.01, seeds=5,
                              eval_every=100, checkpoint_every=500),
            arms=dict(ARMS),
            grid={"params.depth": [3, 4, 5], "params.width": [16, 32]},
            params={"depth": 3, "width": 16},
        )

    def quick_config(self) -> ExperimentConfig:
        config = apply_overrides(self.default_config(), {"train.steps": 300, "train.seeds": 3, "train.eval_every": 50})
        config.grid = {"params.depth": [3, 4]}
        return config

    def job_config(self, config: ExperimentConfig) -> ExperimentConfig:
        widths = widths_for(config.params.get("depth"), config.params.get("width"))
        return apply_overrides(config, {"model.widths": widths}, parse=False)

    def rules(self, params: dict[str, Any]) -> tuple[Rule, Rule]:
        """The verdict rules, fixed before the run (extension X1)."""
        return (
            Rule("X1", "final test accuracy at the largest network, BN-only - output-only",
                 expected="training only gamma and beta beats training only the output layer on the same random "
                          "features (difference > 0)", null=0.0, label="BN-only - output-only",
                 published="82% on CIFAR-10 (ResNet-866), far above as many other trained parameters"),
            Rule("X1", "final test accuracy of BN-only training, largest - smallest network",
                 expected="BN-only training reaches higher accuracy in the larger network (difference > 0)",
                 null=0.0, label="BN-only, largest - smallest",
                 published="BN-only accuracy grows with depth and width"),
        )

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        rule_vs, rule_depth = self.rules(config.get("params", {}))
        jobs = group_jobs(rows)
        arms = list(config.get("arms", {})) or sorted({j.arm for j in jobs})
        acc: dict[tuple[str, tuple[int, int]], dict[int, float]] = {}
        notes: list[str] = []
        for job, job_rows in jobs.items():
            point = _point(config, job.point)
            if diverged(job_rows):
                notes.append(f"arm {job.arm!r} at depth {point[0]}, width {point[1]}, seed {job.seed} diverged at "
                             f"step {job_rows[-1]['step']}; its accuracy is that of its last evaluation.")
            if (a := final(job_rows, "test_acc")) is not None:
                acc.setdefault((job.arm, point), {})[job.seed] = a
        points = sorted({p for _, p in acc}, key=lambda p: (p[0] * p[1], p))
        table = []
        for point in points:
            means = {}
            for arm in arms:
                vs = list(acc.get((arm, point), {}).values())
                if vs:
                    m, lo, hi = mean_ci(vs, bounds=(0.0, 1.0))
                    means[arm] = m
                    table.append([f"depth {point[0]}, width {point[1]}", arm, f"{m:.4f} [{lo:.4f}, {hi:.4f}]",
                                  str(len(vs))])
            if "bn-only" in means and means.get("all"):
                table.append([f"depth {point[0]}, width {point[1]}", "BN-only / all", f"{means['bn-only'] / means['all']:.2f}",
                              ""])

        def diff(a: tuple[str, tuple[int, int]], b: tuple[str, tuple[int, int]], rule: Rule, what: str) -> Finding:
            x, y = acc.get(a, {}), acc.get(b, {})
            ds = [x[s] - y[s] for s in sorted(x) if s in y]
            if not ds:
                return rule.decide(None, None, None, n=0, note=f"no seed has {what}")
            return rule.decide(*mean_ci(ds, bounds=(-1.0, 1.0)), n=len(ds))

        if points:
            small, large = points[0], points[-1]
            vs_output = diff(("bn-only", large), ("output-only", large), rule_vs, "both bn-only and output-only")
            if small == large:
                growth = rule_depth.decide(None, None, None, n=0, note="the grid has one network size only")
            else:
                growth = diff(("bn-only", large), ("bn-only", small), rule_depth, "bn-only at both sizes")
            size = f"depth {large[0]}, width {large[1]}"
        else:
            vs_output = rule_vs.decide(None, None, None, n=0, note="no job finished")
            growth = rule_depth.decide(None, None, None, n=0, note="no job finished")
            size = "n/a"
        findings = [vs_output, growth]
        notes += self._notes(acc, points, findings)
        notes += _training_notes(jobs, points[-1] if points else None, config)
        headline = (f"Training only BN's gamma and beta: {vs_output.text} accuracy vs training only the output layer "
                    f"at {size} ({vs_output.verdict}); {growth.text} from the smallest to the largest network "
                    f"({growth.verdict}).")
        return Summary.of_findings(self, findings, headline=headline,
                                   columns=["network", "trains", "final test accuracy [95% CI]", "seeds"],
                                   rows=table, published=PUBLISHED, notes=notes)

    @staticmethod
    def _notes(acc, points, findings: list[Finding]) -> list[str]:
        """What the figures and verdicts show, in words."""
        out = []
        for point in points:
            parts = [f"{arm} {sum(v.values()) / len(v):.3f}" for (arm, p), v in acc.items() if p == point and v]
            out.append(f"Depth {point[0]}, width {point[1]}: mean final test accuracy " + ", ".join(parts) + ".")
        vs_output, growth = findings
        if vs_output.verdict == "supported":
            out.append("As Frankle et al. report, shifting and scaling random features (BN-only) learned more than "
                       "fitting a linear classifier to them (output-only), with fewer trainable parameters.")
        elif vs_output.verdict == "not supported":
            out.append("Unlike Frankle et al.'s deep ResNets, here a linear classifier on the random features "
                       "(output-only) learned at least as much as BN-only training: in a shallow CNN, gamma and beta "
                       "have few features to choose from, and the frozen random output layer limits what they can "
                       "express. The runs are also short: if both restricted arms are still learning (the loss-drop "
                       "note below), the ranking is one of speed as much as of what each can express; the full form "
                       "trains ten times longer.")
        if growth.verdict == "not supported":
            out.append("BN-only accuracy did not grow with network size here; the paper's growth is over ResNets "
                       "from 14 to 866 layers, far beyond this grid.")
        out.append("Chance accuracy is 0.1 (10 classes). Frankle et al.'s baseline trains as many randomly chosen "
                   "other parameters as BN has; output-only here trains the whole last layer, which has more "
                   "(counts in the next note), so it is the stronger baseline.")
        return out


def _training_notes(jobs, largest: tuple[int, int] | None, config: dict[str, Any]) -> list[str]:
    """Parameter counts at the largest network, and whether each arm's training loss was still
    falling at the end (the training-loss figure): a short run can rank arms by speed, not capacity."""
    if largest is None:
        return []
    widths = widths_for(*largest)
    counts = f"bn-only {2 * sum(widths)}, output-only {10 * (widths[-1] + 1)} (for 10 classes)"
    falling = []
    for arm in config.get("arms", {}):
        drops = []
        for job, job_rows in jobs.items():
            losses = [r.get("train_loss") for r in job_rows if r["step"] > 0]
            losses = [v for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
            if job.arm == arm and _point(config, job.point) == largest and len(losses) >= 2 and losses[-2] > 0:
                drops.append(1 - losses[-1] / losses[-2])
        if drops:
            falling.append(f"{arm} {100 * sum(drops) / len(drops):.1f}%")
    return [f"Trainable parameters at depth {largest[0]}, width {largest[1]}: {counts}.",
            "Training loss drop over the last evaluation interval at the largest network (mean over seeds; "
            "a few percent or more means still learning when the run stopped, see the training-loss figure): "
            + (", ".join(falling) if falling else "n/a") + "."]


register(FrankleBNOnly())
