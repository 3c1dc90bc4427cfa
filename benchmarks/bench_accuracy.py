"""Accuracy of training-mode batch norm per memory format: normlab and torch against float64.

torch's CPU batch-norm kernel sums channel-innermost data (channels_last, 2-D input) with a
plain running sum, so its statistics, and hence its output, lose precision when the data has a
large offset relative to its spread. normlab computes those statistics with a blocked two-pass
method. This script measures, on CPU float32 input,

* BatchNorm2d(64) on (64, 64, 56, 56), data mean 3, std 2, NCHW and channels_last;
* BatchNorm1d(1024) on (4096, 1024), data mean 100, std 1 (2-D input is channel-innermost);

the max (and mean) abs error of the training-mode output against a float64 computation
(``x.double()``, mean and biased variance over every dimension but 1, eps 1e-5, weight 1,
bias 0), and the max abs error of the updated running statistics against their float64 values.

Usage::

    python benchmarks/bench_accuracy.py [--out benchmarks/results/accuracy.json] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import normlab

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "accuracy.json"
EPS = 1e-5
MOMENTUM = 0.1

sys.path.insert(0, str(HERE))
from bench_layers import environment, write_json


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 output, running_mean and running_var after one step from (0, 1), torch's rule."""
    xd = x.double()
    dims = [d for d in range(xd.dim()) if d != 1]
    shape = [1, -1] + [1] * (xd.dim() - 2)
    mean = xd.mean(dims)
    var = xd.var(dims, unbiased=False)
    n = xd.numel() // xd.shape[1]
    out = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    running_mean = MOMENTUM * mean
    running_var = (1 - MOMENTUM) * 1.0 + MOMENTUM * var * n / (n - 1)
    return out, running_mean, running_var


def errors(layer: nn.Module, x: torch.Tensor, ref) -> dict:
    out_ref, rm_ref, rv_ref = ref
    layer.train()
    with torch.no_grad():
        y = layer(x)
    err = (y.double() - out_ref).abs()
    return {
        "output_max_abs_err": float(err.max()),
        "output_mean_abs_err": float(err.mean()),
        "running_mean_max_abs_err": float((layer.running_mean.double() - rm_ref).abs().max()),
        "running_var_max_abs_err": float((layer.running_var.double() - rv_ref).abs().max()),
        "output_strides": list(y.stride()),
    }


def cases(quick: bool):
    if quick:
        yield "BatchNorm2d", (8, 64, 16, 16), 3.0, 2.0
        yield "BatchNorm1d", (512, 128), 100.0, 1.0
    else:
        yield "BatchNorm2d", (64, 64, 56, 56), 3.0, 2.0
        yield "BatchNorm1d", (4096, 1024), 100.0, 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default benchmarks/results/accuracy.json)")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    args = parser.parse_args(argv)

    results = []
    for name, shape, mean, std in cases(args.quick):
        torch.manual_seed(0)
        x = torch.randn(shape) * std + mean
        ref = reference(x)
        formats = [("NCHW", x)] if x.dim() == 4 else [("2-D (N, C)", x)]
        if x.dim() == 4:
            formats.append(("channels_last", x.contiguous(memory_format=torch.channels_last)))
        for fmt, xf in formats:
            for impl, make in (("normlab", getattr(normlab, name)), ("torch", getattr(nn, name))):
                layer = make(shape[1], eps=EPS, momentum=MOMENTUM)
                r = {"layer": name, "shape": list(shape), "data_mean": mean, "data_std": std, "seed": 0,
                     "format": fmt, "impl": impl}
                r.update(errors(layer, xf, ref))
                results.append(r)

    env = environment()
    payload = {
        "benchmark": "training-mode batch norm output error vs float64, per memory format",
        "method": {
            "reference": "x.double(); mean and biased var over all dims but 1; (x - mean) / sqrt(var + eps); "
                         "eps 1e-5, weight 1, bias 0",
            "running_stats_reference": "one step from running_mean 0, running_var 1 with momentum 0.1 and "
                                       "the unbiased batch variance (torch's rule), in float64",
            "input": "torch.manual_seed(0); x = torch.randn(shape) * std + mean (float32)",
            "quick": args.quick,
        },
        "environment": env,
        "results": results,
    }
    write_json(args.out, payload)

    print("| layer | shape | data mean, std | format | impl | output max abs err | output mean abs err | "
          "running_mean max err | running_var max err |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['data_mean']:g}, {r['data_std']:g} | "
              f"{r['format']} | {r['impl']} | {r['output_max_abs_err']:.2e} | {r['output_mean_abs_err']:.2e} | "
              f"{r['running_mean_max_abs_err']:.2e} | {r['running_var_max_abs_err']:.2e} |")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
