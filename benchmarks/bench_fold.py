"""Inference time of batch-norm folding: folded vs unfolded models, and torch's own fusion.

Models, CPU float32, eval mode under ``torch.inference_mode()``:

* ``mlp``: ``Linear(784, 1024, bias=False) -> BatchNorm1d -> ReLU`` three times, then
  ``Linear(1024, 10)``; batches of 32 and 256 (a BN after every Linear).
* ``cnn``: five 3x3 ``Conv2d -> BatchNorm2d -> ReLU`` blocks (32, 32, 64, 64, 128 channels,
  two with stride 2), global average pooling and a Linear; ``(32, 3, 32, 32)`` input.

Three variants of each, built from the same weights and checked to agree: ``unfolded`` (the
model), ``folded`` (:func:`normlab.surgery.fold_batchnorm`) and ``torch_fuse``
(``torch.fx.experimental.optimization.fuse``, torch's Conv+BN fusion, for reference). Each is
warmed up; then ``--repeats`` rounds run every variant once in a rotating order, each run
timing a loop of calls long enough (>= ~20 ms) for the timer. Reported: the median time per
forward of each variant, the ratios of the medians to ``unfolded`` (< 1 is faster) and the
spread of the per-round ratios. Every measurement records the CPU share other processes used
meanwhile (from ``/proc/stat``, see bench_layers.py); the machine may be shared.

Usage::

    python benchmarks/bench_fold.py            # full run -> benchmarks/results/fold.json
    python benchmarks/bench_fold.py --quick    # small models, a few seconds; prints only (or --out FILE)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

from normlab.surgery import fold_batchnorm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_layers import (  # noqa: E402
    _cpu_sample,
    _self_cpu,
    environment,
    foreign_cpu_share,
    wait_for_quiet,
    write_json,
)

DEFAULT_OUT = HERE / "results" / "fold.json"
WARMUP = 3
VARIANTS = ("unfolded", "folded", "torch_fuse")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def mlp(width: int, depth: int = 3, inputs: int = 784) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for i, cout in enumerate(channels):
        stride = 2 if i in (2, 4) else 1
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    if quick:
        return [("mlp", mlp(128, 2, 64), (32, 64)), ("cnn", cnn((8, 8, 16)), (8, 3, 16, 16))]
    return [
        ("mlp", mlp(1024), (32, 784)),
        ("mlp", mlp(1024), (256, 784)),
        ("cnn", cnn((32, 32, 64, 64, 128)), (32, 3, 32, 32)),
    ]


def timed_loop(model: nn.Module, x: torch.Tensor, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        model(x)
    return (time.perf_counter() - start) / inner


def measure(name: str, model: nn.Module, shape: tuple[int, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    folded, report = fold_batchnorm(model)
    variants = {"unfolded": model, "folded": folded, "torch_fuse": fx_optimization.fuse(model)}
    with torch.inference_mode():
        expected = model(x)
        diffs = {k: float((m(x) - expected).abs().max()) for k, m in variants.items()}
        for m in variants.values():
            for _ in range(WARMUP):
                m(x)
        one = timed_loop(model, x, 3)
        inner = max(1, int(0.02 / max(one, 1e-7)))
        times: dict[str, list[float]] = {k: [] for k in variants}
        before = (_cpu_sample(), _self_cpu())
        for r in range(repeats):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]  # rotate who goes first
            for k in order:
                times[k].append(timed_loop(variants[k], x, inner))
        share = foreign_cpu_share(before, (_cpu_sample(), _self_cpu()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": name,
        "input_shape": list(shape),
        "norms_folded": len(report.folded),
        "norms_skipped": len(report.skipped),
        "calls_per_timed_run": inner,
        "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "output_max_abs_diff": diffs,
        "foreign_cpu_share": share,
        "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }
    for k in ("folded", "torch_fuse"):
        pairs = [a / b for a, b in zip(times[k], times["unfolded"])]
        result[f"ratio_{k}"] = medians[k] / medians["unfolded"]
        result[f"pair_ratio_{k}"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | input | unfolded ms | folded ms | folded / unfolded | torch fuse ms | fuse / unfolded "
             "| others' CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["median_ms"]
        share = "n/a" if r["foreign_cpu_share"] is None else f"{r['foreign_cpu_share']:.0%}"
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {m['unfolded']:.3f} | {m['folded']:.3f} | "
            f"{r['ratio_folded']:.2f} ({r['pair_ratio_folded']['min']:.2f}-{r['pair_ratio_folded']['max']:.2f}) | "
            f"{m['torch_fuse']:.3f} | {r['ratio_torch_fuse']:.2f} | {share} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, a smoke test of a few seconds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 21; 5 with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/fold.json; --quick writes none unless given)")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="measure a model again when other processes used more than this share of the CPU "
                             "during it (default 0.15)")
    parser.add_argument("--attempts", type=int, default=None, help="most measurements per model (default 3; 1 with --quick)")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds to wait for a quieter machine before measuring again (default 20)")
    args = parser.parse_args(argv)
    if args.attempts is None:
        args.attempts = 1 if args.quick else 3
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 21)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    env = environment()
    print(f"# fold_batchnorm, CPU float32 eval: torch {env['torch_version']}, {env['torch_num_threads']} threads, "
          f"repeats {repeats}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    results = []
    for name, model, shape in cases(args.quick):
        attempts = []
        while True:
            attempts.append(measure(name, model, shape, repeats))
            share = attempts[-1]["foreign_cpu_share"]
            if share is None or share <= args.max_foreign or len(attempts) >= args.attempts:
                break
            print(f"  (other processes used {share:.0%} of the CPU; waiting up to {args.wait:.0f} s for a quieter "
                  f"moment and measuring again)", file=sys.stderr, flush=True)
            wait_for_quiet(args.max_foreign, args.wait)
        # The least disturbed attempt is reported; the others stay in the record.
        r = min(attempts, key=lambda a: a["foreign_cpu_share"] if a["foreign_cpu_share"] is not None else 0.0)
        r["attempts"] = len(attempts)
        r["discarded_attempts"] = [
            {k: a[k] for k in ("median_ms", "ratio_folded", "ratio_torch_fuse", "foreign_cpu_share")}
            for a in attempts if a is not r
        ]
        results.append(r)
        print(f"  {name:<4} {'x'.join(map(str, shape)):<12} unfolded {r['median_ms']['unfolded']:8.3f} ms  "
              f"folded {r['median_ms']['folded']:8.3f} ms ({r['ratio_folded']:.2f}x)  "
              f"torch fuse {r['median_ms']['torch_fuse']:8.3f} ms ({r['ratio_torch_fuse']:.2f}x)",
              file=sys.stderr, flush=True)
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    payload = {
        "benchmark": "eval time of fold_batchnorm's folded model vs the unfolded model (and torch.fx fuse)",
        "method": {
            "mode": "eval, torch.inference_mode(), CPU float32, default thread count",
            "warmup": WARMUP,
            "repeats": repeats,
            "interleaved": "per round one timed run of each variant, order rotating",
            "timed_run": "a loop of calls_per_timed_run forwards (>= ~20 ms), time per call",
            "ratio": "median(variant) / median(unfolded); < 1 is faster",
            "pair_ratio": "variant_i / unfolded_i per round",
            "quick": args.quick,
            "contention": "foreign_cpu_share as in bench_layers.py; a model is measured again (up to --attempts) "
                          "when it exceeds --max-foreign, and the least disturbed attempt is reported",
            "max_foreign": args.max_foreign,
        },
        "environment": env,
        "results": results,
    }
    print(table(results))
    if out is not None:
        write_json(out, payload)
        print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
