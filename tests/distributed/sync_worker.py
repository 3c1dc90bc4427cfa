"""One process of the SyncBatchNorm tests (launched by test_sync.py like torchrun would).

argv: JSON spec {"sizes": [...], "rest": [...], "channels": C, "steps": k, "out": path,
"die": bool, "timeout": s}. Each rank normalizes its slice of one seeded batch, backpropagates
a seeded upstream gradient, and saves what it got for the parent to compare.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import normlab


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec.get("timeout", 60)))
    if spec.get("die") and rank == world - 1:
        os._exit(3)  # a peer that dies before the step
    sizes, channels = spec["sizes"], spec["channels"]
    start = sum(sizes[:rank])
    bn = normlab.SyncBatchNorm(channels, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, channels, dtype=torch.float64))
    results = []
    for step in range(spec["steps"]):
        g = torch.Generator().manual_seed(step)
        full = torch.randn(sum(sizes), channels, *spec["rest"], generator=g, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(full.shape, generator=g, dtype=torch.float64)
        x = full[start : start + sizes[rank]].clone().requires_grad_()
        if spec.get("channels_last"):
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        bn.weight.grad = bn.bias.grad = None
        if spec.get("masked"):  # padded sequences: valid lengths vary; the padding holds NaN
            length = full.shape[-1]
            lengths = torch.randint(0, length + 1, (full.shape[0],), generator=g)
            mask = (torch.arange(length)[None, :] < lengths[:, None])[start : start + sizes[rank]]
            x = x.detach().masked_fill(~mask[:, None, :], float("nan")).requires_grad_()
            y = bn(x, mask)
        else:
            y = bn(x)
        (y * upstream[start : start + sizes[rank]]).nansum().backward()
        results.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone()})
    torch.save({"steps": results, "running_mean": bn.running_mean, "running_var": bn.running_var,
                "count": bn.num_batches_tracked}, f"{spec['out']}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
