"""What batch norm costs: memory autograd keeps for backward and time per training step (claim C9).

Claim tested: C9, batch norm costs extra memory and time; and the answer In-Place ABN gives to
it, that batch norm fused with an invertible activation keeps much less. Three variants of one
network are measured side by side in one job, from the same initial weights and on the same
batches: no norm (``none``), batch norm then leaky ReLU (``batch``: ``normlab.BatchNorm`` and
``nn.LeakyReLU``, as the lab builds a block) and normlab's fused ``BatchNormAct`` with leaky ReLU
(``batch_act``, which keeps only its output for backward). The networks are the lab's MLP and
CNN (grid axis ``model.kind``) at two sizes (grid axis ``params.scale``: the hidden widths are
``params.mlp_width`` or ``params.cnn_channels`` times the scale, ``params.depth`` blocks).

Measured per variant, in every job (one job = one grid point and one seed = one repeat):

* ``saved_bytes``: the bytes autograd keeps for backward over one forward pass and the loss,
  at the initial weights, counted by :func:`saved_bytes`: every tensor saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once (tensors that share
  memory, e.g. a layer's output that the activation and the next layer both save, count
  once), leaving out the storages that exist before the forward and outlive it: parameters,
  buffers, the input batch and the targets. What remains is the activation memory of a step
  (plus BN's per-channel statistics), the quantity In-Place ABN reduces. Counted the same way
  on any device, so it holds on the CPU.
* ``time_ms``: the median over ``train.steps`` interleaved rounds of one full training step
  (``zero_grad``, forward, cross-entropy, backward, optimizer step) after ``params.warmup``
  untimed rounds; in each round every variant takes one step on the same batch, in an order
  that rotates from round to round, with one torch thread and Python's garbage collector
  paused (as ``benchmarks/bench_act.py``). On the CPU a step's time is the process's CPU time
  (:func:`step_clock`: a step is not charged for the time the scheduler gives other processes,
  the bulk of wall-time noise on a shared machine); on CUDA the wall time, synchronized before
  and after the step.
* ``cuda_peak_bytes`` (CUDA only): ``torch.cuda.max_memory_allocated`` over one training step
  minus the memory allocated when it starts (the step's own peak: activations, gradients and
  temporaries), the peak statistics reset before each variant.

Statistics, per grid point, per repeat (seed), from the variants of the same job:

    saved BN / none,   time BN / none          (C9 a: batch norm costs memory and time)
    saved fused / BN,  time fused / BN         (C9 b: the fused layer saves memory, at small time cost)

where a time ratio A / B is the median over the rounds of ``t_A,i / t_B,i`` (:func:`paired_ratio`:
the steps of a round run back to back under the same load, so load that drifts between rounds
cancels) and a memory ratio is that of the saved bytes.

Their geometric means over the repeats with 95% t-intervals of the logs go to four declared
rules, one finding per statistic and grid point, combined into one C9 finding
(:func:`~normlab.lab.verdicts.combine`: supported only if every part is): (a) saved and time ratio BN / none above 1x
(CI above 1); (b) saved ratio fused / BN below 1x (CI below 1) and time ratio fused / BN below
``params.max_fused_time_ratio`` (1.10x: CI wholly below it; wholly above is "not supported").
1.10 is declared as "a small time cost": In-Place ABN reports 0.8-2% more compute with its own
CUDA kernels; normlab's fused layer is an autograd Function over torch's kernels with some
Python per call, ``benchmarks/bench_act.py`` accepts up to 1.15x for the layer alone, and a
whole step (matmuls, optimizer) dilutes the layer's share, so 10% for a step is a small cost
that a shared 2-core machine can still resolve with a few repeats. The verdicts rest on ratios
measured side by side in one job, never on absolute times, which depend on the machine.

Also reported, without a verdict: the saved bytes of ``none`` and ``batch`` with the activation
run in place (``nn.LeakyReLU(inplace=True)``, torch's cheapest composition), beside which
In-Place ABN's "up to 50%" is stated: batch norm + in-place activation keeps the norm's input
and the activation's output (2 tensors per block), the fused layer its output only (1).

Published anchor: In-Place ABN (Rota Bulo, Porzi & Kontschieder, CVPR 2018): up to 50% of the
activation memory saved for 0.8-2% more computation.

The lab's ``batch_act`` norm (:func:`normlab.lab.models.build_model`) computes the block's
activation inside the ``BatchNormAct``, the block's own activation being an ``nn.Identity``;
:func:`fuse_blocks` checks that every block is built so.

Forms: full 5 seeds x 100 timed rounds (3 warm-up rounds), batch 64, SGD lr 0.05, mnist-5k;
quick 3 seeds x 30 timed rounds: about 50 s of CPU (user), so about 25 s wall on 2 free cores
with ``--jobs 2`` (2.5 min wall on a shared machine at load 8). The CNN at scale 4 takes most of it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable


from ..config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from ..intervals import geometric_mean_ci
from ..stepcost import (FUSABLE, VARIANTS, VariantCost, build_variant, cuda_step_peak, fuse_blocks,  # noqa: F401
                        measure_costs, paired_ratio, saved_bytes, step_clock)
from ..rows import group_jobs, value
from ..verdicts import Finding, Rule, combine
from .base import Experiment, FigureSpec, Summary
from .registry import register

__all__ = ["VARIANTS", "Cost", "VariantCost", "build_variant", "cuda_step_peak", "fuse_blocks", "measure_costs",
           "paired_ratio", "saved_bytes", "step_clock"]

WORDS = {"none": "no norm", "batch": "BN + leaky ReLU", "batch_act": "fused BatchNormAct"}
MIB = 2.0 ** 20
STATS = ("saved_bn", "time_bn", "saved_fused", "time_fused")

PUBLISHED = [
    "Rota Bulo, Porzi & Kontschieder 2018 (In-Place ABN, CVPR): batch norm fused with an invertible "
    "activation (leaky ReLU) keeps only its output for backward; up to 50% of the activation memory saved "
    "(vs batch norm + in-place activation) for 0.8-2% more computation (their CUDA kernels, ResNet/ResNeXt/"
    "WideResNet training).",
    "No published number for the cost of batch norm itself against no norm; it is folklore that BN adds a "
    "memory-bound pass over every activation and keeps its input for backward.",
]


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _gm_ci(ratios: list[float]) -> tuple[float | None, float | None, float | None]:
    return geometric_mean_ci(ratios) if ratios else (None, None, None)


def _x(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _ci(est: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    if est is None:
        return "n/a"
    return f"{est:.{digits}f}x [{low:.{digits}f}, {high:.{digits}f}]"


class Cost(Experiment):
    name = "cost"
    claim = ("C9: batch norm costs extra memory and time; fused with an invertible activation (In-Place ABN) "
             "it keeps much less memory at a small time cost")
    title = "The cost of batch norm: memory kept for backward and time per step, none vs BN vs fused BatchNormAct"
    description = ("MLP and CNN at two sizes, leaky ReLU: bytes autograd keeps and time per step, "
                   "none vs BN vs BatchNormAct, side by side")
    claims = ("C9",)
    derived = {
        "model.widths": "[params.mlp_width (MLP) or params.cnn_channels (CNN) x params.scale] x params.depth",
        "model.norm": "every job measures none, batch and batch_act side by side (the rows' arms)",
    }
    figures = (
        FigureSpec(kind="grid", metric="saved_mib", axis="params.scale", panel="model.kind", logy=True,
                   title="Memory autograd keeps for backward per training step", ylabel="MiB saved for backward",
                   caption="Activation bytes saved during one forward pass and the loss (each storage once; "
                           "parameters and the input batch left out), by network size; one line per variant."),
        FigureSpec(kind="grid", metric="time_vs_none", axis="params.scale", panel="model.kind",
                   levels=((1.0, "no norm"),),
                   title="Time per training step relative to no norm (same job, side by side)",
                   ylabel="step time / no-norm step time (median over rounds)",
                   caption="Per job, the median over the interleaved rounds of each variant's step time divided "
                           "by that of no norm in the same round; line: mean over repeats (seeds), band: their range."),
        FigureSpec(kind="grid", metric="time_vs_batch", axis="params.scale", panel="model.kind",
                   levels=((1.0, "BN + leaky ReLU"), (1.1, "declared bound 1.10x")),
                   title="Time per training step relative to BN + leaky ReLU (same job, side by side)",
                   ylabel="step time / BN step time (median over rounds)",
                   caption="As the figure before, relative to BN + leaky ReLU (at 1): the fused layer's time cost, "
                           "which C9 (b) expects below the declared bound (params.max_fused_time_ratio)."),
        FigureSpec(kind="grid", metric="cuda_peak_mib", axis="params.scale", panel="model.kind", logy=True,
                   title="Peak CUDA memory of a training step (CUDA runs only)",
                   ylabel="MiB above the memory allocated before the step",
                   caption="torch.cuda.max_memory_allocated over one step minus the allocation at its start; "
                           "empty when the run was on the CPU."),
    )

    def default_config(self) -> ExperimentConfig:
        return ExperimentConfig(
            experiment=self.name,
            data=DataConfig(name="mnist-5k"),
            # Leaky ReLU (slope 0.01) is In-Place ABN's activation: invertible, so the fused layer
            # can rebuild its input from its output and keep the output alone.
            model=ModelConfig(kind="mlp", widths=[128, 128, 128], activation="leaky_relu"),
            # train.steps = timed rounds; each round is one training step of every variant.
            train=TrainConfig(steps=100, batch_size=64, optimizer="sgd", lr=0.05, seeds=5, eval_every=100,
                              checkpoint_every=100),
            arms={"side_by_side": {}},
            grid={"model.kind": ["mlp", "cnn"], "params.scale": [1, 4]},
            params={"scale": 1, "mlp_width": 128, "cnn_channels": 16, "depth": 3, "warmup": 3,
                    "max_fused_time_ratio": 1.10},
        )

    def quick_config(self) -> ExperimentConfig:
        return apply_overrides(self.default_config(), {"train.steps": 30, "train.seeds": 3, "train.eval_every": 30,
                                                       "train.checkpoint_every": 30})

    def job_config(self, config: ExperimentConfig) -> ExperimentConfig:
        """Widths from the kind and scale (see :attr:`derived`); checks that the network can be fused."""
        p = config.params
        if config.model.kind not in ("mlp", "cnn"):
            raise ConfigError(f"experiment cost measures the lab's MLP and CNN: model.kind must be 'mlp' or 'cnn', "
                              f"got {config.model.kind!r}.")
        if config.model.activation not in FUSABLE:
            raise ConfigError(f"experiment cost needs an activation BatchNormAct fuses, one of {sorted(FUSABLE)}; "
                              f"got model.activation={config.model.activation!r}. Use leaky_relu (In-Place ABN's).")
        if config.model.placement != "before":
            raise ConfigError(f"experiment cost fuses the norm with the activation that follows it: model.placement "
                              f"must be 'before', got {config.model.placement!r}.")
        for key in ("scale", "mlp_width", "cnn_channels"):
            v = p.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"experiment cost: params.{key} must be a positive number, got {v!r}.")
        for key, least in (("depth", 1), ("warmup", 0)):
            v = p.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"experiment cost: params.{key} must be an int >= {least}, got {v!r}.")
        base = p["mlp_width"] if config.model.kind == "mlp" else p["cnn_channels"]
        config.model.widths = [max(1, round(base * p["scale"]))] * p["depth"]
        return config

    def custom_job(self, job: Any, data: Any) -> list[dict[str, Any]]:
        from ..job import resolve_device

        config = job.train_config()
        device = resolve_device(config.train.device)
        started = time.perf_counter()
        costs = measure_costs(config, data, job.seed, device)
        elapsed = time.perf_counter() - started
        point = dict(job.point)
        rows = []
        for variant, cost in costs.items():
            probes: dict[str, float] = {
                "saved_bytes": float(cost.saved_bytes), "saved_mib": cost.saved_bytes / MIB,
                "saved_vs_none": cost.saved_bytes / costs["none"].saved_bytes,
                "saved_vs_batch": cost.saved_bytes / costs["batch"].saved_bytes,
                "time_ms": cost.time_ms, "time_vs_none": paired_ratio(cost.round_ms, costs["none"].round_ms),
                "time_vs_batch": paired_ratio(cost.round_ms, costs["batch"].round_ms),
            }
            if cost.saved_bytes_inplace is not None:
                probes["saved_inplace_mib"] = cost.saved_bytes_inplace / MIB
            if cost.cuda_peak_bytes is not None:
                probes.update(cuda_peak_bytes=float(cost.cuda_peak_bytes), cuda_peak_mib=cost.cuda_peak_bytes / MIB,
                              cuda_peak_vs_none=cost.cuda_peak_bytes / max(costs["none"].cuda_peak_bytes, 1),
                              cuda_peak_vs_batch=cost.cuda_peak_bytes / max(costs["batch"].cuda_peak_bytes, 1))
            row = {"step": config.train.steps, "arm": variant, "seed": job.seed}
            if point:
                row["point"] = point
            row.update(wall_time=elapsed, probes=probes, round_ms=cost.round_ms, device=device.type,
                       clock="process CPU time" if device.type == "cpu" else "wall time, synchronized",
                       widths=list(config.model.widths))
            rows.append(row)
        return rows

    def rules(self, params: dict[str, Any]) -> dict[str, Rule]:
        """The verdict rules, fixed before the run by the params (one per statistic; see the module docstring)."""
        band = params.get("max_fused_time_ratio", 1.10)
        return {
            "saved_bn": Rule("C9", "bytes autograd keeps for backward per step, BN / no norm (geometric mean)",
                             expected="batch norm keeps more activation memory than no norm (ratio CI above 1x)",
                             null=1.0, log=True, digits=2, published="no published number",
                             label="memory BN / none"),
            "time_bn": Rule("C9", "time per training step, BN / no norm (median over interleaved rounds of the "
                                  "per-round ratio; geometric mean)",
                            expected="a training step takes longer with batch norm (ratio CI above 1x)",
                            null=1.0, log=True, digits=2, published="no published number",
                            label="time BN / none"),
            "saved_fused": Rule("C9", "bytes autograd keeps for backward per step, fused BatchNormAct / BN + activation",
                                expected="the fused layer keeps less activation memory than BN + activation "
                                         "(ratio CI below 1x)",
                                null=1.0, direction="less", log=True, digits=2,
                                published="In-Place ABN: up to 50% of activation memory saved",
                                label="memory fused / BN"),
            "time_fused": Rule("C9", "time per training step, fused BatchNormAct / BN + activation",
                               expected=f"the fused layer's time cost is small: ratio CI wholly below {band:g}x",
                               null=band, direction="less", log=True, digits=2,
                               published="In-Place ABN: 0.8-2% more computation",
                               label="time fused / BN"),
        }

    # -- summary -------------------------------------------------------------------------------

    @staticmethod
    def _points(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[tuple[tuple[str, Any], ...]]:
        """The grid points in the rows, in the config grid's order."""
        grid = config.get("grid", {})
        seen = list(dict.fromkeys(tuple((row.get("point") or {}).items()) for row in rows))

        def order(point):
            d = dict(point)
            return [list(grid.get(a, [])).index(d[a]) if d.get(a) in grid.get(a, []) else len(grid.get(a, []))
                    for a in grid]

        return sorted(seen, key=order)

    @staticmethod
    def _where(point: tuple[tuple[str, Any], ...], config: dict[str, Any]) -> tuple[str, str]:
        """``("mlp x4", "3 x 512")``: a point's short label and its hidden widths."""
        d, params = dict(point), config.get("params", {})
        kind = d.get("model.kind", config.get("model", {}).get("kind", "?"))
        scale = d.get("params.scale", params.get("scale", 1))
        base = params.get("mlp_width" if kind == "mlp" else "cnn_channels")
        depth = params.get("depth")
        widths = f"{depth} x {round(base * scale)}" if base and depth else "?"
        return f"{kind} x{scale:g}" if isinstance(scale, (int, float)) else f"{kind} x{scale}", widths

    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        params = config.get("params", {})
        rules = self.rules(params)
        band = params.get("max_fused_time_ratio", 1.10)
        # {point: {seed: {variant: row}}}: a job's three rows share point and seed.
        jobs: dict[tuple, dict[Any, dict[str, dict[str, Any]]]] = {}
        for job, job_rows in group_jobs(rows).items():
            jobs.setdefault(job.point, {}).setdefault(job.seed, {})[job.arm] = job_rows[-1]
        points = self._points(rows, config)

        def ratios(point, key: str, num: str, den: str) -> list[float]:
            """Per repeat, the ratio ``num / den`` the job measured (probe ``{key}_vs_{den}`` of ``num``'s row)."""
            out = []
            for seed in sorted(jobs.get(point, {})):
                row = jobs[point][seed].get(num)
                r = value(row, f"{key}_vs_{den}") if row is not None else None
                if r is not None and r > 0:
                    out.append(r)
            return out

        def mean_of(point, variant: str, key: str) -> float | None:
            vs = [v for by in jobs.get(point, {}).values() if variant in by and (v := value(by[variant], key)) is not None]
            return sum(vs) / len(vs) if vs else None

        specs = {"saved_bn": ("saved", "batch", "none"), "time_bn": ("time", "batch", "none"),
                 "saved_fused": ("saved", "batch_act", "batch"), "time_fused": ("time", "batch_act", "batch")}
        findings: list[Finding] = []
        by_stat: dict[str, dict[tuple, Finding]] = {s: {} for s in STATS}
        measured: dict[str, dict[tuple, tuple]] = {s: {} for s in STATS}
        for point in points:
            where, _ = self._where(point, config)
            for stat in STATS:
                rule = dataclasses.replace(rules[stat], label=f"{rules[stat].label}, {where}")
                rs = ratios(point, *specs[stat])
                est = _gm_ci(rs)
                measured[stat][point] = est
                finding = (rule.decide(*est, n=len(rs)) if rs else
                           rule.decide(None, None, None, n=0, note="no job has both variants"))
                by_stat[stat][point] = finding
                findings.append(finding)

        table: list[list[str]] = []
        for point in points:
            where, widths = self._where(point, config)
            for variant in VARIANTS:
                saved = mean_of(point, variant, "saved_bytes")
                t = mean_of(point, variant, "time_ms")
                peak = mean_of(point, variant, "cuda_peak_bytes")
                vs_none_t = _ci(*_gm_ci(ratios(point, "time", variant, "none"))) if variant != "none" else ""
                vs_bn_t = _ci(*_gm_ci(ratios(point, "time", variant, "batch"))) if variant == "batch_act" else ""
                vs_none_m = _x(_gm_ci(ratios(point, "saved", variant, "none"))[0]) if variant != "none" else ""
                vs_bn_m = _x(_gm_ci(ratios(point, "saved", variant, "batch"))[0]) if variant == "batch_act" else ""
                table.append([where, widths, variant,
                              "n/a" if saved is None else f"{saved / MIB:.3f}", vs_none_m, vs_bn_m,
                              "n/a" if t is None else f"{t:.2f}", vs_none_t, vs_bn_t,
                              "-" if peak is None else f"{peak / MIB:.2f}"])

        def span(stat: str) -> str:
            ests = [e[0] for e in measured[stat].values() if e[0] is not None]
            if not ests:
                return "n/a"
            lo, hi = min(ests), max(ests)
            return f"{lo:.2f}x" if math.isclose(lo, hi, rel_tol=5e-3) else f"{lo:.2f}x to {hi:.2f}x"

        verdict = {s: _verdicts(by_stat[s].values()) for s in STATS}
        headline = (f"Over {len(points)} network(s), batch norm kept {span('saved_bn')} the activation bytes of no "
                    f"norm ({verdict['saved_bn']}) and took {span('time_bn')} its time per step "
                    f"({verdict['time_bn']}); the fused BatchNormAct kept {span('saved_fused')} of BN + leaky ReLU's "
                    f"bytes ({verdict['saved_fused']}) at {span('time_fused')} its time per step "
                    f"({verdict['time_fused']}; a small cost means below {band:g}x). Geometric means over repeats, "
                    f"each ratio measured side by side in one job.")

        notes = self._notes(points, jobs, config, measured, by_stat, mean_of, ratios, band)
        combined = combine(
            "C9", findings,
            statistic="per network: bytes kept for backward and time per step, BN / none and fused / BN",
            expected=f"batch norm keeps more activation memory and takes more time per step than no norm (ratio CIs "
                     f"above 1x); the fused BatchNormAct keeps less than BN + activation (CI below 1x) at a small "
                     f"time cost (CI below {band:g}x); at every network measured",
            published="In-Place ABN: up to 50% of activation memory saved for 0.8-2% more computation")
        return Summary.of_findings(
            self, [combined], headline=f"C9 {combined.verdict}. " + headline,
            columns=["network", "hidden widths", "variant", "saved MiB / step", "saved vs none", "saved vs BN",
                     "ms / step (median)", "time vs none [95% CI]", "time vs BN [95% CI]", "CUDA peak MiB"],
            rows=table, published=PUBLISHED, notes=notes,
        )

    def _notes(self, points, jobs, config, measured, by_stat, mean_of, ratios, band) -> list[str]:
        notes: list[str] = []
        seeds = sorted({s for by in jobs.values() for s in by})
        device = sorted({row.get("device", "?") for by in jobs.values() for vs in by.values() for row in vs.values()})
        notes.append(
            "What is counted as memory: the storages of every tensor autograd saves for backward during one forward "
            "pass and the loss, each storage once (a layer's output that the activation and the next layer both save "
            "counts once), without the parameters, buffers, input batch and targets, which exist anyway. Per block "
            "this is, in tensors of the block's output size: no norm 2 (the activation's input and the next "
            "layer's input), BN + leaky ReLU 3 (BN's input too), fused BatchNormAct 1 (its output, which the next "
            "layer keeps anyway); plus the first layer's input-side tensors and the head, the same in every variant. "
            "BatchNormAct's per-channel statistics held on its autograd context (not a saved tensor) are left out; "
            "they are C numbers per layer.")
        parts = []
        for point in points:
            where, _ = self._where(point, config)
            fused, bn_in, none_in = (mean_of(point, "batch_act", "saved_bytes"),
                                     mean_of(point, "batch", "saved_inplace_mib"),
                                     mean_of(point, "none", "saved_inplace_mib"))
            if fused is not None and bn_in:
                parts.append(f"{where}: fused / (BN + in-place) = {fused / MIB / bn_in:.2f}x"
                             + (f", fused / (none + in-place) = {fused / MIB / none_in:.2f}x" if none_in else ""))
        if parts:
            notes.append(
                "In-Place ABN's 'up to 50%' is measured against BN + an in-place activation (2 tensors per block); "
                "the lab's blocks run the activation out of place (3 tensors), so the fused layer saves more here. "
                "Against the in-place composition (measured in the same job, not timed): " + "; ".join(parts)
                + ". A fused layer keeps about what a network without norm and with in-place activations keeps.")
        # What the figures show, in numbers from the same rows.
        fig1, fig2, ordered = [], [], []
        for point in points:
            where, _ = self._where(point, config)
            mib = {v: mean_of(point, v, "saved_mib") for v in VARIANTS}
            if all(m is not None for m in mib.values()):
                fig1.append(f"{where}: " + ", ".join(f"{v} {mib[v]:.2f}" for v in VARIANTS))
                ordered.append(mib["batch"] > mib["none"] > mib["batch_act"])
            rel = {v: _gm_ci(ratios(point, "time", v, "none"))[0] for v in ("batch", "batch_act")}
            if all(r is not None for r in rel.values()):
                fig2.append(f"{where}: batch {rel['batch']:.2f}x, batch_act {rel['batch_act']:.2f}x")
        if fig1:
            order = ("The lines keep the order batch > none > batch_act at every size." if all(ordered) else
                     "The order batch > none > batch_act does not hold at every size (see the numbers).")
            notes.append("Figure 1 (MiB saved for backward, log scale; lines: variants, panels: MLP and CNN, x: scale): "
                         + "; ".join(fig1) + ". " + order)
        if fig2:
            notes.append("Figure 2 (time per step relative to no norm, which sits at 1): " + "; ".join(fig2) + ".")
        fig3 = []
        for point in points:
            where, _ = self._where(point, config)
            est = measured["time_fused"].get(point, (None,))[0]
            none = _gm_ci(ratios(point, "time", "none", "batch"))[0]
            if est is not None:
                fig3.append(f"{where}: batch_act {est:.2f}x" + (f", none {none:.2f}x" if none is not None else ""))
        if fig3:
            notes.append(f"Figure 3 (time per step relative to BN + leaky ReLU, which sits at 1; C9 (b) expects the "
                         f"fused layer below {band:g}x): " + "; ".join(fig3) + ".")
        notes.append(
            f"Timing: {config.get('train', {}).get('steps', '?')} timed rounds per job after "
            f"{config.get('params', {}).get('warmup', 3)} warm-up rounds, one torch thread, the order of the variants "
            f"rotating each round, on {', '.join(device)}; {len(seeds)} repeat(s) (seeds), each a whole measurement "
            "in its own job. Jobs running side by side (--jobs) share the CPU: absolute times (the table) move with "
            "the load, the ratios of one job much less, and only those enter the verdicts. On the CPU a step's time is the "
            "process's CPU time, not charged for the time the scheduler gives other processes.")
        if "cuda" not in device:
            notes.append("Figure 4 (peak CUDA memory) is empty: this run was on the CPU, where peak allocation is not "
                         "tracked; the saved-bytes count above is the device-independent memory measure.")
        else:
            parts = []
            for point in points:
                where, _ = self._where(point, config)
                r = {v: _gm_ci(ratios(point, "cuda_peak", v, "batch"))[0] for v in ("none", "batch_act")}
                if all(x is not None for x in r.values()):
                    parts.append(f"{where}: none / BN {r['none']:.2f}x, fused / BN {r['batch_act']:.2f}x")
            if parts:
                notes.append("Figure 4, peak CUDA memory of a step (activations, gradients and temporaries, so the "
                             "ratios are closer to 1 than the saved-bytes ones): " + "; ".join(parts) + ".")
        slow = [p for p, f in by_stat["time_fused"].items() if f.verdict == "not supported"]
        if slow:
            names = ", ".join(self._where(p, config)[0] for p in slow)
            shrinking = []
            for kind in dict.fromkeys(dict(p).get("model.kind") for p in points):
                series = [(dict(p).get("params.scale"), measured["time_fused"][p][0]) for p in points
                          if dict(p).get("model.kind") == kind and measured["time_fused"][p][0] is not None]
                series.sort(key=lambda sv: sv[0])
                if len(series) > 1 and series[-1][1] < series[0][1]:
                    shrinking.append(f"{kind} {series[0][1]:.2f}x at scale {series[0][0]:g} to {series[-1][1]:.2f}x "
                                     f"at {series[-1][0]:g}")
            notes.append(
                f"The fused layer's step took more than {band:g}x BN + leaky ReLU's at {names}: a cost this "
                "implementation carries, not In-Place ABN's 0.8-2% (their CUDA kernels, on large activations). "
                "normlab's BatchNormAct is an autograd Function whose backward recovers the normalized input from "
                "the saved output and forms the gradient in several torch calls and some Python, where torch's "
                "batch norm backward is one kernel; a cost per call, which weighs most where layers are small"
                + (" (the ratio falls with size: " + "; ".join(shrinking) + ")" if shrinking else "") + ".")
        faster = [p for p, f in by_stat["time_bn"].items() if f.verdict == "not supported"]
        if faster:
            names = ", ".join(self._where(p, config)[0] for p in faster)
            notes.append(f"At {names} the step with batch norm was faster than without (time CI below 1x): "
                         "there, in this implementation and on this machine, BN's extra pass over the activations "
                         "cost less than the time it saved elsewhere in the step; its memory cost holds regardless.")
        return notes


def _verdicts(findings: Iterable[Finding]) -> str:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.verdict] = counts.get(f.verdict, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items()) or "nothing measured"


register(Cost())
