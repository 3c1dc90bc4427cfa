"""The weight-decay experiment's reading of its measurements: final weight norms and effective
learning rates per arm and decay, what the figures show, and why the verdicts may differ."""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any, Mapping

from ..rows import JobId, diverged, final, value
from ..verdicts import Finding
from .common import fmt_value

__all__ = ["curve_text", "interpretation", "mechanism_values"]

KEYS = ("weight_norm", "eff_lr", "head_weight_norm")


def mechanism_values(jobs: Mapping[JobId, list[dict[str, Any]]], axis: str) -> dict[tuple[str, float], dict[str, Any]]:
    """``{(arm, decay): {key: [final value per seed], "eff_lr_by_seed": {seed: value}}}`` for the
    keys ``weight_norm``, ``eff_lr``, ``head_weight_norm``; diverged jobs are left out."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for job, job_rows in sorted(jobs.items(), key=lambda kv: str(kv[0])):
        decay = dict(job.point).get(axis)
        if decay is None or diverged(job_rows):
            continue
        entry = out.setdefault((job.arm, decay), {"eff_lr_by_seed": {}})
        for key in KEYS:
            v = final(job_rows, key)
            if v is not None:
                entry.setdefault(key, []).append(v)
                if key == "eff_lr":
                    entry["eff_lr_by_seed"][job.seed] = v
    return out


def curve_text(jobs: Mapping[JobId, list[dict[str, Any]]], axis: str, decay: float, key: str, title: str) -> str:
    """What a "curve" figure of ``key`` at ``decay`` shows: per arm with values, the mean over
    seeds at the first and at the last evaluation (and runs that diverged)."""
    parts = []
    for arm in ("none", "batch"):
        runs = [rs for job, rs in jobs.items() if job.arm == arm and dict(job.point).get(axis) == decay]
        starts = [v for rs in runs if (v := next((value(r, key) for r in rs if value(r, key) is not None), None))
                  is not None]
        ends = [v for rs in runs if not diverged(rs) and (v := final(rs, key)) is not None]
        if starts and ends:
            parts.append(f"{arm!r} from {fmean(starts):.3g} at the start to {fmean(ends):.3g} at the end"
                         + (f" ({sum(diverged(rs) for rs in runs)} of {len(runs)} runs diverged)"
                            if any(diverged(rs) for rs in runs) else ""))
    if not parts:
        return ""
    return f"Figure \"{title}\" (mean over seeds): " + "; ".join(parts) + "."


def _series(mech, arm: str, key: str, grid) -> str:
    parts = [f"{fmt_value(x)}: {fmean(vs):.3g}" for x in grid if (vs := mech.get((arm, x), {}).get(key))]
    return ", ".join(parts)


def interpretation(ax, mech, width: Finding, lr: Finding, decay: float, steps: int, figures) -> list[str]:
    """What the weight-norm and effective-rate figures show, and why a verdict may differ from the claim."""
    out = []
    grid = ax.grid
    for arm in ("none", "batch"):
        if text := _series(mech, arm, "weight_norm", grid):
            out.append(f"Figure \"{figures[1].title}\", {arm!r} (mean over seeds, by decay): {text}.")
    if text := _series(mech, "batch", "eff_lr", grid):
        out.append(f"Figure \"{figures[2].title}\", 'batch' (mean over seeds, by decay): {text}.")
    for arm in ("none", "batch"):
        if text := _series(mech, arm, "head_weight_norm", grid):
            out.append(f"Output layer's weight norm ({arm!r}, not followed by a norm in either arm, so decay limits "
                       f"it as it limits any plain layer): {text}.")
    if lr.verdict == "supported" or lr.verdict == "mixed":
        out.append(f"van Laarhoven's mechanism: with batch norm, decay {fmt_value(decay)} ends with a smaller weight "
                   f"norm than the smallest decay and so an effective learning rate {lr.text} as large"
                   + (" (the direction he predicts; smaller than the 10x of equilibrium, which a run of "
                      f"{steps} steps does not reach)." if lr.verdict == "mixed" else "."))
    elif lr.verdict == "not supported":
        out.append(f"Contrary to van Laarhoven's mechanism, the effective learning rate at decay {fmt_value(decay)} "
                   f"is not larger than at the smallest decay ({lr.text}): in {steps} steps the gradient, which "
                   f"grows a scale-invariant weight at every step, outweighs the decay's shrinking.")
    if width.verdict in ("mixed", "not supported", "inconclusive") and "batch" in ax.ranges and "none" in ax.ranges:
        highs = {arm: [r.high for r in ax.ranges[arm].values() if r.high is not None] for arm in ("batch", "none")}
        edge = ""
        if highs["batch"] and highs["none"]:
            ratio = 10 ** (fmean(math.log10(h) for h in highs["batch"]) - fmean(math.log10(h) for h in highs["none"]))
            edge = f" (batch norm's largest decay that trains is {ratio:.3g}x the plain network's, geometric mean)"
        lead = ("The seeds do not settle whether batch norm widens the range of usable decays" if
                width.verdict == "inconclusive" else
                "Batch norm does not widen the range of usable decays as much as the claim expects")
        out.append(lead + edge + ". Possible reasons: the decay also shrinks batch norm's scale and shift and the "
                   "output layer, which no norm follows, so a large decay limits what a batch-norm network can express "
                   "too (van Laarhoven's argument covers only the layers followed by a norm); and at a small decay "
                   "neither network's weights move far from their initial scale within the run, so both train alike "
                   "there.")
    collapsed = [x for x in ax.grid
                 if all((v := mech.get((arm, x), {}).get("head_weight_norm")) and fmean(v) < 1e-3 for arm in ("none", "batch"))]
    if collapsed:
        out.append(f"At decay {', '.join(fmt_value(x) for x in collapsed)} every weight of both networks, the output "
                   f"layer's included, decays to nearly zero within the run (output layer's norm below 1e-3), and "
                   f"both end at chance: batch norm does not protect the layers no norm follows. There the normalized "
                   f"layers' variance falls below batch norm's eps, so they are no longer scale-invariant and no "
                   f"effective learning rate is recorded.")
    if width.verdict == "supported":
        out.append("As claimed, batch norm trains over a wider range of decays: its normalized layers turn decay into "
                   "a larger effective learning rate instead of a smaller network.")
    return out
