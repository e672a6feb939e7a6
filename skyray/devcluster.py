"""A real multi-node Ray cluster on one machine, whose worker nodes cannot see the driver's files.

A head node (the driver's: no group slots) plus worker nodes started with ``ray start``, each inside its own mount
namespace with a private tmpfs over /tmp (``unshare --mount``; needs root).  Only /tmp is private, so whatever the
driver keeps under its /tmp (storyboards, input files, ``--out``) is out of the workers' sight, exactly as on
separate machines.  The code and the venv stay visible to every node (when they live under /tmp themselves they
are bind-mounted back into each worker's private /tmp).  Used by the multi-node tests and ``bench/multinode.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE = 150 * 1024 * 1024  # bytes per node: three nodes fit in 24 GiB with room for the rest


def _free_port(lo: int = 20000, hi: int = 30000) -> int:
    # Outside Ray's worker port range (10002-19999), which `ray start --head --port` refuses.
    for port in range(lo + os.getpid() % 5000, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the Ray head")


def _rebinds() -> list[str]:
    """Shell lines that make the code and the venv visible again inside a worker's private /tmp."""
    lines = []
    for i, path in enumerate(sorted({str(ROOT), sys.prefix})):
        if path == "/tmp" or path.startswith("/tmp/"):
            hold = f"/run/skyray-hold-{os.getpid()}-{i}"
            lines.append(f"mkdir -p {hold} && mount --bind {path} {hold}")
            lines.append(f"__AFTER__mkdir -p {path} && mount --bind {hold} {path}")
    return lines


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    logs: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def add_worker(self, name: str, slots: int = 1) -> None:
        before = [line for line in _rebinds() if not line.startswith("__AFTER__")]
        after = [line[len("__AFTER__"):] for line in _rebinds() if line.startswith("__AFTER__")]
        ray = Path(sys.executable).with_name("ray")
        script = " && ".join(
            [*before, "mount -t tmpfs tmpfs /tmp", *after,
             f"exec {ray} start --address {self.address} --num-cpus 1 --resources '{{\"skyray_slot\": {slots}}}' "
             f"--object-store-memory {OBJECT_STORE} --node-name {name} --node-ip-address 127.0.0.1 --block "
             "--disable-usage-stats"])
        log = open(self.logs / f"{name}.log", "ab")
        self.workers[name] = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_nodes()

    def kill_worker(self, name: str) -> None:
        """A node loss: its raylet, its workers and its objects go at once.  Every process of the node lives in
        its mount namespace, whatever process group or session Ray gave it: SIGKILL them all."""
        proc = self.workers.pop(name)
        try:
            ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        except OSError:
            ns = None
        if ns is not None and ns != os.readlink("/proc/self/ns/mnt"):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                        os.kill(pid, signal.SIGKILL)
                except OSError:  # gone already, or not ours to read
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def alive_nodes(self) -> int:
        out = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", self.address],
                             env=self.env, capture_output=True, text=True, timeout=60)
        active = out.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in out.stdout else ""
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node"))

    def wait_nodes(self, timeout: float = 90) -> None:
        want = 1 + len(self.workers)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.alive_nodes() >= want:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {want} nodes within {timeout:.0f} s (see {self.logs})")

    def skyray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``skyray ARGS`` as a driver on the head node's machine (it sees /tmp; the workers do not)."""
        proc = subprocess.run([sys.executable, "-m", "skyray.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd="/tmp")
        if check and proc.returncode != 0:
            raise RuntimeError(f"skyray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start_skyray(self, *args: str, log: Path) -> subprocess.Popen:
        f = open(log, "wb")
        return subprocess.Popen([sys.executable, "-m", "skyray.cli", *args], env=self.env, stdout=f,
                                stderr=subprocess.STDOUT, cwd="/tmp", start_new_session=True)


def start_cluster(logs: Path, workers: int = 2, object_store: int = OBJECT_STORE) -> tuple[Cluster, subprocess.Popen]:
    """A head node plus ``workers`` worker nodes (one CPU, one group slot each); stop it with ``stop_cluster``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "SKYRAY_CPU_THREADS": "1", "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    ray = str(Path(sys.executable).with_name("ray"))
    # --block keeps the head in one process group of its own: stopping it stops this cluster and nothing else
    # (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--resources", '{"skyray_slot": 0}', "--object-store-memory", str(object_store),
                             "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address",
                             "127.0.0.1"],
                            env=env, stdout=open(logs / "head.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    c = Cluster(f"127.0.0.1:{port}", env, logs)
    try:
        c.wait_nodes()
        for i in range(workers):
            c.add_worker(f"w{i + 1}")
    except BaseException:
        stop_cluster(c, head)
        raise
    return c, head


def stop_cluster(c: Cluster, head: subprocess.Popen) -> None:
    for name in list(c.workers):
        c.kill_worker(name)
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    # `ray start --head` left its address where a later `ray.init(address="auto")` on this machine would look.
    current = Path("/tmp/ray/ray_current_cluster")
    try:
        if current.read_text().strip() == c.address or current.read_text().strip().endswith(
                ":" + c.address.rsplit(":", 1)[1]):
            current.unlink()
    except OSError:
        pass


def unshare_problem() -> str | None:
    """Why this machine cannot run such a cluster, or None."""
    if os.geteuid() != 0:
        return "a multi-node cluster on one machine needs root (unshare --mount with a private tmpfs over /tmp)"
    if shutil.which("unshare") is None:
        return "a multi-node cluster on one machine needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp && test ! -e /tmp/.skyray-probe"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --mount does not work here: {probe.stderr.strip()}"
