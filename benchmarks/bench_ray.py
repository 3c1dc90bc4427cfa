"""A quick experiment on a two-node Ray cluster (1 CPU each) against one node with 1 CPU, side by side.

Starts two real clusters on this machine, over loopback addresses only: one node at 127.0.0.4,
and a head at 127.0.0.2 with a second node at 127.0.0.3 (:mod:`tests.lab.ray_cluster`). Each
repeat connects this process to one cluster, warms its workers with a tiny run (not timed: a
fresh connection starts Python workers that import torch), times the experiment through
:class:`normlab.lab.ray_executor.RayExecutor`, then does the same on the other cluster,
alternating which goes first. Reports the wall times, the ratio of the medians, and whether
every run's metrics are identical apart from wall time (they must be). Every Ray process the
benchmark started is killed at the end, also on failure.

Usage::

    python benchmarks/bench_ray.py                       # ioffe2015-mnist --quick, writes benchmarks/results/ray.json
    python benchmarks/bench_ray.py --repeats 1 --steps 300 --out /tmp/ray.json   # a shorter check
    python benchmarks/bench_ray.py --seeds 6           # 12 jobs: less of the tail where one CPU waits

The speed-up two CPUs can give is bounded by the job mix: jobs start in order on the first free
CPU, and a batch-norm arm trains about 1.5x longer than a plain one, so the quick form's 6 jobs
allow at most about 1.67x (``best_speedup_for_this_job_mix_in_order`` in the JSON, computed from
the one-node run's job times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the test helper that starts loopback clusters

import ray  # noqa: E402

from normlab.lab.config import apply_overrides  # noqa: E402
from normlab.lab.experiments import all_experiments  # noqa: E402
from normlab.lab.ray_executor import RayExecutor  # noqa: E402
from normlab.lab.trainer import Trainer  # noqa: E402
from tests.lab.ray_cluster import LocalCluster, ray_environment  # noqa: E402

WARM = {"data.name": "synthetic", "model.widths": [16, 16], "train.steps": 20, "train.seeds": 1,
        "train.eval_every": 10, "train.device": "cpu"}


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def job_seconds(rows: list[dict]) -> list[float]:
    """Each job's training seconds (its last row's wall time), in job order."""
    last: dict[tuple, float] = {}
    for row in rows:
        last[(row["seed"], json.dumps(row.get("point", {})), row["arm"])] = row["wall_time"]
    return list(last.values())


def list_schedule(seconds: list[float], slots: int) -> float:
    """The end of the last job when jobs start in order on the first free of ``slots`` CPUs."""
    free = [0.0] * slots
    for s in seconds:
        free[free.index(min(free))] += s
    return max(free)


def timed_run(cluster: LocalCluster, nodes: int, experiment, config, folder: Path) -> tuple[float, list[dict], float]:
    """Connect, wait for the nodes, warm up, then (seconds, rows, load average) of one run of ``config``."""
    cluster.connect()
    try:
        cluster.wait_for(nodes)
        executor = RayExecutor(cluster.address)
        warm = apply_overrides(experiment.quick_config(), WARM, parse=False)
        warm.train.seeds = max(2, len([n for n in ray.nodes() if n["Alive"]]))
        Trainer(experiment, warm, folder / "warm", progress=False, executor=executor).run()
        start = time.perf_counter()
        rows = Trainer(experiment, config, folder / "run", progress=False, executor=executor).run()
        return time.perf_counter() - start, rows, os.getloadavg()[0]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="ioffe2015-mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="train.steps (default: the quick form's)")
    parser.add_argument("--seeds", type=int, help="train.seeds (default: the quick form's 3)")
    parser.add_argument("--out", default=str(HERE / "results" / "ray.json"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # a kill still stops the clusters

    experiment = all_experiments()[args.experiment]
    config = experiment.quick_config()
    for key, value in (("train.steps", args.steps), ("train.seeds", args.seeds)):
        if value:
            config = apply_overrides(config, {key: value}, parse=False)
    src = str(ROOT / "src")
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    times: dict[str, list[float]] = {"one_node": [], "two_nodes": []}
    loads: dict[str, list[float]] = {"one_node": [], "two_nodes": []}
    reference, identical, one_node_rows = None, True, []
    with tempfile.TemporaryDirectory(prefix="nlbench-", dir="/tmp") as tmp, ray_environment(Path(tmp)):
        one = LocalCluster(Path(tmp) / "one", pythonpath=pythonpath, head_ip="127.0.0.4")
        two = None
        try:
            two = LocalCluster(Path(tmp) / "two", pythonpath=pythonpath)
            two.add_node("127.0.0.3")
            clusters = {"one_node": (one, 1), "two_nodes": (two, 2)}
            for repeat in range(args.repeats):
                order = ("one_node", "two_nodes") if repeat % 2 == 0 else ("two_nodes", "one_node")
                for name in order:
                    cluster, nodes = clusters[name]
                    seconds, rows, load = timed_run(cluster, nodes, experiment, config, Path(tmp) / f"r{repeat}-{name}")
                    times[name].append(seconds)
                    loads[name].append(load)
                    if name == "one_node":
                        one_node_rows = rows
                    same = reference is None or comparable(rows) == reference
                    reference = reference or comparable(rows)
                    identical &= same
                    print(f"repeat {repeat}: {name}: {seconds:.1f} s (load {load:.1f}), metrics identical: {same}",
                          flush=True)
        finally:
            one.stop()
            if two is not None:
                two.stop()
    median = {name: statistics.median(t) for name, t in times.items()}
    # What two CPUs can gain at best with this job mix, in submission order (jobs differ in cost:
    # a batch-norm arm trains slower than a plain one), from the one-node run's job times.
    work = job_seconds(one_node_rows)
    bound = sum(work) / list_schedule(work, 2)
    jobs = len(config.arms) * config.train.seeds
    result = {
        "benchmark": f"{args.experiment} --quick ({jobs} jobs, {config.train.steps} steps each) on Ray: "
                     f"two nodes with 1 CPU each vs one node with 1 CPU",
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": {name: round(m, 1) for name, m in median.items()},
        "speedup_two_nodes_over_one": round(median["one_node"] / median["two_nodes"], 2),
        "metrics_identical": identical,
        "job_seconds_one_node": [round(s, 2) for s in work],
        "best_speedup_for_this_job_mix_in_order": round(bound, 2),
        "load_average_1min": loads,
        "note": "both clusters share this machine's cores; other processes' load (load_average_1min) "
                "makes the speed-up noisy",
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "ray": ray.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit("metrics differ between the clusters")


if __name__ == "__main__":
    main()
