"""A real two-node Ray cluster on 127.0.0.1, started as users start one (`ray start --head`, then
`ray start --address` for the second node), each node with 1 CPU (by default) and a bounded object store.

Each node runs `ray start --block` in a process group of its own, so a test can kill one node (its raylet,
object store and workers) with one signal to that group, and teardown ends exactly the processes it started
(never `ray stop`, which would end every Ray on the machine).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

OBJECT_STORE = 100 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (a node started with start_new_session: all its processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z" and int(d.name) != sid:
                out.append(int(d.name))
    return out


def ray_command() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


class LocalCluster:
    def __init__(self, temp_dir: Path, cpus: int = 1, object_store: int = OBJECT_STORE):
        self.temp_dir = Path(temp_dir)
        self.cpus, self.object_store = cpus, object_store
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        # Ray 2.60 clusters want a token: every node and driver of this one gets it in its environment
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(),
                    "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, *args, log: str) -> subprocess.Popen:
        ports = [free_port() for _ in range(6)]
        base = 20000 + (self.port * 7 + 400 * len(self.nodes)) % 12000   # below the kernel's ephemeral ports
        cmd = [*ray_command(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--object-store-memory", str(self.object_store), "--disable-usage-stats",
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--metrics-export-port", str(ports[2]), "--dashboard-agent-listen-port", str(ports[3]),
               "--dashboard-agent-grpc-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
               "--min-worker-port", str(base), "--max-worker-port", str(base + 200), *args]
        env = {**self.env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        out = open(self.temp_dir / log, "w")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.nodes.append(p)
        return p

    def start(self, workers: int = 1, timeout: float = 120) -> "LocalCluster":
        try:
            return self._start_all(workers, timeout)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, workers: int, timeout: float) -> "LocalCluster":
        self._start("--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.temp_dir / "ray"), log="head.log")
        self._wait(1, timeout)
        for i in range(workers):
            self._start("--address", self.address, log=f"node{i + 1}.log")
            self._wait(2 + i, timeout)
        return self

    def _wait(self, n: int, timeout: float) -> None:
        """Until the cluster reports `n` live nodes (asked from a short-lived driver)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"a ray node exited: {self.log()}")
            r = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                               timeout=60, env=self.env)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} ray nodes not up in {timeout} s: {self.log()}")

    def kill(self, node: subprocess.Popen, sig=signal.SIGKILL) -> None:
        """Signal every process of the node: its `ray start` group and its workers (same session, own groups)."""
        for pid in [node.pid] + session_members(node.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        node.wait(timeout=60)

    def stop(self) -> None:
        for p in reversed(self.nodes):   # the worker node first, then the head
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(p)
            for pid in session_members(p.pid):   # what the node left behind (workers)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self) -> str:
        return " | ".join((self.temp_dir / f).read_text()[-800:] for f in sorted(os.listdir(self.temp_dir))
                          if f.endswith(".log"))
