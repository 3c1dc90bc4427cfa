"""The ``normlab`` command: list experiments, run one or all, rebuild a report, compare verdicts.

Exit codes: 0 success; 1 ``--check`` found the measured outcome missing the expected one;
2 bad arguments, config or data; 3 a job failed (its traceback is in the run folder's
``errors/``; finished jobs are kept); 130 interrupted (continue with ``--resume``).
Errors print one line; ``NORMLAB_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from . import __version__
from .lab.executor import JobFailed

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_JOB_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """examples:
  normlab list
  normlab reproduce --quick                           # every experiment, one index of claims and verdicts
  normlab reproduce --claims C4,C5 --seeds 5 --check
  normlab run ioffe2015-mnist --quick                 # minutes on 2 CPU cores, embedded MNIST
  normlab run ioffe2015-mnist --seeds 5 --steps 5000 --check
  normlab run ioffe2015-mnist --data mnist --data-dir ~/data --device cuda
  normlab run ioffe2015-mnist --quick --set train.lr=0.5 --set model.widths=[200,200]
  normlab run ioffe2015-mnist --quick --resume        # continue the latest stopped run
  normlab run ioffe2015-mnist --quick --nproc 2 --sync-bn   # = torchrun --nproc-per-node 2 -m normlab run ...
  normlab report runs/ioffe2015-mnist-quick-20261125-101500    # or a suite folder: every report and the index
  normlab inspect runs/ioffe2015-mnist-quick-20261125-101500               # every checkpoint of the run
  normlab fold runs/ioffe2015-mnist-quick-20261125-101500 folded.pt --arm batch --seed 0
  normlab compare runs/suite-quick-A runs/suite-quick-B --check   # the same verdicts on other seeds / data?

exit codes: 0 success, 1 --check: expected outcome missed, 2 bad arguments/config/data,
3 a job failed (traceback in the run folder's errors/), 130 interrupted (continue with --resume)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not the usage block
        raise _UsageError(f"{message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normlab",
        description="normlab's lab: experiments that test the claims made for batch normalization.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{list,run,reproduce,report,inspect,fold}", parser_class=_Parser)
    sub.add_parser("list", help="the experiments, one line each, with the claims they test")

    run = sub.add_parser("run", help="run an experiment and write its report", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("experiment", help="an experiment name (normlab list)")
    run.add_argument("--quick", action="store_true", help="the experiment's quick form (fewer steps and seeds)")
    _job_options(run)
    run.add_argument("--steps", type=int, help="steps per arm and seed (train.steps)")
    run.add_argument("--out", help="run folder (default runs/EXPERIMENT[-quick]-TIMESTAMP)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.lr=0.1 (repeatable)")
    run.add_argument("--config", metavar="FILE.toml", help="TOML file of overrides ([train] lr = 0.1 ...)")
    run.add_argument("--check", action="store_true", help="exit 1 if the measured outcome misses the expected one")
    run.add_argument("--resume", action="store_true", help="continue a stopped run (--out, or the latest one)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="data-parallel over N processes on this machine, through torchrun (gloo on CPU, nccl on GPU)")
    run.add_argument("--sync-bn", action="store_true",
                     help="with several processes, synchronize batch-norm statistics over the global batch (train.sync_bn)")

    reproduce = sub.add_parser("reproduce", help="run every experiment (or those testing --claims) and write an index of verdicts",
                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce.add_argument("--quick", action="store_true", help="every experiment's quick form")
    reproduce.add_argument("--claims", metavar="C4,C5", help="only the experiments that test these claims")
    reproduce.add_argument("--experiments", metavar="NAME,...", help="only these experiments (normlab list)")
    _job_options(reproduce)
    reproduce.add_argument("--out", help="suite folder (default runs/suite[-quick]-TIMESTAMP)")
    reproduce.add_argument("--check", action="store_true", help="exit 1 if any experiment misses its expected outcome")
    reproduce.add_argument("--resume", action="store_true", help="continue a stopped suite (--out, or the latest one)")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="rebuild report.html and report.md from a run folder (a suite folder: every report and the index)")
    report.add_argument("run_dir")

    compare = sub.add_parser("compare", help="do the verdicts hold on other seeds or data? compare the verdicts of "
                                             "two or more suite or run folders, claim by claim")
    compare.add_argument("folders", nargs="+", metavar="FOLDER", help="suite folders (normlab reproduce) or run folders "
                                                                      "(normlab run)")
    compare.add_argument("--out", metavar="FILE.md", help="also write the comparison (Markdown) here")
    compare.add_argument("--json", metavar="FILE.json", help="also write it as JSON here")
    compare.add_argument("--check", action="store_true",
                         help="exit 1 unless every claim compared has one verdict in every folder")

    inspect = sub.add_parser("inspect", help="list the normalization layers of a checkpoint and the health of their statistics")
    inspect.add_argument("checkpoint", help="a state dict, a lab checkpoint (runs/RUN/checkpoints/ARM-seedN.pt), "
                                            "or a run folder (each of its checkpoints)")
    inspect.add_argument("--arm", help="in a run folder, only this arm's checkpoints")
    inspect.add_argument("--seed", type=int, help="in a run folder, only this seed's checkpoints")

    fold = sub.add_parser("fold", help="fold the batch norms of a lab checkpoint into the preceding layers' weights")
    fold.add_argument("checkpoint", help="a lab checkpoint (runs/RUN/checkpoints/ARM-seedN.pt), or a run folder "
                                         "with --arm and --seed choosing one")
    fold.add_argument("out", help="where to write the folded checkpoint")
    fold.add_argument("--arm", help="the arm the checkpoint trained (default: read from the checkpoint or its file name); "
                                    "in a run folder, the arm to fold")
    fold.add_argument("--seed", type=int, help="in a run folder, the seed to fold (default: its first)")
    return parser


def _job_options(parser: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``reproduce`` share."""
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="run the (arm, grid point, seed) jobs in N worker processes, one torch thread each "
                             "(default: the number of cores; 1 runs them in this process)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where the jobs run: local worker processes (default), or Ray tasks on a cluster "
                             "(pip install 'normlab[ray]'; README: Running the suite on a cluster)")
    parser.add_argument("--address", metavar="ADDR",
                        help="with --executor ray: the cluster to join ('auto': the one ray start started on this "
                             "machine; HOST:PORT: its head); default: start a local cluster for the run")
    parser.add_argument("--job-cpus", type=float, metavar="N", help="with --executor ray: CPUs per job (default 1)")
    parser.add_argument("--job-gpus", type=float, metavar="N", help="with --executor ray: GPUs per job (default 0)")
    parser.add_argument("--seeds", type=int, metavar="K", help="number of seeds (train.seeds)")
    parser.add_argument("--first-seed", type=int, metavar="S", help="seeds S, S+1, ... (train.first_seed)")
    parser.add_argument("--device", help="auto, cpu or cuda (train.device)")
    parser.add_argument("--data", help="data set name (data.name): mnist-5k, digits, synthetic, mnist, fashion-mnist, cifar10")
    parser.add_argument("--data-dir", help="folder with the standard files of mnist / fashion-mnist / cifar10")


def _flag_overrides(args) -> dict:
    """The shared options as config overrides (only those given)."""
    flags = {
        "train.seeds": args.seeds, "train.first_seed": args.first_seed, "train.device": args.device,
        "data.name": args.data, "data.data_dir": args.data_dir,
    }
    return {k: v for k, v in flags.items() if v is not None}


def _jobs(args) -> int:
    from .lab.executor import default_jobs

    if args.jobs is not None and args.jobs < 1:
        raise _UsageError(f"--jobs must be at least 1, got {args.jobs}.")
    return args.jobs if args.jobs is not None else (1 if "WORLD_SIZE" in os.environ else default_jobs())


def _executor(args):
    """``--executor ray``: a RayExecutor (Ray imported now, so a missing extra fails first); else None."""
    if args.executor != "ray":
        given = [flag for flag, value in (("--address", args.address), ("--job-cpus", args.job_cpus),
                                          ("--job-gpus", args.job_gpus)) if value is not None]
        if given:
            raise _UsageError(f"{', '.join(given)} only apply to --executor ray; add --executor ray or drop them.")
        return None
    from .lab.ray_executor import RayExecutor, import_ray

    import_ray()
    return RayExecutor(args.address, job_cpus=1 if args.job_cpus is None else args.job_cpus,
                       job_gpus=0 if args.job_gpus is None else args.job_gpus, local_cpus=args.jobs)


# The option that sets each config key, for the messages of check_user_overrides.
_FLAG_NAMES = {"train.sync_bn": "--sync-bn", "train.steps": "--steps", "train.seeds": "--seeds",
               "train.first_seed": "--first-seed", "train.device": "--device", "data.name": "--data",
               "data.data_dir": "--data-dir"}


def _resolve_config(args):
    from .lab.config import apply_overrides, check_user_overrides, load_toml_overrides, parse_set
    from .lab.experiments.registry import get_experiment

    experiment = get_experiment(args.experiment)
    config = experiment.quick_config() if args.quick else experiment.default_config()
    given: dict[str, str] = {}  # the keys the user set, and how: a value no job would use is an error
    if args.config:
        file_overrides = load_toml_overrides(args.config)
        arms, grid = file_overrides.pop("__arms__", None), file_overrides.pop("__grid__", None)
        config = apply_overrides(config, file_overrides, parse=False)
        given.update({key: f"--config {args.config} ({key})" for key in file_overrides})
        if arms is not None:
            config.arms = {name: dict(body) for name, body in arms.items()}
        if grid is not None:
            config.grid = {axis: values for axis, values in grid.items()}
    flags = {"train.sync_bn": True if args.sync_bn else None, "train.steps": args.steps}
    flags = {**{k: v for k, v in flags.items() if v is not None}, **_flag_overrides(args)}
    config = apply_overrides(config, flags)
    given.update({key: f"{_FLAG_NAMES[key]} ({key})" for key in flags})
    sets = parse_set(args.set)
    config = apply_overrides(config, sets)
    given.update({key: f"--set {key}={value}" for key, value in sets.items()})
    # after the file's arms and grid: they decide what is ignored
    check_user_overrides(config, given, experiment.derived)
    return experiment, config


def _run_dir(args, config) -> Path:
    if args.out:
        return Path(args.out)
    stem = f"{config.experiment}{'-quick' if args.quick else ''}"
    if args.resume:
        return _latest(stem)
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_list() -> int:
    from .lab.claims import CLAIMS
    from .lab.experiments import all_experiments

    experiments = all_experiments()
    width = max(len(name) for name in experiments)
    claims = {name: ",".join(e.claims) for name, e in experiments.items()}
    cwidth = max(len(c) for c in claims.values())
    for name, experiment in sorted(experiments.items()):
        print(f"{name:<{width}}  {claims[name]:<{cwidth}}  {experiment.description}")
    tested = {c for e in experiments.values() for c in e.claims}
    untested = [c for c in CLAIMS if c not in tested]
    print(f"\n{len(tested)} of {len(CLAIMS)} claims have an experiment" +
          (f"; none yet for {', '.join(untested)}." if untested else "."))
    return EXIT_OK


def _cmd_reproduce(args) -> int:
    from .lab.report import format_summary_table
    from .lab.suite import SuiteOptions, run_suite, select_experiments
    from .lab.trainer import Interrupted

    def split(text):
        return [part.strip() for part in text.split(",") if part.strip()] if text else None

    experiments = select_experiments(claims=split(args.claims), names=split(args.experiments))
    options = SuiteOptions([e.name for e in experiments], args.quick, _flag_overrides(args))
    for experiment in experiments:
        options.config(experiment)  # a bad override fails here, before anything runs
    stem = f"suite{'-quick' if args.quick else ''}"
    out = Path(args.out) if args.out else _latest(stem) if args.resume else Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    def say(line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
    try:
        summaries = run_suite(out, options, jobs=_jobs(args), resume=args.resume, progress=not args.no_progress, say=say,
                              executor=_executor(args))
    except Interrupted as stop:
        say(f"normlab: interrupted ({stop}); continue with the same command plus --resume --out {out}")
        return EXIT_INTERRUPTED
    for summary in summaries:
        print(f"== {summary.experiment}\n{format_summary_table(summary)}\n")
    print(f"index: {out / 'index.html'}\n       {out / 'index.md'}\n({time.perf_counter() - started:.0f} s)")
    missed = [s.experiment for s in summaries if not s.met]
    if args.check and missed:
        say(f"normlab: --check: expected outcome missed by {', '.join(missed)}")
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _latest(stem: str) -> Path:
    candidates = sorted(Path("runs").glob(f"{stem}-2*"), key=lambda p: p.name)
    if not candidates:
        raise _UsageError(f"--resume found no earlier run under runs/{stem}-*; give its folder with --out.")
    return candidates[-1]


def _launch_torchrun(args, argv: list[str]) -> int:
    """Run this same command under torchrun with ``--nproc`` processes (and without ``--nproc``)."""
    import socket
    import subprocess

    if args.nproc < 1:
        raise _UsageError(f"--nproc must be at least 1, got {args.nproc}.")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    if "--out" not in rest and not any(a.startswith("--out=") for a in rest):
        experiment, config = _resolve_config(args)  # every process must write to the same folder
        rest += ["--out", str(_run_dir(args, config))]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "normlab", *rest]
    return subprocess.call(command)


def _cmd_run(args) -> int:
    from .lab.config import grid_points
    from .lab.report import format_summary_table, write_report
    from .lab.trainer import Interrupted, Trainer

    experiment, config = _resolve_config(args)
    run_dir = _run_dir(args, config)
    jobs = _jobs(args)
    executor = _executor(args)
    trainer = Trainer(experiment, config, run_dir, resume=args.resume, progress=not args.no_progress, jobs=jobs,
                      executor=executor)
    main = trainer.team.main
    if main:
        team = f", {trainer.team.world} processes" if trainer.team.active else ""
        points = len(grid_points(config))
        grid = f" x {points} grid points" if config.grid else ""
        workers = f", {jobs} worker processes" if jobs > 1 and not trainer.team.active else ""
        workers = f", {executor}" if executor is not None else workers
        # The jobs' steps, which an experiment may derive per job (equal epochs at every batch size).
        steps = sorted({job.steps for job in trainer.jobs()})
        steps_text = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        print(f"normlab: {experiment.name}: {len(config.arms)} arms{grid} x {config.train.seeds} seeds x "
              f"{steps_text} steps on {config.data.name} ({trainer.device}{team}{workers}) -> {run_dir}",
              file=sys.stderr)
    try:
        trainer.run()
    except Interrupted as stop:
        if main:
            print(f"normlab: interrupted ({stop}); continue with the same command plus --resume --out {run_dir}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if trainer.team.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not main:
        return EXIT_OK
    paths = write_report(run_dir, experiment=experiment)
    summary = _summary(paths)
    print(format_summary_table(summary))
    print(f"\nreport: {paths['html']}\n        {paths['md']}")
    if args.check and not summary.met:
        print(f"normlab: --check: expected outcome missed: {summary.expected}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _summary(paths):
    import json

    from .lab.experiments.base import Summary

    return Summary(**json.loads(Path(paths["summary"]).read_text()))


def _cmd_report(args) -> int:
    from .lab.report import format_summary_table, write_report
    from .lab.suite import is_suite, write_index

    if is_suite(args.run_dir):
        paths = write_index(Path(args.run_dir), rebuild=True)
        print(f"index: {paths['html']}\n       {paths['md']}")
        return EXIT_OK
    paths = write_report(Path(args.run_dir))
    print(format_summary_table(_summary(paths)))
    print(f"\nreport: {paths['html']}\n        {paths['md']}")
    return EXIT_OK


def _cmd_compare(args) -> int:
    import json

    from .lab.compare import compare_folders, comparison_md
    from .lab.runfiles import atomic_write_text, make_folder

    comparison = compare_folders(args.folders)
    text = comparison_md(comparison)
    for option, path, body in (("--out", args.out, text),
                               ("--json", args.json, json.dumps(comparison.to_dict(), indent=2) + "\n")):
        if path:
            target = Path(path)
            if target.is_dir():
                raise _UsageError(f"{option} {path!r} is a folder; give a file name, e.g. {target / 'compare.md'}.")
            make_folder(target.parent, what=f"the folder of {option} {path!r}", option=option)
            atomic_write_text(target, body)
    print(text, end="")
    return EXIT_CHECK_FAILED if args.check and not comparison.robust else EXIT_OK


def _cmd_fold(args) -> int:
    from .lab.checkpoint import fold_checkpoint, run_checkpoints

    paths = run_checkpoints(args.checkpoint, arm=args.arm, seed=args.seed)
    seeds = {int(m.group(1)) for p in paths if (m := re.search(r"-seed(\d+)$", p.stem))}
    if len(paths) > 1 and args.seed is None and seeds:  # a run folder: its first seed of the arm(s) asked for
        paths = [p for p in paths if p.stem.endswith(f"-seed{min(seeds)}")]
    if len(paths) > 1:
        raise _UsageError(f"{args.checkpoint} holds {len(paths)} checkpoints that fit: "
                          f"{', '.join(p.name for p in paths)}; choose one with --arm (and --seed).")
    print(fold_checkpoint(paths[0], args.out, arm=args.arm))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``normlab`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            if args.nproc is not None and args.executor == "ray":
                raise _UsageError("--nproc and --executor ray do not combine: a data-parallel run trains in "
                                  "processes on this machine; drop one of them.")
            if args.nproc is not None:
                return _launch_torchrun(args, list(argv if argv is not None else sys.argv[1:]))
            return _cmd_run(args)
        if args.command == "reproduce":
            return _cmd_reproduce(args)
        if args.command == "inspect":
            from .lab.checkpoint import inspect_checkpoint, run_checkpoints

            paths = run_checkpoints(args.checkpoint, arm=args.arm, seed=args.seed)
            print("\n\n".join(inspect_checkpoint(path) for path in paths))
            return EXIT_OK
        if args.command == "fold":
            return _cmd_fold(args)
        if args.command == "compare":
            return _cmd_compare(args)
        return _cmd_report(args)
    except (_UsageError, ValueError) as err:
        if os.environ.get("NORMLAB_DEBUG"):
            raise
        print(f"normlab: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except JobFailed as err:
        if os.environ.get("NORMLAB_DEBUG"):
            raise
        print(f"normlab: error: {err}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
