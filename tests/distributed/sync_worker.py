"""One process of the synchronized-layer tests (launched by the tests like torchrun would).

argv: JSON spec {"sizes": [...], "rest": [...], "channels": C, "steps": k, "out": path,
"die": bool, "timeout": s, "masked": bool, "channels_last": bool} and, for the variants,
"layers": a list of "bn" (SyncBatchNorm), "renorm" (SyncBatchRenorm with "r_max", and "d_max"
or "d_max_ramp" = [start, end, begin, finish]), "act" and "act_masked" (SyncBatchNormAct with
"act", "negative_slope"; the masked one pads with NaN, and "all_padding_rank" gets only padding).
Each rank normalizes its slice of one seeded batch, backpropagates a seeded upstream gradient,
and saves what it got for the parent to compare: to ``out.RANK`` without "layers" (SyncBatchNorm,
"masked" as given), else to ``out.LAYER.RANK`` per layer, with an eval-mode output at the end.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import normlab
from normlab.layers.renorm import LinearRamp
from normlab.layers.sync import SyncBatchNormAct, SyncBatchRenorm


def build(kind: str, spec: dict) -> torch.nn.Module:
    channels, bias = spec["channels"], spec.get("bias", True)
    if kind == "bn":
        layer = normlab.SyncBatchNorm(channels, momentum=0.3, bias=bias)
    elif kind == "renorm":
        d_max = LinearRamp(*spec["d_max_ramp"]) if "d_max_ramp" in spec else spec["d_max"]
        layer = SyncBatchRenorm(channels, momentum=0.3, r_max=spec["r_max"], d_max=d_max, bias=bias)
    else:
        layer = SyncBatchNormAct(channels, momentum=0.3, act=spec["act"], negative_slope=spec["negative_slope"],
                                 bias=bias)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
        if layer.bias is not None:
            layer.bias.copy_(torch.linspace(-0.2, 0.3, channels, dtype=torch.float64))
    return layer


def run(kind: str, spec: dict, rank: int) -> dict:
    sizes, channels = spec["sizes"], spec["channels"]
    start = sum(sizes[:rank])
    masked = kind == "act_masked" or (kind == "bn" and spec.get("masked"))
    layer = build(kind, spec)
    results = []
    evaluate = "layers" in spec  # SyncBatchNorm's original protocol: training steps only
    for step in range(spec["steps"] + evaluate):
        g = torch.Generator().manual_seed(step)
        full = torch.randn(sum(sizes), channels, *spec["rest"], generator=g, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(full.shape, generator=g, dtype=torch.float64)
        x = full[start : start + sizes[rank]].clone().requires_grad_()
        if spec.get("channels_last"):
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        if step == spec["steps"]:  # the last batch in eval mode: the running statistics alone
            layer.eval()
        for param in layer.parameters():
            param.grad = None
        if masked:  # padded sequences: valid lengths vary; the padding holds NaN
            length = full.shape[-1]
            lengths = torch.randint(0, length + 1, (full.shape[0],), generator=g)
            mask = (torch.arange(length)[None, :] < lengths[:, None])[start : start + sizes[rank]]
            if spec.get("all_padding_rank") == rank:
                mask = torch.zeros_like(mask)
            x = x.detach().masked_fill(~mask[:, None, :], float("nan")).requires_grad_()
            y = layer(x, mask)
        else:
            y = layer(x)
        (y * upstream[start : start + sizes[rank]]).nansum().backward()
        results.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(),
                        "db": None if layer.bias is None else layer.bias.grad.clone()})
    return {"steps": results, "running_mean": layer.running_mean, "running_var": layer.running_var,
            "count": layer.num_batches_tracked}


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec.get("timeout", 60)))
    if spec.get("die") and rank == world - 1:
        os._exit(3)  # a peer that dies before the step
    if "layers" not in spec:
        torch.save(run("bn", spec, rank), f"{spec['out']}.{rank}")
    for kind in spec.get("layers", []):
        torch.save(run(kind, spec, rank), f"{spec['out']}.{kind}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
