"""What the Ray executor runs on the nodes besides the jobs, shipped by value
(:func:`ray.cloudpickle.register_pickle_by_value`), so it imports nothing of normlab at module
level: the node check (:func:`probe_node`: normlab imports, is the driver's code, and can read
the run's data; on a node without normlab it must still run, to say so) and the board (a small
actor that starts in a bare Python process, without torch).

>>> from pathlib import Path
>>> import normlab
>>> len(code_digest(Path(normlab.__file__).parent))
16
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["Board", "code_digest", "probe_node"]


class Board:
    """A Ray actor shared by the driver and the tasks of one execution: the stop flag, each job's
    attempts (a retry is a second attempt) and steps done, for the progress bar."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stop = False
        self.attempts: dict[str, int] = {}
        self.steps: dict[str, int] = {}

    def begin(self, key: str) -> tuple[int, bool]:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key], self.stop

    def report(self, key: str, steps: int) -> bool:
        self.steps[key] = max(self.steps.get(key, 0), steps)  # a retry counts its steps once
        return self.stop

    def request_stop(self) -> None:
        self.stop = True

    def state(self) -> tuple[int, list[str]]:
        return sum(self.steps.values()), list(self.attempts)


def code_digest(package: Path) -> str:
    """A short hash of a package's source files (``*.py``, ``*.cpp``) and their relative paths:
    equal on two machines exactly when they would run the same code."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(package).rglob("*") if p.suffix in (".py", ".cpp") and p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def probe_node(digest: str, samples: list[tuple[str, dict[str, Any], str, int, tuple]]) -> dict[str, Any]:
    """Run on one node: ``{"node": address, "pid": pid, "problems": [...]}``, problems empty when
    the node can run the jobs. ``samples``: one ``(experiment, config dict, arm, seed, point)``
    per distinct data set and device of the run, whose data set is loaded here (and kept in this
    worker for the jobs that follow)."""
    try:
        import ray

        where = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - the address is for the message only
        where = socket.gethostname()
    report: dict[str, Any] = {"node": where, "pid": os.getpid(), "problems": []}
    problems = report["problems"]
    try:
        import normlab
        from normlab.lab.job import Job, dataset_for, resolve_device
    except Exception as err:  # noqa: BLE001 - any import failure is reported the same way
        problems.append(f"cannot import normlab ({_first_line(err)}); install it on every node "
                        f"(pip install 'normlab[lab,ray]', the same version and source as the driver's)")
        return report
    here = Path(normlab.__file__).parent
    if code_digest(here) != digest:
        problems.append(f"its normlab ({here}) is not the driver's code (source digest {code_digest(here)} != "
                        f"{digest}); install the driver's normlab on every node, or the metrics could differ")
        return report
    for experiment, config, arm, seed, point in samples:
        job = Job(experiment, "", config, arm, seed, tuple(tuple(item) for item in point))
        cfg = job.train_config()
        try:
            dataset_for(cfg, resolve_device(cfg.train.device))
        except Exception as err:  # noqa: BLE001 - reported with the data set's name and folder
            folder = f" from data_dir {cfg.data.data_dir!r}" if cfg.data.data_dir else ""
            problems.append(f"cannot load data set {cfg.data.name!r}{folder} on device {cfg.train.device!r} "
                            f"({_first_line(err)}); put the data at the same path on every node")
    return report
