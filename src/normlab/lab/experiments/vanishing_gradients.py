"""Vanishing gradients in deep sigmoid and tanh MLPs, with and without batch norm (claim C7).

Claim tested: C7, batch norm eases vanishing gradients. The network is a 10 x 100 MLP (torch's
default ``nn.Linear`` initialization, the one a practitioner gets without asking) with sigmoid
or tanh (the grid axis ``model.activation``), trained with plain SGD on mnist-5k, BN before the
activation vs no norm; arms of one seed share initial weights and batches.

Statistic. For each job, ``g_i`` is the 2-norm of the weight gradient of hidden layer ``i``
(1 = first, D = last hidden layer; :func:`normlab.lab.probes.grad_norm_probe`), and

    rho = g_1 / g_D                       (below 1: the gradient shrinks on its way to the input)
    easing = rho_BN / rho_none            (per seed; arms of a seed share weights and batches)

``easing`` is taken at initialization (the gradient of the first training step, computed at the
initial weights) and at the end of training (the last step's gradient). Its geometric mean over
seeds and 95% CI go to one :class:`~normlab.lab.verdicts.Rule` per activation and moment; the
rule expects at least ``params["min_easing"]`` (10x: one decade of the plain network's
attenuation recovered) with the CI above 1x. The four findings combine into one C7 finding.
Final test accuracy is reported beside it.

Published anchor: none with a number. The argument is Ioffe & Szegedy's (2015, Sec. 3.3): BN
keeps a sigmoid's inputs out of its saturated regime, so its derivative, and the gradient, do
not vanish. Yang et al. (2019, "A mean field theory of batch normalization") show the opposite
risk: at initialization BN makes the gradient of a deep fully connected network *grow* toward
the input (gradient explosion); the notes say when rho_BN exceeds 1.

Forms: full 5 seeds x 6,000 steps (batch 60, lr 0.1, evaluation every 100 steps); quick 3
seeds x 1,500 steps (evaluation every 50): about 80 s of CPU, 50 s wall on 2 cores with ``--jobs 2``.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import mean_ci
from ..probes import grad_norm_probe
from ..rows import diverged, final, value
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Probe, Summary
from .registry import register
from .common import grid_inputs, job_rows

__all__ = ["VanishingGradients"]

PROBE = "grad_norm"
MOMENTS = ("init", "end")
MOMENT_WORDS = {"init": "at initialization", "end": "at the end of training"}

PUBLISHED = [
    "No published number for this claim. Ioffe & Szegedy 2015 (Sec. 3.3) argue that BN keeps the "
    "inputs of saturating nonlinearities (sigmoid) out of their saturated regime, so gradients do not vanish.",
    "Glorot & Bengio 2010: in deep sigmoid/tanh networks with standard initialization the gradients of the "
    "lower layers are much smaller than those of the upper ones (the vanishing-gradient problem BN is said to ease).",
    "Yang et al. 2019 (\"A mean field theory of batch normalization\"): at initialization BN causes gradient "
    "explosion with depth in fully connected networks without skip connections; 'eased' vanishing may "
    "overshoot into growth toward the input.",
]


def _profile(job_rows: list[dict[str, Any]], key: str, depth: int, which: str) -> list[float] | None:
    """The values ``{key}_1 .. {key}_{depth}`` of the first (``which="first"``) or last row that
    has all of them finite; None if no row does."""
    ordered = job_rows if which == "first" else list(reversed(job_rows))
    for row in ordered:
        values = [value(row, f"{key}_{i}") for i in range(1, depth + 1)]
        if all(v is not None for v in values):
            return values  # type: ignore[return-value]
    return None


def _ratio(profile: list[float] | None) -> float | None:
    """rho = g_1 / g_D, or None when it is undefined (no profile, a zero norm)."""
    if not profile or profile[0] <= 0 or profile[-1] <= 0:
        return None
    return profile[0] / profile[-1]


def _gm(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


class VanishingGradients(Experiment):
    name = "vanishing-gradients"
    claim = "C7: batch norm eases vanishing gradients"
    title = "Vanishing gradients in deep sigmoid and tanh MLPs, with and without batch norm"
    description = ("10x100 sigmoid/tanh MLP, SGD: first/last hidden layer gradient-norm ratio at init and at the "
                   "end, BN vs none")
    claims = ("C7",)
    figures = (
        FigureSpec(
            kind="profile", probe=f"{PROBE}_init", reduce="first", logy=True, panel="model.activation",
            title="Weight-gradient norm per hidden layer at initialization (first training step)",
            ylabel="||dL/dW|| (2-norm)",
            caption="The gradient of the first training step, computed at the initial weights; layer 1 is the "
                    "first hidden layer. Mean over seeds, band from the seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="profile", probe=PROBE, reduce="final", logy=True, panel="model.activation",
            title="Weight-gradient norm per hidden layer at the end of training (last step)",
            ylabel="||dL/dW|| (2-norm)",
            caption="The gradient of the last training step (one batch). Mean over seeds, band from the "
                    "seeds' minimum to maximum.",
        ),
        FigureSpec(
            kind="curve", metric="test_acc", panel="model.activation", title="Test accuracy during training",
            ylabel="test accuracy",
            caption="Mean over seeds; the band spans the seeds' minimum to maximum.",
        ),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # torch's default nn.Linear init (uniform, std 1/sqrt(3 fan_in)): the regime a practitioner
            # meets by default, in which both sigmoid and tanh gradients shrink layer by layer.
            model=ModelConfig(kind="mlp", widths=[100] * 10, activation="sigmoid", placement="before"),
            train=TrainConfig(steps=6000, batch_size=60, optimizer="sgd", lr=0.1, seeds=5, eval_every=100,
                              checkpoint_every=1000),
            arms={"none": {"model.norm": "none"}, "batch": {"model.norm": "batch"}},
            grid={"model.activation": ["sigmoid", "tanh"]},
            # One decade: with ten saturating layers the plain network's first/last ratio is expected to be
            # several decades below 1, so an easing worth the name recovers at least one of them.
            params={"min_easing": 10.0},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {
            "train.steps": 1500, "train.seeds": 3, "train.eval_every": 50, "train.checkpoint_every": 500,
        })

    def probes(self, config: ExperimentConfig, arm: str) -> list[Probe]:
        return [grad_norm_probe(PROBE)]

    def rules(self, params: dict[str, Any], activations: list[str]) -> dict[tuple[str, str], Rule]:
        """The verdict rules, fixed before the run by the params: one per activation and moment.

        The statistic is log10(easing) averaged over seeds, in decades (the log of the geometric
        mean, with the same CI): easings span many decades, and "7.2 decades" reads better than
        "15848931.9x". ``params["min_easing"]`` = 10x is a target of 1 decade.
        """
        min_easing = params.get("min_easing", 10.0)
        return {
            (act, moment): Rule(
                "C7", f"easing {MOMENT_WORDS[moment]}, {act}: log10 of (g_1/g_D with BN) / (g_1/g_D without), "
                      f"mean over seeds",
                expected=f"with batch norm the first hidden layer's gradient, relative to the last's, is at least "
                         f"{min_easing:g}x larger than without (95% CI above 1x)",
                null=0.0, target=math.log10(min_easing), unit=" decades", digits=1, published="no published number",
                label=f"{act}, {MOMENT_WORDS[moment]}")
            for act in activations for moment in MOMENTS
        }

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        min_easing = params.get("min_easing", 10.0)
        depth = len(config["model"]["widths"])
        steps = config["train"]["steps"]
        jobs, arms, activations, seeds = grid_inputs(rows, config, "model.activation")
        rules = self.rules(params, activations)

        def job_of(arm: str, act: str, seed: int) -> list[dict[str, Any]]:
            return job_rows(jobs, config, arm, seed, model__activation=act)

        table: list[list[str]] = []
        notes: list[str] = []
        # profiles[(act, arm, moment)][seed] = [g_1, ..., g_D]; accuracy[(act, arm)] = final test accuracies
        profiles: dict[tuple[str, str, str], dict[int, list[float]]] = {}
        accuracy: dict[tuple[str, str], list[float]] = {}
        for act in activations:
            for arm in arms:
                inits, ends, accs = {}, {}, []
                for s in seeds:
                    job = job_of(arm, act, s)
                    if not job:
                        continue
                    if (p := _profile(job, f"{PROBE}_init", depth, "first")) is not None and _ratio(p) is not None:
                        inits[s] = p
                    if diverged(job):
                        notes.append(f"{act}, arm {arm!r}, seed {s} diverged (loss NaN/inf) at step "
                                     f"{job[-1]['step']}: no end-of-training gradient for it.")
                    elif (p := _profile(job, PROBE, depth, "last")) is not None and _ratio(p) is not None:
                        ends[s] = p
                    if (acc := final(job, "test_acc")) is not None:
                        accs.append(acc)
                profiles[(act, arm, "init")], profiles[(act, arm, "end")] = inits, ends
                accuracy[(act, arm)] = accs
                acc_text = "n/a"
                if accs:
                    m, lo, hi = mean_ci(accs, bounds=(0.0, 1.0))
                    acc_text = f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
                table.append([act, arm, _sci(_gm([_ratio(p) for p in inits.values()])),
                              _sci(_gm([_ratio(p) for p in ends.values()])), acc_text])

        parts: list[Finding] = []
        by_act: dict[str, dict[str, Finding]] = {}
        for act in activations:
            by_act[act] = {}
            for moment in MOMENTS:
                rule = rules[(act, moment)]
                bn, plain = profiles.get((act, "batch", moment), {}), profiles.get((act, "none", moment), {})
                easing = [math.log10(_ratio(bn[s]) / _ratio(plain[s])) for s in seeds if s in bn and s in plain]
                if easing:
                    finding = rule.decide(*mean_ci(easing), n=len(easing))
                else:
                    finding = rule.decide(None, None, None, n=0, note="no seed has both arms' gradients")
                by_act[act][moment] = finding
                parts.append(finding)
            table.append([act, "easing: log10 (BN / none)",
                          f"{by_act[act]['init'].text} ({by_act[act]['init'].verdict})",
                          f"{by_act[act]['end'].text} ({by_act[act]['end'].verdict})", ""])
        combined = combine(
            "C7", parts, statistic="easing of the first/last gradient-norm ratio, log10(BN / none), "
                                   + ", ".join(f"{a} {m}" for a in activations for m in MOMENTS),
            expected=f"with batch norm the first/last hidden-layer gradient-norm ratio is at least {min_easing:g}x "
                     f"the plain network's, at init and at the end, for " + " and ".join(activations),
            published="no published number")

        headline = (f"C7 {combined.verdict}: batch norm raised the first/last hidden-layer gradient-norm ratio by "
                    + "; ".join(f"{by_act[a]['init'].text} at init and {by_act[a]['end'].text} at the end ({a})"
                                for a in activations)
                    + f" over the plain network (mean over seeds of log10(ratio with BN / without), 95% CI; "
                      f"expected at least {math.log10(min_easing):g} decade, i.e. {min_easing:g}x).")

        # What the profile figures show, in numbers from the same rows.
        for act in activations:
            for moment in MOMENTS:
                said = []
                for arm in arms:
                    p = profiles.get((act, arm, moment), {})
                    g = _gm([_ratio(v) for v in p.values()])
                    if g is None:
                        continue
                    way = "falls" if g < 1 else "grows"
                    text = (f"{arm}: {way} by {abs(math.log10(g)):.1f} decades from layer {depth} to layer 1 "
                            f"(g_1/g_D = {g:.2g}")
                    if depth > 2:
                        text += (f"; over layers 2..{depth}, whose inputs are hidden units, g_2/g_D = "
                                 f"{_gm([v[1] / v[-1] for v in p.values() if v[1] > 0]):.2g}")
                    said.append(text + ")")
                if said:
                    notes.append(f"Gradient profile {MOMENT_WORDS[moment]}, {act}: " + "; ".join(said) + ".")
                plain = _gm([_ratio(v) for v in profiles.get((act, "none", moment), {}).values()])
                if plain is not None and plain >= 1.0:
                    notes.append(f"Without BN ({act}, {MOMENT_WORDS[moment]}) the gradient did not vanish "
                                 f"(g_1/g_D = {plain:.2g} >= 1): there was no vanishing for BN to ease there, and "
                                 f"the easing only compares two non-vanishing profiles.")
                bn_hidden = _gm([v[1] / v[-1] for v in profiles.get((act, "batch", moment), {}).values() if v[1] > 0])
                if moment == "init" and depth > 2 and bn_hidden is not None and bn_hidden > 1.0:
                    notes.append(f"With BN ({act}) the initial gradient grows toward the input over layers 2..{depth} "
                                 f"(g_2/g_D = {bn_hidden:.2g}): the direction of the gradient explosion Yang et al. "
                                 f"2019 predict for deep BN networks at initialization, here over {depth - 2} layers "
                                 f"only {bn_hidden:.2g}x.")
        notes.append("Layer 1's weight gradient is the backpropagated error times its input, the standardized "
                     "image (many more inputs than a hidden layer's), so in the profile figures layer 1 can sit "
                     "above the trend of layers 2..D in both arms; g_2/g_D (in the notes above) leaves it out.")
        for act in activations:
            plain, bn = accuracy.get((act, "none"), []), accuracy.get((act, "batch"), [])
            if plain and bn:
                mp, mb = sum(plain) / len(plain), sum(bn) / len(bn)
                what = ("stayed at chance level" if mp < 0.15 else "trained")
                notes.append(f"Test accuracy ({act}, the curve figure): without BN the network {what} "
                             f"(final {mp:.3f}); with BN it reached {mb:.3f}.")
        notes.append("Easing = log10((g_1/g_D with BN) / (g_1/g_D without)), per seed (arms of a seed share initial "
                     "weights and batches), averaged over seeds with a t-interval; g_i is the 2-norm of hidden "
                     "layer i's weight gradient (1 = first). 'At init' is the first training step's gradient, at the "
                     "initial weights; 'at the end' the last step's (one batch of "
                     f"{config['train']['batch_size']}), after {steps} steps.")
        return Summary.of_findings(
            self, [combined], headline=headline,
            columns=["activation", "arm", "g_1/g_D at init (geometric mean)", "g_1/g_D at the end (geometric mean)",
                     "final test accuracy [95% CI]"],
            rows=table, published=PUBLISHED, notes=notes,
        )


register(VanishingGradients())
