"""Time per training step of SyncBatchNorm vs local batch norm, 2 gloo processes, small CNN.

Both arms train the same small CNN (3 conv blocks with batch norm, global pooling, a linear
head) under DistributedDataParallel with gloo on the CPU, each process holding half of a global
batch; arm ``local`` keeps normlab.BatchNorm2d (per-process statistics), arm ``sync`` converts
it with normlab.convert_sync_batchnorm. The time spent inside SyncBatchNorm's own collectives
(the statistics all_gather in forward, the gradient all_reduce in backward) is measured by
timing those calls, which gives their share of the step. Arms are interleaved; medians over
rounds.

Usage::

    python benchmarks/bench_sync.py                # writes benchmarks/results/sync.json
    python benchmarks/bench_sync.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cnn(torch, normlab):
    nn = torch.nn
    layers, channels = [], 3
    for width in (32, 64, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1, stride=1 if channels == 3 else 2),
                   normlab.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import normlab

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    comm = {"seconds": 0.0}
    # SyncBatchNorm calls torch.distributed.all_gather / all_reduce by attribute, so timing
    # wrappers installed here see its collectives (DDP's own all-reduce runs in C++, unseen).
    for name in ("all_gather", "all_reduce"):
        original = getattr(dist, name)

        def timed(*a, _original=original, **kw):
            start = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                comm["seconds"] += time.perf_counter() - start
        setattr(dist, name, timed)
    results = {"local": [], "sync": [], "sync_comm": []}
    torch.manual_seed(0)
    models = {"local": _cnn(torch, normlab)}
    models["sync"] = normlab.convert_sync_batchnorm(models["local"])
    wrapped = {k: DistributedDataParallel(m) for k, m in models.items()}
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in wrapped.items()}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch // world, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch // world,), generator=g)
    for round_ in range(args.rounds + 1):
        for arm in ("local", "sync") if round_ % 2 == 0 else ("sync", "local"):
            dist.barrier()
            comm["seconds"] = 0.0
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = torch.nn.functional.cross_entropy(wrapped[arm](x), y)
                optims[arm].zero_grad()
                loss.backward()
                optims[arm].step()
            elapsed = (time.perf_counter() - start) / args.steps
            if round_:  # the first round warms up
                results[arm].append(elapsed)
                if arm == "sync":
                    results["sync_comm"].append(comm["seconds"] / args.steps)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "sync.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.batch, args.size, args.steps, args.rounds = 16, 16, 2, 2
    raw = Path(args.out).with_suffix(".raw.json")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--worker", "--batch", str(args.batch), "--size", str(args.size),
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--out", str(raw)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    times = json.loads(raw.read_text())
    raw.unlink()
    local, sync, comm = (statistics.median(times[k]) for k in ("local", "sync", "sync_comm"))
    summary = {
        "benchmark": "SyncBatchNorm vs local BatchNorm2d, DDP over 2 gloo processes (CPU), small CNN",
        "global_batch": args.batch, "image": [3, args.size, args.size], "steps_per_round": args.steps,
        "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"),
        "local_ms_per_step": 1e3 * local, "sync_ms_per_step": 1e3 * sync, "ratio_sync_over_local": sync / local,
        "sync_collectives_ms_per_step": 1e3 * comm, "sync_collectives_share": comm / sync, "raw": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"local BN {1e3 * local:.2f} ms/step, SyncBatchNorm {1e3 * sync:.2f} ms/step ({sync / local:.2f}x); "
          f"SyncBatchNorm collectives {1e3 * comm:.2f} ms/step = {comm / sync:.0%} of the step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
