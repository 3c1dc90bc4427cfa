"""The quick claims suite with ``--jobs 2`` against ``--jobs 1``, side by side: wall time and metrics.

Runs ``normlab reproduce --quick`` twice per repeat in fresh folders, once with one process
(every job one after another) and once with two worker processes, alternating which goes first.
Reports the wall times, their ratio (median over repeats), and whether every experiment's
metrics are identical apart from wall time (they must be: jobs are seeded and run with one
torch thread either way).

Usage::

    python benchmarks/bench_suite.py                       # writes benchmarks/results/suite.json
    python benchmarks/bench_suite.py --repeats 2 --experiments ioffe2015-mnist --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_suite(jobs: int, folder: Path, experiments: str | None) -> float:
    """Wall seconds of one ``normlab reproduce --quick`` run (set-up of the command included)."""
    command = [sys.executable, "-m", "normlab", "reproduce", "--quick", "--no-progress", "--jobs", str(jobs),
               "--out", str(folder)]
    if experiments:
        command += ["--experiments", experiments]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def metrics(folder: Path) -> dict[str, list[dict]]:
    """Every experiment's metrics rows without wall time."""
    out = {}
    for path in sorted(folder.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--experiments", help="comma-separated experiment names (default: all)")
    parser.add_argument("--out", default=str(HERE / "results" / "suite.json"))
    args = parser.parse_args()

    times: dict[int, list[float]] = {1: [], 2: []}
    identical = True
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        for repeat in range(args.repeats):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            folders = {}
            for jobs in order:
                folders[jobs] = Path(tmp) / f"r{repeat}-jobs{jobs}"
                times[jobs].append(run_suite(jobs, folders[jobs], args.experiments))
                print(f"repeat {repeat}: --jobs {jobs}: {times[jobs][-1]:.1f} s", flush=True)
            one, two = metrics(folders[1]), metrics(folders[2])
            same = one == two and bool(one)
            identical &= same
            print(f"repeat {repeat}: metrics identical apart from wall time: {same} ({len(one)} experiments, "
                  f"{sum(len(r) for r in one.values())} rows)", flush=True)
    median = {jobs: statistics.median(t) for jobs, t in times.items()}
    result = {
        "benchmark": "quick claims suite, --jobs 2 vs --jobs 1",
        "experiments": args.experiments or "all",
        "repeats": args.repeats,
        "seconds": {f"jobs{j}": t for j, t in times.items()},
        "median_seconds": {f"jobs{j}": round(m, 1) for j, m in median.items()},
        "speedup_jobs2_over_jobs1": round(median[1] / median[2], 2),
        "metrics_identical": identical,
        "machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"--jobs 1: {median[1]:.1f} s, --jobs 2: {median[2]:.1f} s, speed-up {result['speedup_jobs2_over_jobs1']}x; "
          f"metrics identical: {identical} -> {args.out}")


if __name__ == "__main__":
    main()
