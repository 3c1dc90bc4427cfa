"""Speed of normlab's layers against their torch.nn counterparts, side by side in one process.

For every normlab layer with a torch counterpart (BatchNorm1d/2d/3d, InstanceNorm2d, GroupNorm,
LayerNorm, RMSNorm) and a set of CPU float32 shapes and memory formats, this times

* ``forward``:          ``y = layer(x)`` with autograd recording (as in a training step), and
* ``forward+backward``: ``y = layer(x); y.backward(g)`` with a fixed upstream gradient ``g``,

for a normlab layer and a torch layer built with identical state, in training mode. Each case is
warmed up, then the two implementations are interleaved run by run (alternating which goes
first) so that both see the same machine noise; the report gives medians per implementation,
the ratio normlab/torch of the medians and the spread of the per-pair ratios.

Usage::

    python benchmarks/bench_layers.py                    # full run, writes benchmarks/results/layers.json
    python benchmarks/bench_layers.py --quick            # small shapes, a few seconds (smoke test)
    python benchmarks/bench_layers.py --only BatchNorm2d --repeats 21 --out /tmp/bn2d.json

``--only`` takes a layer name (case-insensitive; a comma-separated list for several).

The machine may be shared: every measurement records the share of the CPU that other processes
used meanwhile (from ``/proc/stat``), and a measurement disturbed by more than ``--max-foreign``
is taken again after waiting for a quieter moment (``--attempts``, ``--wait``); the least
disturbed attempt is reported, the others are kept in the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import normlab

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "layers.json"
WARMUP = 3
# Short cases are repeated until about this many seconds of rounds, up to MAX_REPEATS rounds.
MIN_TIMED_S = 1.5
MAX_REPEATS = 201
DEFAULT_REPEATS = 21

CL = "channels_last"
CF = "contiguous"


@dataclass(frozen=True)
class Case:
    layer: str  # normlab / torch class name
    shape: tuple[int, ...]
    fmt: str  # "contiguous" | "channels_last" (channels_last_3d for 5-D input)
    make_normlab: Callable[[], nn.Module]
    make_torch: Callable[[], nn.Module]
    config: str  # constructor call, for the record


def _layer_factories(name: str, channels: int) -> tuple[Callable, Callable, str]:
    if name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        return (lambda: getattr(normlab, name)(channels), lambda: getattr(nn, name)(channels),
                f"{name}({channels})")
    if name == "InstanceNorm2d":
        # torch's defaults: affine=False, track_running_stats=False.
        return (lambda: normlab.InstanceNorm2d(channels), lambda: nn.InstanceNorm2d(channels),
                f"InstanceNorm2d({channels})")
    if name == "GroupNorm":
        groups = 32 if channels % 32 == 0 else 1
        return (lambda: normlab.GroupNorm(groups, channels), lambda: nn.GroupNorm(groups, channels),
                f"GroupNorm({groups}, {channels})")
    if name == "LayerNorm":
        return (lambda: normlab.LayerNorm(channels), lambda: nn.LayerNorm(channels),
                f"LayerNorm({channels})")
    if name == "RMSNorm":
        return (lambda: normlab.RMSNorm(channels), lambda: nn.RMSNorm(channels),
                f"RMSNorm({channels})")
    raise KeyError(name)


def build_cases(quick: bool) -> list[Case]:
    if quick:
        shapes_2d = [(8, 64, 16, 16), (16, 32, 8, 8)]
        shape_1d = (256, 128)
        shape_3d = (2, 8, 4, 8, 8)
    else:
        shapes_2d = [(64, 64, 56, 56), (256, 256, 14, 14)]
        shape_1d = (4096, 1024)
        shape_3d = (8, 32, 16, 32, 32)
    cases: list[Case] = []
    for shape in shapes_2d:
        for name in ("BatchNorm2d", "InstanceNorm2d", "GroupNorm"):
            for fmt in (CF, CL):
                nl, tc, cfg = _layer_factories(name, shape[1])
                cases.append(Case(name, shape, fmt, nl, tc, cfg))
    for name in ("BatchNorm1d", "LayerNorm", "RMSNorm"):
        channels = shape_1d[1]  # BatchNorm1d: C = dim 1; LayerNorm/RMSNorm: the last dim
        nl, tc, cfg = _layer_factories(name, channels)
        cases.append(Case(name, shape_1d, CF, nl, tc, cfg))
    for fmt in (CF, CL):
        nl, tc, cfg = _layer_factories("BatchNorm3d", shape_3d[1])
        cases.append(Case("BatchNorm3d", shape_3d, fmt, nl, tc, cfg))
    # Channel-innermost batch norm (2-D input, channels_last) computes accurate statistics by
    # default; these rows show the same layers with stable_stats=False (torch's kernel).
    for case in list(cases):
        if case.layer.startswith("BatchNorm") and (case.fmt == CL or len(case.shape) == 2):
            cls, channels = getattr(normlab, case.layer), case.shape[1]
            cases.append(Case(case.layer, case.shape, case.fmt,
                              lambda cls=cls, channels=channels: cls(channels, stable_stats=False),
                              case.make_torch, f"{case.config[:-1]}, stable_stats=False)"))
    return cases


def _to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == CF:
        return x.contiguous()
    mf = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=mf)


def _fmt_label(fmt: str, ndim: int) -> str:
    if fmt == CL and ndim == 5:
        return "channels_last_3d"
    if fmt == CF and ndim == 4:
        return "NCHW"
    if fmt == CF and ndim == 5:
        return "NCDHW"
    if fmt == CF:
        return "contiguous"
    return fmt


def _make_pair(case: Case, seed: int) -> tuple[nn.Module, nn.Module]:
    """Both layers in training mode with identical parameters and buffers (random affine)."""
    torch.manual_seed(seed)
    ref = case.make_torch()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # weight ~ 1 + 0.1 N(0, 1), bias ~ 0.1 N(0, 1)
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    ours = case.make_normlab()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    ours.train()
    ref.train()
    return ours, ref


def _clear_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def _run_forward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    t0 = time.perf_counter()
    y = layer(x)
    t1 = time.perf_counter()
    del y
    return t1 - t0


def _run_forward_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    _clear_grads(layer, x)
    t0 = time.perf_counter()
    y = layer(x)
    y.backward(g)
    t1 = time.perf_counter()
    del y
    return t1 - t0


PASSES = {"forward": _run_forward, "forward+backward": _run_forward_backward}


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_sample() -> tuple[float, float] | None:
    """(machine busy seconds over all CPUs, machine total seconds) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / _CLK_TCK, (busy + idle + iowait) / _CLK_TCK


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def foreign_cpu_share(before, after) -> float | None:
    """Share of the machine's CPU time (all cores) used by other processes (and the hypervisor's
    steal) between two samples ``(_cpu_sample(), _self_cpu())``: 0 on a quiet machine, 0.5 when
    another process keeps one of two cores busy."""
    (m0, s0), (m1, s1) = before, after
    if m0 is None or m1 is None or m1[1] - m0[1] < 0.3:  # too short for /proc/stat's 10 ms ticks
        return None
    return max(0.0, ((m1[0] - m0[0]) - (s1 - s0)) / (m1[1] - m0[1]))


def wait_for_quiet(max_foreign: float, max_wait_s: float, window_s: float = 2.0) -> float | None:
    """Sleep until other processes use at most ``max_foreign`` of the CPU over ``window_s``, or
    ``max_wait_s`` passes; returns the last window's share."""
    deadline = time.perf_counter() + max_wait_s
    share = None
    while True:
        before = (_cpu_sample(), _self_cpu())
        time.sleep(window_s)
        share = foreign_cpu_share(before, (_cpu_sample(), _self_cpu()))
        if share is None or share <= max_foreign or time.perf_counter() >= deadline:
            return share


def measure(case: Case, pass_name: str, repeats: int, seed: int = 0, min_timed_s: float = MIN_TIMED_S) -> dict:
    run = PASSES[pass_name]
    ours, ref = _make_pair(case, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = _to_format(torch.randn(case.shape, generator=gen), case.fmt).requires_grad_(True)
    g = _to_format(torch.randn(case.shape, generator=gen), case.fmt)

    # Outputs agree? (one call each on a fresh pair, so running statistics also start equal)
    y_ours, y_ref = ours(x), ref(x)
    max_abs_diff = float((y_ours - y_ref).detach().abs().max())
    same_format = bool(y_ours.stride() == y_ref.stride())
    del y_ours, y_ref

    warm = [run(ours, x, g) + run(ref, x, g) for _ in range(WARMUP)]
    # Short cases get more rounds (up to MAX_REPEATS), so that every case is timed for about
    # MIN_TIMED_S: a 3 ms case swings by +-15% at 21 rounds on a shared machine.
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_timed_s / max(min(warm), 1e-6))))
    t_ours: list[float] = []
    t_ref: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    sample0 = (_cpu_sample(), _self_cpu())
    try:
        for i in range(repeats):
            if i % 2 == 0:
                t_ours.append(run(ours, x, g))
                t_ref.append(run(ref, x, g))
            else:
                t_ref.append(run(ref, x, g))
                t_ours.append(run(ours, x, g))
    finally:
        sample1 = (_cpu_sample(), _self_cpu())
        if gc_was_enabled:
            gc.enable()
    _clear_grads(ours, x)
    _clear_grads(ref, x)

    med_ours = statistics.median(t_ours)
    med_ref = statistics.median(t_ref)
    pair = [a / b for a, b in zip(t_ours, t_ref)]
    return {
        "layer": case.layer + (" (stable_stats=False)" if "stable_stats=False" in case.config else ""),
        "config": case.config,
        "shape": list(case.shape),
        "format": _fmt_label(case.fmt, len(case.shape)),
        "pass": pass_name,
        "repeats": repeats,
        "normlab_ms": [t * 1e3 for t in t_ours],
        "torch_ms": [t * 1e3 for t in t_ref],
        "normlab_median_ms": med_ours * 1e3,
        "torch_median_ms": med_ref * 1e3,
        "normlab_min_ms": min(t_ours) * 1e3,
        "torch_min_ms": min(t_ref) * 1e3,
        "ratio": med_ours / med_ref,
        "pair_ratio_median": statistics.median(pair),
        "pair_ratio_min": min(pair),
        "pair_ratio_max": max(pair),
        "foreign_cpu_share": foreign_cpu_share(sample0, sample1),
        "output_max_abs_diff": max_abs_diff,
        "output_same_strides": same_format,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory instead of returning it to the OS.

    Every run allocates its output (and gradients) afresh; for tensors of a few MB glibc maps
    fresh pages each time, and the page faults (a third of a run's time at (64, 64, 56, 56), and
    its main source of jitter on this shared VM) would add the same cost to both sides, diluting
    the ratio toward 1 and spreading it. With freed memory kept, a run times the computation.
    ``--os-allocator`` measures with glibc's defaults instead. Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def environment() -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "normlab_version": normlab.__version__,
        "git_commit": _git_commit(),
        "device": "cpu",
        "dtype": "float32",
        "loadavg_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| layer | shape | format | pass | normlab ms | torch ms | ratio | pair ratio median [min, max] | others' CPU |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"| {r['layer']} | {shape} | {r['format']} | {r['pass']} | {r['normlab_median_ms']:.2f} | "
            f"{r['torch_median_ms']:.2f} | {r['ratio']:.2f} | {r['pair_ratio_median']:.2f} "
            f"[{r['pair_ratio_min']:.2f}, {r['pair_ratio_max']:.2f}] | {_pct(r.get('foreign_cpu_share'))} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--os-allocator", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS (page faults timed too)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per implementation and case (default {DEFAULT_REPEATS}; 7 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test that takes seconds")
    parser.add_argument("--only", default=None, help="layer name(s), comma-separated, case-insensitive")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default benchmarks/results/layers.json)")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="measure a case again when other processes used more than this share of the "
                             "machine's CPU during it (default 0.15)")
    parser.add_argument("--attempts", type=int, default=None,
                        help="most measurements of one case (default 3, 1 with --quick; the least disturbed "
                             "is reported)")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="before measuring a disturbed case again, wait up to this many seconds for the "
                             "other processes to quiet down (default 20)")
    parser.add_argument("--retry-budget", type=float, default=360.0,
                        help="no more waiting and re-measuring after this many seconds of the run (default 360)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (7 if args.quick else DEFAULT_REPEATS)
    if args.attempts is None:
        args.attempts = 1 if args.quick else 3
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    cases = build_cases(args.quick)
    if args.only:
        wanted = {w.strip().lower() for w in args.only.split(",") if w.strip()}
        known = {c.layer.lower() for c in cases}
        unknown = wanted - known
        if unknown:
            parser.error(f"--only: unknown layer(s) {sorted(unknown)}; choose from {sorted({c.layer for c in cases})}")
        cases = [c for c in cases if c.layer.lower() in wanted]

    env = environment()
    env["malloc_keeps_freed_memory"] = keep_freed_memory() if not args.os_allocator else False
    print(f"# normlab vs torch, CPU float32: torch {env['torch_version']}, {env['torch_num_threads']} threads, "
          f"{env['cpu_model']} ({env['cpu_count']} cores), repeats {repeats}, warm-up {WARMUP}", flush=True)
    started = time.perf_counter()
    results = []
    for case in cases:
        for pass_name in PASSES:
            attempts = []
            while True:
                attempts.append(measure(case, pass_name, repeats, min_timed_s=0.0 if args.quick else MIN_TIMED_S))
                share = attempts[-1]["foreign_cpu_share"]
                if (share is None or share <= args.max_foreign or len(attempts) >= args.attempts
                        or time.perf_counter() - started > args.retry_budget):
                    break
                print(f"  (other processes used {share:.0%} of the CPU during that measurement; waiting "
                      f"up to {args.wait:.0f} s for a quieter moment and measuring again)", file=sys.stderr, flush=True)
                wait_for_quiet(args.max_foreign, args.wait)
            # Keep the least disturbed attempt; the others stay in the record.
            r = min(attempts, key=lambda a: a["foreign_cpu_share"] if a["foreign_cpu_share"] is not None else 0.0)
            r["attempts"] = len(attempts)
            r["discarded_attempts"] = [
                {k: a[k] for k in ("normlab_median_ms", "torch_median_ms", "ratio", "foreign_cpu_share")}
                for a in attempts if a is not r
            ]
            results.append(r)
            print(f"  {r['layer']:<15} {'x'.join(map(str, r['shape'])):<16} {r['format']:<17} {pass_name:<17} "
                  f"normlab {r['normlab_median_ms']:8.2f} ms  torch {r['torch_median_ms']:8.2f} ms  "
                  f"ratio {r['ratio']:.2f}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    env["elapsed_s"] = round(elapsed, 1)
    if hasattr(os, "getloadavg"):  # other processes on the machine skew every number: keep the evidence
        env["loadavg_1_5_15_min_at_end"] = list(os.getloadavg())

    payload = {
        "benchmark": "normlab vs torch.nn layers, forward and forward+backward, training mode",
        "method": {
            "warmup": WARMUP,
            "repeats": repeats,
            "interleaved": "per repeat one normlab run and one torch run; the order alternates",
            "timer": "time.perf_counter around the call(s), per run",
            "forward": "y = layer(x) with autograd recording (x and the parameters require grad)",
            "forward+backward": "y = layer(x); y.backward(g), fixed g in x's memory format; grads set to None before each run (not timed)",
            "ratio": "median(normlab) / median(torch)",
            "pair_ratio": "normlab_i / torch_i for each interleaved pair i",
            "quick": args.quick,
            "contention": (
                "foreign_cpu_share: share of the machine's CPU time (all cores, from /proc/stat) used by "
                "other processes during the timed repeats; a case is measured again (up to --attempts "
                "times) when it exceeds --max-foreign, and the least disturbed attempt is reported"
            ),
            "max_foreign": args.max_foreign,
            "wait_s": args.wait,
            "attempts": args.attempts,
        },
        "environment": env,
        "results": results,
    }
    write_json(args.out, payload)
    print(markdown_table(results))
    slow = [r for r in results if r["ratio"] > 1.10]
    if slow:
        print("\nnormlab slower than 1.10x torch:")
        for r in slow:
            print(f"- {r['layer']} {'x'.join(map(str, r['shape']))} {r['format']} {r['pass']}: {r['ratio']:.2f}x")
    print(f"\n{len(results)} measurements in {elapsed:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
