"""Speed of BatchRenorm and GhostBatchNorm against torch.nn.BatchNorm, side by side in one process.

Batch renorm and ghost batch norm are batch-norm variants without a torch counterpart; what a
user gives up by choosing one is time against the plain ``torch.nn.BatchNorm1d/2d``. For each
case this times, in training mode with CPU float32 input,

* ``forward``:          ``y = layer(x)`` with autograd recording, and
* ``forward+backward``: ``y = layer(x); y.backward(g)`` with a fixed upstream gradient ``g``,

of the normlab variant and of torch's BatchNorm with the same state (the variants load a
BatchNorm state dict), interleaved run by run, with the method of ``bench_layers.py``: warm-up,
medians, ratio of the medians (variant / torch) and the spread of per-pair ratios, the share of
the CPU used by other processes (a disturbed case is measured again).

Cases (full mode):

* BatchRenorm2d(64) with r_max=3, d_max=5 (corrections in force), GhostBatchNorm2d(64) with
  virtual_batch_size=16 (4 virtual batches): (64, 64, 56, 56), NCHW and channels_last (with
  normlab's BatchNorm2d beside them for channels_last).
* BatchRenorm1d(1024) (also with stable_stats=False), normlab's BatchNorm1d(1024), and
  GhostBatchNorm1d(1024) with virtual batches of 128 (32 of them) and of 32 (128 of them):
  (4096, 1024).

The acceptance bound is 1.3x torch's time for the (64, 64, 56, 56) NCHW rows; the JSON's
``acceptance`` lists them against it. The other rows are for information: channels_last and
2-D input, where normlab computes accurate blocked statistics by default (normlab's own
BatchNorm1d is measured beside them, and a ``stable_stats=False`` row takes torch's kernel),
and ghost batch norm with 32 and 128 virtual batches of a 4096-sample batch.

Usage::

    python benchmarks/bench_variants.py            # full run -> benchmarks/results/variants.json
    python benchmarks/bench_variants.py --quick    # small shapes, seconds (smoke test)
    python benchmarks/bench_variants.py --repeats 15 --out /tmp/variants.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import bench_layers as bl  # the shared method: Case, measure, environment, contention handling
from torch import nn

import normlab
from normlab.layers.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from normlab.layers.renorm import BatchRenorm1d, BatchRenorm2d

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "variants.json"
DEFAULT_REPEATS = 11
BOUND = 1.3


def build_cases(quick: bool) -> list[bl.Case]:
    shape_4d = (8, 64, 16, 16) if quick else (64, 64, 56, 56)
    shape_2d = (512, 256) if quick else (4096, 1024)
    vbs_4d = 4 if quick else 16
    vbs_2d = (64, 16) if quick else (128, 32)
    c4, c2 = shape_4d[1], shape_2d[1]
    cases = []
    for fmt in (bl.CF, bl.CL):
        if fmt == bl.CL:  # what normlab's accurate channels_last statistics cost by themselves
            cases.append(bl.Case("BatchNorm2d", shape_4d, fmt, lambda: normlab.BatchNorm2d(c4),
                                 lambda: nn.BatchNorm2d(c4), f"normlab.BatchNorm2d({c4})"))
        cases.append(bl.Case("BatchRenorm2d", shape_4d, fmt,
                             lambda: BatchRenorm2d(c4, r_max=3.0, d_max=5.0), lambda: nn.BatchNorm2d(c4),
                             f"BatchRenorm2d({c4}, r_max=3.0, d_max=5.0)"))
        cases.append(bl.Case("GhostBatchNorm2d", shape_4d, fmt,
                             lambda: GhostBatchNorm2d(c4, virtual_batch_size=vbs_4d), lambda: nn.BatchNorm2d(c4),
                             f"GhostBatchNorm2d({c4}, virtual_batch_size={vbs_4d})"))
    # 2-D input is channel-innermost: by default normlab computes its statistics by blocks, as
    # accurate as NCHW input, at a cost that normlab's own BatchNorm1d row shows; the
    # stable_stats=False row takes torch's kernel.
    cases.append(bl.Case("BatchNorm1d", shape_2d, bl.CF, lambda: normlab.BatchNorm1d(c2), lambda: nn.BatchNorm1d(c2),
                         f"normlab.BatchNorm1d({c2})"))
    cases.append(bl.Case("BatchRenorm1d", shape_2d, bl.CF,
                         lambda: BatchRenorm1d(c2, r_max=3.0, d_max=5.0), lambda: nn.BatchNorm1d(c2),
                         f"BatchRenorm1d({c2}, r_max=3.0, d_max=5.0)"))
    cases.append(bl.Case("BatchRenorm1d", shape_2d, bl.CF,
                         lambda: BatchRenorm1d(c2, r_max=3.0, d_max=5.0, stable_stats=False), lambda: nn.BatchNorm1d(c2),
                         f"BatchRenorm1d({c2}, r_max=3.0, d_max=5.0, stable_stats=False)"))
    for vbs in vbs_2d:
        cases.append(bl.Case("GhostBatchNorm1d", shape_2d, bl.CF,
                             lambda vbs=vbs: GhostBatchNorm1d(c2, virtual_batch_size=vbs), lambda: nn.BatchNorm1d(c2),
                             f"GhostBatchNorm1d({c2}, virtual_batch_size={vbs})"))
    return cases


def _in_acceptance(r: dict) -> bool:
    """The rows the 1.3x bound is about: the variants on NCHW (64, 64, 56, 56) input."""
    return r["format"] == "NCHW" and not r["config"].startswith("normlab.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test that takes seconds")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per implementation and case (default {DEFAULT_REPEATS}; 7 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default benchmarks/results/variants.json)")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="measure a case again when other processes used more than this share of the CPU")
    parser.add_argument("--attempts", type=int, default=None, help="most measurements of one case (default 3, 1 with --quick)")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds to wait for a quieter moment before measuring again")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (7 if args.quick else DEFAULT_REPEATS)
    attempts_max = args.attempts if args.attempts is not None else (1 if args.quick else 3)
    if repeats < 7:
        parser.error("--repeats must be >= 7 (medians of fewer runs on a shared machine mean little)")

    env = bl.environment()
    env["malloc_keeps_freed_memory"] = bl.keep_freed_memory()  # as bench_layers: no page-fault noise
    print(f"# normlab variants vs torch BatchNorm, CPU float32: torch {env['torch_version']}, "
          f"{env['torch_num_threads']} threads, repeats {repeats}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    results = []
    for case in build_cases(args.quick):
        for pass_name in bl.PASSES:
            attempts = []
            while True:
                attempts.append(bl.measure(case, pass_name, repeats, min_timed_s=0.0 if args.quick else bl.MIN_TIMED_S))
                share = attempts[-1]["foreign_cpu_share"]
                if share is None or share <= args.max_foreign or len(attempts) >= attempts_max:
                    break
                print(f"  (other processes used {share:.0%} of the CPU; waiting and measuring again)",
                      file=sys.stderr, flush=True)
                bl.wait_for_quiet(args.max_foreign, args.wait)
            r = min(attempts, key=lambda a: a["foreign_cpu_share"] if a["foreign_cpu_share"] is not None else 0.0)
            r["attempts"] = len(attempts)
            r["discarded_attempts"] = [
                {k: a[k] for k in ("normlab_median_ms", "torch_median_ms", "ratio", "foreign_cpu_share")}
                for a in attempts if a is not r
            ]
            results.append(r)
            print(f"  {r['config']:<48} {'x'.join(map(str, r['shape'])):<12} {r['format']:<14} {pass_name:<17} "
                  f"{r['normlab_median_ms']:8.2f} ms  torch {r['torch_median_ms']:8.2f} ms  ratio {r['ratio']:.2f}",
                  file=sys.stderr, flush=True)
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        env["loadavg_1_5_15_min_at_end"] = list(os.getloadavg())
    acceptance = [
        {"config": r["config"], "shape": r["shape"], "format": r["format"], "pass": r["pass"],
         "ratio": round(r["ratio"], 3), "bound": BOUND, "within": r["ratio"] <= BOUND}
        for r in results if _in_acceptance(r)
    ]
    payload = {
        "benchmark": "BatchRenorm / GhostBatchNorm vs torch.nn.BatchNorm, forward and forward+backward, training mode",
        "method": {
            "see": "benchmarks/bench_layers.py (same measure(): warm-up 3, interleaved pairs, medians)",
            "repeats": repeats,
            "quick": args.quick,
            "ratio": "median(normlab variant) / median(torch BatchNorm)",
            "max_foreign": args.max_foreign,
            "attempts": attempts_max,
        },
        "environment": env,
        "acceptance": acceptance,
        "results": results,
    }
    bl.write_json(args.out, payload)
    print(bl.markdown_table(results))
    if args.quick:
        print("\n(--quick: small shapes, where fixed per-call costs dominate; the bound is about the full run)")
    missed = [a for a in acceptance if not a["within"]]
    print(f"\n{len(acceptance) - len(missed)}/{len(acceptance)} acceptance rows within {BOUND}x torch; JSON: {args.out}")
    for a in missed:
        print(f"- over {BOUND}x: {a['config']} {a['format']} {a['pass']}: {a['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
