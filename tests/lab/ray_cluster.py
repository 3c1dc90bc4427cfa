"""A real Ray cluster on this machine, over loopback addresses only, for the Ray tests and benchmark.

Ray advertises the machine's network interface when asked for 127.0.0.1, but keeps the other
loopback addresses: the head listens on 127.0.0.2 and further nodes on 127.0.0.3, 127.0.0.4...
Every node is a ``ray start --block`` process in its own process group with its own temp folder;
:meth:`LocalCluster.stop` kills exactly those groups and the workers their raylets spawned
(never ``ray stop``, which would stop every Ray process of this user on the machine).

Ray 2.60 turns token authentication on for a new ``ray.init()`` cluster and writes a token to
``~/.ray/auth_token``, after which every ``ray start`` of this user on the machine requires it.
The clusters here, reachable on loopback addresses only, run with ``RAY_AUTH_MODE=disabled``
(set for this process too while it uses them), so nothing is written to the home folder, and
keep their files in our temp folders (``RAY_TMPDIR``, for a cluster ``ray.init`` starts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HEAD_IP = "127.0.0.2"
RAY = str(Path(sys.executable).with_name("ray"))
AUTH = {"RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_environment(temp_dir: Path):
    """This process's Ray settings while it uses our clusters: their authentication mode, and
    ``temp_dir`` as the temp folder of a cluster that ``ray.init()`` starts."""
    saved = {key: os.environ.get(key) for key in (*AUTH, "RAY_TMPDIR")}
    os.environ.update(AUTH, RAY_TMPDIR=str(temp_dir))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port(host: str = HEAD_IP) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LocalCluster:
    """A head at ``head_ip`` (127.0.0.2) and ``add_node`` nodes at 127.0.0.3, ...; ``address`` is
    ``HOST:PORT``; ``pythonpath`` is the nodes' (and so their workers') ``PYTHONPATH``."""

    def __init__(self, temp_dir: Path, *, head_cpus: int = 1, pythonpath: str | None = None, head_ip: str = HEAD_IP):
        # Ray keeps session folders under the temp folder and refuses socket paths over 107 bytes.
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.pythonpath = pythonpath
        self.nodes: list[subprocess.Popen] = []
        self.port = free_port(head_ip)
        self.address = f"{head_ip}:{self.port}"
        try:
            self._start("head", ["--head", "--node-ip-address", head_ip, "--port", str(self.port),
                                 "--num-cpus", str(head_cpus), "--include-dashboard", "false",
                                 "--dashboard-port", str(free_port()), "--temp-dir", str(self.temp_dir)])
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, options: list[str], pythonpath: str | None = None) -> subprocess.Popen:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **AUTH)
        path = pythonpath if pythonpath is not None else self.pythonpath
        if path is not None:
            env["PYTHONPATH"] = path
        log = open(self.temp_dir / f"{name}.log", "w")
        node = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port()), *options],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.nodes.append(node)
        return node

    def add_node(self, ip: str, *, cpus: int = 1, pythonpath: str | None = None) -> subprocess.Popen:
        """Start a node at ``ip`` joined to the head; returns its ``ray start`` process."""
        return self._start(f"node-{ip}", ["--address", self.address, "--node-ip-address", ip,
                                          "--num-cpus", str(cpus)], pythonpath)

    def wait_for(self, nodes: int, timeout: float = 90.0) -> None:
        """Wait until ``nodes`` nodes are alive (needs ``ray.init(address=self.address)`` done)."""
        import ray

        deadline = time.monotonic() + timeout
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a ray node exited with {node.returncode}; see the logs in {self.temp_dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {nodes} ray nodes alive after {timeout:.0f} s; logs in {self.temp_dir}")
            time.sleep(0.2)

    def connect(self, timeout: float = 90.0) -> None:
        """``ray.init`` this process to the cluster, retrying while the head starts (inside
        :func:`ray_environment`)."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                return
            except (ConnectionError, RuntimeError, TimeoutError):
                if time.monotonic() > deadline or self.nodes[0].poll() is not None:
                    raise
                time.sleep(0.5)

    def pids(self) -> set[int]:
        """The pids of our ``ray start`` processes, their groups and every descendant (workers too)."""
        import psutil

        found = set()
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                found |= {node.pid, *(child.pid for child in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        groups = {node.pid for node in self.nodes}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in groups:
                    found.add(proc.pid)
                    found |= {child.pid for child in proc.children(recursive=True)}
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return found

    def stop_node(self, node: subprocess.Popen) -> None:
        """Kill one node's processes (its group and its workers)."""
        import psutil

        doomed = set()
        try:
            doomed = {node.pid, *(c.pid for c in psutil.Process(node.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        _kill(doomed, group=node.pid)
        node.wait()

    def stop(self) -> None:
        """Kill every process of the cluster (by pid and process group), then reap ours."""
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping must go on
            pass
        doomed = self.pids()  # a snapshot taken just before: no pid of someone else's
        for node in self.nodes:
            _kill(doomed, group=node.pid)
        for node in self.nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
                pass

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill(pids: set[int], group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
