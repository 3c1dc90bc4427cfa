"""The notes of li2019-variance-shift that read the per-layer profile and interpret the verdict."""

from __future__ import annotations

from typing import Any

from ..rows import group_jobs, value
from ..verdicts import Finding

__all__ = ["interpretation", "profile_note"]

AXIS = "model.dropout"


def _final_profile(job_rows: list[dict[str, Any]], key: str) -> list[float]:
    """``[{key}_1, {key}_2, ...]`` at the job's last evaluation (the values present, in order)."""
    if not job_rows:
        return []
    out, i = [], 1
    while (v := value(job_rows[-1], f"{key}_{i}")) is not None:
        out.append(v)
        i += 1
    return out


def profile_note(rows: list[dict[str, Any]], rate: float) -> str:
    """What the profile figure shows at ``rate``: each batch-norm arm's mean shift per layer, and
    the direction (running variance above or below the test-time one)."""
    parts = []
    for arm in ("bn-block", "bn-head"):
        shifts, ratios = [], []
        for job, job_rows in group_jobs(rows).items():
            if job.arm == arm and dict(job.point).get(AXIS) == rate:
                if p := _final_profile(job_rows, "var_shift"):
                    shifts.append(p)
                    ratios.append(_final_profile(job_rows, "var_ratio"))
        if not shifts:
            continue
        depth = min(map(len, shifts))
        mean = [sum(p[i] for p in shifts) / len(shifts) for i in range(depth)]
        text = f"{arm}: " + ", ".join(f"layer {i + 1} {m:.3f}" for i, m in enumerate(mean))
        usable = [r for r in ratios if len(r) >= depth]
        if usable and depth > 1:
            later = [sum(r[i] for r in usable) / len(usable) for i in range(1, depth)]
            above = sum(x > 1 for x in later)
            text += (f" (running / test variance, layers 2-{depth}: " + ", ".join(f"{x:.3f}" for x in later)
                     + (("; the running variance is the larger, as dropout before a norm predicts" if above == len(later)
                         else "; the running variance is not the larger in every layer, as dropout before a norm "
                              "would make it") if arm == "bn-block" else "") + ")")
        parts.append(text)
    if not parts:
        return ""
    return (f"Figure \"Variance shift per batch norm at the end of training\", panel dropout = {rate:g} (mean over "
            f"seeds): " + "; ".join(parts) + ". Without dropout before a norm the shift is not exactly 1: the running "
            f"averages lag the changing weights and the test set is finite; the panel at rate 0 shows that floor.")


def interpretation(acc: Finding, shift: Finding, gaps: dict, recovered: tuple[float, float, float] | None,
                   rate: float, steps: int) -> list[str]:
    """Why the verdicts may differ from Li et al.'s, from what this run shows. ``recovered``: the
    bn-block arm's accuracy gain at ``rate`` from statistics recomputed without dropout (points,
    mean and CI)."""
    out = []
    bn, none = gaps.get(("bn", rate)), gaps.get(("none", rate))
    if bn is not None and none is not None:
        out.append(f"Control without batch norm: at rate {rate:g} dropout once before the output layer beats dropout "
                   f"in every block by {none[0]:+.2f} points [{none[1]:+.2f}, {none[2]:+.2f}] (with batch norm: "
                   f"{bn[0]:+.2f}). "
                   + ("The gap with batch norm is about the gap without it, so here it comes from the amount of "
                      "dropout (four layers against one) more than from batch norm's variance shift."
                      if abs(bn[0] - none[0]) < max(0.5, abs(bn[0]) / 3) else
                      "Batch norm widens the gap beyond what the amount of dropout alone gives, as the variance "
                      "shift predicts." if bn[0] > none[0] else
                      "Batch norm narrows the gap: with it, dropout in every block costs less than without it, so in "
                      "this sense batch norm works well with dropout even in the order Li et al. warn against."))
    if recovered is not None and bn is not None:
        text = (f"Li et al.'s check: recomputing the batch norms' statistics with dropout off changes the accuracy of "
                f"dropout in every block by {recovered[0]:+.2f} points [{recovered[1]:+.2f}, {recovered[2]:+.2f}] at "
                f"rate {rate:g}")
        if recovered[1] <= 0 <= recovered[2]:
            text += ": no accuracy lost to the variance shift can be told from none."
        elif recovered[1] > 0 and bn[0] > 0:
            share = recovered[0] / bn[0]
            text += (f", {share:.0%} of its gap to dropout at the head ({bn[0]:+.2f}): "
                     + ("most of the gap is the variance shift." if share >= 0.5 else
                        "the variance shift explains only part of the gap; the rest comes from training with more "
                        "dropout (four layers against one)."))
        else:
            text += "."
        out.append(text)
    if shift.verdict == "supported" and acc.verdict in ("not supported", "inconclusive"):
        out.append("The variance shift Li et al. describe is there (the batch norms fed by dropout keep a running "
                   "variance above the test-time one), but it costs little accuracy here. Possible reasons: the "
                   "shift mostly rescales each layer's output, and the next batch norm and the argmax of the output "
                   "are insensitive to much of a rescaling; four layers accumulate far less shift than Li et al.'s "
                   "100-layer DenseNet; and MNIST digits leave a wide margin that a small distortion rarely crosses.")
    if shift.verdict in ("not supported", "mixed") and shift.estimate is not None:
        out.append(f"The variance shift with dropout in every block is {shift.estimate:.2f}x that with dropout after "
                   f"the batch norms, less than expected: the weight layer between the dropout and the next batch "
                   f"norm mixes 100 dropped units, which averages much of dropout's extra variance away (Li et al., "
                   f"Sec. 3.3, find the shift smaller when a weight layer sits between, in wide layers).")
    shift_explains = recovered is not None and recovered[1] > 0 and bn is not None and recovered[0] >= 0.5 * bn[0]
    if acc.verdict == "supported" and shift.verdict == "supported":
        if recovered is None or shift_explains:
            out.append("Both parts agree with Li et al.: the order dropout -> batch norm shifts the variance and costs "
                       "accuracy; dropout after the last batch norm avoids both.")
        else:
            out.append("Both parts hold, as the rules ask, but the recalibration check separates them: statistics "
                       "recomputed without dropout recover little or none of the gap, so here the accuracy that dropout "
                       "in every block costs comes from training with more dropout, not from the variance shift at "
                       "test time. In Li et al.'s reading the shift causes the loss; in this network the shift is real "
                       "(see the profile figure) but nearly harmless.")
    if acc.verdict == "not supported" and acc.high is not None and acc.high < 0:
        out.append(f"Dropout in every block did better than dropout at the head after {steps} steps: its stronger "
                   f"regularization helps a small training set more than its variance shift hurts.")
    return out
