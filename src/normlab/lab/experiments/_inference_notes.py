"""The notes of the inference-stats report (:mod:`normlab.lab.experiments.inference_stats`): what
the figures show in words, where the EMA swings, and how the result compares with Wu & Johnson's.
A private helper module of the experiment (the registry skips modules whose name starts with _).
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

from ..batchmates import momentum_key
from ..rows import diverged, final, value

__all__ = ["notes", "schedule"]


def schedule(params: dict[str, Any], batch: int) -> tuple[float, int, int]:
    """``(lr, steps, eval_every)`` of a job at batch size ``batch`` (see :attr:`InferenceStats.derived`)."""
    steps = max(1, int(params["examples"]) // batch)
    lr = float(params["base_lr"]) * batch / float(params["base_batch"])
    return lr, steps, max(1, steps // int(params["evaluations"]))


def notes(figures, arms, bn_arms, sizes, seeds, momenta, job, values, gains, tol, config, findings) -> list[str]:
    notes = [
        f"Batch-mate dependence: the largest change of a probe example's logit when all its batch-mates are "
        f"replaced, relative to the probes' RMS logit; zero to float precision means below {tol:g} (float32's "
        f"unit roundoff is 6e-8; a per-example reduction over a few hundred values summed in another order "
        f"differs by ~1e-6 at most). The probes are the first {config.get('params', {}).get('probe_examples', 4)} "
        f"test examples, in batches of the training batch size.",
    ]
    p = config.get("params", {})
    try:
        plan = {size: schedule(p, size) for size in sizes}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        plan = {}
    if plan:
        notes.append(f"Every batch size sees {p['examples']} training examples; learning rate by the linear scaling "
                     f"rule, {p['base_lr']} x batch / {p['base_batch']} (SGD with momentum "
                     f"{config.get('train', {}).get('momentum')}): " + "; ".join(
                         f"batch {size}: lr {lr:g}, {steps} steps, an evaluation every {every}"
                         for size, (lr, steps, every) in plan.items()) + ".")
    broken = [f"{a}, batch {size}, seed {s} (step {job(a, size, s)[-1]['step']})" for a in arms for size in sizes
              for s in seeds if diverged(job(a, size, s))]
    if broken:
        notes.append("Diverged (loss NaN or infinite; the job stopped there, and its last evaluation has no "
                     "statistics to compare): " + "; ".join(broken) + ".")
    checks = [v for a in bn_arms for s in seeds for size in sizes for v in values(job(a, size, s), "ema_check")]
    if checks:
        notes.append(f"The EMA kept beside each batch norm at its own momentum matched its running statistics "
                     f"within {max(checks):.1e} (relative) at every evaluation: the EMAs at the other momenta are "
                     f"what the network would hold had it been built with them (the momentum never enters a "
                     f"training step, so the weights are the same).")
    missing = [f"{a}, batch {size}, seed {s}" for a in bn_arms for size in sizes for s in seeds
               if job(a, size, s) and values(job(a, size, s), "recal_acc") and not diverged(job(a, size, s))
               and final(job(a, size, s), f"gain_{momentum_key(momenta[0])}") is None] if momenta else []
    if missing:
        notes.append("No final EMA values for " + "; ".join(missing) + " (a job resumed from a checkpoint cannot "
                     "rebuild the EMAs at other momenta); those seeds are left out of the (b) statistics.")
    # What the figures show.
    t_title, e_title = figures[0].title, figures[1].title
    dep_text = []
    for a in arms:
        by_size = []
        for size in sizes:
            vals = [v for s in seeds if (v := final(job(a, size, s), "dep_train")) is not None]
            if vals:
                by_size.append(f"{fmean(vals):.2g} at batch {size}")
        if by_size:
            dep_text.append(f"{a!r} " + ", ".join(by_size))
    if dep_text:
        text = f"Figure \"{t_title}\": " + "; ".join(dep_text) + "."
        zero = [a for a in arms if a not in bn_arms and all(
            final(job(a, size, s), "dep_train") == 0 for size in sizes for s in seeds if job(a, size, s))]
        if len(zero) > 1:
            text += f" The lines of {', '.join(map(repr, zero))} lie on top of each other at 0."
        bn_means = {size: fmean(vals) for size in sizes
                    if (vals := [v for a in bn_arms for s in seeds if (v := final(job(a, size, s), "dep_train"))
                                 is not None])}
        if len(bn_means) >= 2 and min(bn_means.values()) > 0:
            lo, hi = min(bn_means), max(bn_means)
            text += (f" Batch norm's change is the sampling error of its batch statistics: from batch {lo} to "
                     f"{hi} it falls {bn_means[lo] / bn_means[hi]:.2g}x, where 1/sqrt(batch) predicts "
                     f"{math.sqrt(hi / lo):.2g}x.")
        notes.append(text)
    largest = [v for a in arms for s in seeds for size in sizes for v in values(job(a, size, s), "dep_eval")]
    if largest:
        notes.append(f"Figure \"{e_title}\": " + (
            "every arm's line is at exactly 0: the probe outputs agreed bitwise at every evaluation, whatever "
            "their batch-mates." if max(largest) == 0 else
            f"every arm's line lies at {max(largest):.2g} or below (largest over all arms, batch sizes, seeds and "
            f"evaluations)."))
    for m in momenta:
        spec = next((f for f in figures if f.metric == f"gain_{momentum_key(m)}"), None)
        text = []
        for size in sizes:
            line: dict[Any, list[float]] = {}  # step -> the seeds' gains (the figure's mean line)
            for a in bn_arms:
                for s in seeds:
                    for r in job(a, size, s):
                        if (v := value(r, f"gain_{momentum_key(m)}")) is not None:
                            line.setdefault(r["step"], []).append(v)
            if not line:
                continue
            means = {step: fmean(vs) for step, vs in sorted(line.items())}
            steps = list(means)
            peak = max(means, key=means.get)
            text.append(f"batch {size}: {means[steps[0]] * 100:+.2f} points at step {steps[0]}, "
                        f"{means[steps[-1]] * 100:+.2f} at the end (step {steps[-1]}), highest "
                        f"{means[peak] * 100:+.2f} at step {peak}, {fmean(means.values()) * 100:+.2f} averaged "
                        f"over the evaluations")
        if text:
            where = f"Figure \"{spec.title}\"" if spec else f"Momentum {m:g} (no figure: not a default momentum)"
            notes.append(f"{where} (mean line over seeds): " + "; ".join(text) + ".")
    notes += _swings(bn_arms, sizes, seeds, momenta, job, values)
    if "group" in arms and "instance" in arms:
        widths = config.get("model", {}).get("widths") or []
        if widths and max(widths) <= 32:
            notes.append(f"At these widths ({widths}) the lab's 'group' arm has one channel per group (the "
                         f"registry's default_groups picks the largest divisor of the channels up to 32): it is "
                         f"instance normalization with a learned per-channel scale and shift, computed by "
                         f"GroupNorm's code; the 'instance' arm is InstanceNorm2d without them (torch's default). "
                         f"Group norm with several channels per group is covered by tests/layers/test_batch_independence.py.")
    notes += _interpretation(findings, gains, sizes, momenta, config)
    return notes

def _swings(bn_arms, sizes, seeds, momenta, job, values, drop: float = 0.05) -> list[str]:
    """How often each accuracy fell by more than ``drop`` from one evaluation to the next (Wu &
    Johnson: the EMA's accuracy is erratic during training, the precise statistics' is not)."""
    parts = []
    for size in sizes:
        def falls(key: str) -> tuple[int, int] | None:
            count = total = 0
            for a in bn_arms:
                for s in seeds:
                    vs = values(job(a, size, s), key)
                    count += sum(1 for u, v in zip(vs, vs[1:]) if v < u - drop)
                    total += max(0, len(vs) - 1)
            return (count, total) if total else None
        recal = falls("recal_acc")
        emas = {m: falls(f"ema_acc_{momentum_key(m)}") for m in momenta}
        if recal is None or any(v is None for v in emas.values()):
            continue
        parts.append(f"batch {size}: " + ", ".join(f"EMA {m:g}: {c}" for m, (c, _) in emas.items())
                     + f", recalibrated: {recal[0]} (of {recal[1]})")
    if not parts:
        return []
    return [f"How often the test accuracy fell by more than {drop * 100:g} points from one evaluation to the next "
            f"(all seeds; Wu & Johnson find the EMA's accuracy erratic during training, PreciseBN's steady): "
            + "; ".join(parts) + "."]

def _interpretation(findings, gains, sizes, momenta, config) -> list[str]:
    """What the (b) results mean beside Wu & Johnson's, and why they may differ, from what this run shows."""
    out = []
    _, _, non, lag, _ = findings
    params = config.get("params", {})
    mean_gain = {cell: fmean(c.values()) for cell, c in gains.items() if c}
    slow = min(momenta) if momenta else None
    if mean_gain:
        big = {cell: g for cell, g in mean_gain.items() if g > 0.01}
        if big:
            try:
                rest = {size: (1 - slow) ** schedule(params, size)[1] for size in sizes}
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                rest = {}
            text = ("Recalibration gained more than a point at the final evaluation (mean over seeds) in "
                    + ", ".join(f"batch {size} / momentum {m:g} ({g * 100:+.1f})" for (size, m), g in big.items())
                    + ": more than at the end of Wu & Johnson's standard ImageNet schedule, where the two are "
                      "close. Possible reasons: the learning rate here never decays (theirs falls to near 0 at the "
                      "end, and the EMA catches up with weights that no longer move), so the statistics keep moving "
                      "and an average over the last ~1/momentum steps is not the statistics of the current weights; "
                      "a small network that has not converged may be more sensitive to such errors than a ResNet-50 "
                      "at the end of training; and the runs are short")
            if rest:
                text += (f" (at the end the EMA of momentum {slow:g} still puts "
                         + ", ".join((f"{w:.0%}" if w >= 0.01 else "under 1%") + f" (batch {size})"
                                     for size, w in rest.items())
                         + " of its weight on torch's initial values, mean 0 and variance 1)")
            out.append(text + ".")
        for size in sizes:
            line = [mean_gain.get((size, m)) for m in sorted(momenta)]
            if len(line) > 1 and None not in line and all(a > b for a, b in zip(line, line[1:])):
                out.append(f"At batch {size} the gain shrinks as the momentum grows ("
                           + ", ".join(f"{m:g}: {g * 100:+.1f}" for m, g in zip(sorted(momenta), line))
                           + f" points): a shorter memory lags less, and here its noise (momentum "
                             f"{max(momenta):g} averages about {1 / max(momenta):.2g} batches) costs less than "
                             f"the lag.")
        if len(sizes) >= 2:
            lo, hi = min(sizes), max(sizes)
            pairs = [(mean_gain.get((lo, m)), mean_gain.get((hi, m))) for m in momenta]
            if pairs and all(a is not None and b is not None and b > a for a, b in pairs):
                out.append(f"At every momentum the gain is larger at batch {hi} than at batch {lo}, as Wu & Johnson "
                           f"find for large batches: with the linearly scaled rate the weights move {hi // lo}x "
                           f"farther per step, and the EMA's memory, counted in steps, spans {hi // lo}x more "
                           f"examples.")
    if lag.verdict in ("not supported", "mixed"):
        out.append(f"Wu & Johnson's EMA lag is {lag.verdict} here: their gap is largest early in training and with "
                   f"batch 8192 on ImageNet, where the weights move far within the EMA's memory. Where the weights "
                   f"change little within about 1/momentum steps, the EMA is close to the population statistics "
                   f"and there is no lag to close.")
    if non.verdict in ("not supported", "mixed"):
        out.append(f"Recalibration fell behind the EMA in some cell. The recalibrated statistics are those of "
                   f"{params.get('recal_examples')} training examples in training-mode batches; at a small batch "
                   f"the deeper layers' inputs are then normalized with noisy batch statistics upstream, unlike at "
                   f"inference, and a small test set can move by a few examples either way.")
    if "inconclusive" in (non.verdict, lag.verdict):
        out.append("Some (b) cells are inconclusive: the EMA's final accuracy differs widely between seeds (it swings "
                   "from one evaluation to the next, see above), so a few seeds leave wide intervals; the full form "
                   "runs 5 seeds.")
    return out
