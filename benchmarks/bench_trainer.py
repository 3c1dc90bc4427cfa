"""Time per training step of the lab's trainer against a bare hand-written torch loop.

Both train the same model (the ioffe2015-mnist MLP, each arm) on the same batches (the
trainer's own batch order, precomputed for the bare loop) with the same optimizer. The trainer
is timed by its own ``wall_time`` (training seconds, evaluation excluded) over a run whose only
evaluations are at step 0 and at the end; the bare loop is timed around its loop. Both use one
torch thread, as every lab job does. Runs are
interleaved (trainer, loop, trainer, ...) and the ratio of the medians is reported.

Usage::

    python benchmarks/bench_trainer.py                 # writes benchmarks/results/trainer.json
    python benchmarks/bench_trainer.py --steps 200 --repeats 3 --out /tmp/trainer.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from normlab.lab.config import apply_overrides, arm_config
from normlab.lab.experiments import all_experiments
from normlab.lab.models import build_model
from normlab.lab.trainer import BatchSampler, Trainer, make_optimizer, one_thread

HERE = Path(__file__).resolve().parent


def bare_loop(config, data, seed: int) -> float:
    """Seconds per step of the plainest loop over the trainer's batches."""
    torch.manual_seed(seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    optimizer = make_optimizer(config.train, model)
    sampler = BatchSampler(len(data.y_train), config.train.batch_size, seed)
    batches = [sampler.next() for _ in range(config.train.steps)]
    x_train, y_train = data.x_train, data.y_train
    model.train()
    with one_thread():  # as every lab job trains
        start = time.perf_counter()
        for idx in batches:
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / config.train.steps


def trainer_run(experiment, config, data, progress: bool) -> float:
    """Seconds per step of the trainer, from its recorded training wall time."""
    folder = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        rows = Trainer(experiment, config, folder / "run", progress=progress, data=data).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return max(r["wall_time"] for r in rows) / config.train.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trainer.json")
    args = parser.parse_args()

    experiment = all_experiments()["ioffe2015-mnist"]
    base = apply_overrides(experiment.quick_config(), {
        "train.steps": args.steps, "train.seeds": 1, "train.eval_every": args.steps,
        "train.checkpoint_every": args.steps, "train.device": "cpu",
    }, parse=False)
    from normlab.lab.data import load_dataset

    data = load_dataset(base.data.name, split_seed=base.data.split_seed, test_fraction=base.data.test_fraction)
    results = []
    for arm in base.arms:
        config = copy.deepcopy(base)
        config.arms = {arm: base.arms[arm]}
        arm_cfg = arm_config(config, arm)
        trainer_times, loop_times = [], []
        for repeat in range(args.repeats + 1):  # the first pair warms up and is dropped
            t = trainer_run(experiment, config, data, progress=False)
            b = bare_loop(arm_cfg, data, seed=0)
            if repeat:
                trainer_times.append(t)
                loop_times.append(b)
        ratio = statistics.median(trainer_times) / statistics.median(loop_times)
        pair = sorted(t / b for t, b in zip(trainer_times, loop_times))
        results.append({
            "arm": arm, "steps": args.steps, "repeats": args.repeats,
            "trainer_ms_per_step": 1e3 * statistics.median(trainer_times),
            "bare_loop_ms_per_step": 1e3 * statistics.median(loop_times),
            "ratio": ratio, "pair_ratio_min": pair[0], "pair_ratio_max": pair[-1],
        })
        print(f"{arm:6s} trainer {1e3 * statistics.median(trainer_times):.3f} ms/step, bare loop "
              f"{1e3 * statistics.median(loop_times):.3f} ms/step, ratio {ratio:.3f} "
              f"(pairs {pair[0]:.3f}..{pair[-1]:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "trainer time per step vs a bare torch loop (ioffe2015-mnist MLP, batch 60)",
        "torch": torch.__version__, "threads": 1,
        "date": time.strftime("%Y-%m-%d"), "results": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
