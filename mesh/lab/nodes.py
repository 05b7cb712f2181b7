"""One lab node's life on the host: its overlay layer mount, its nspawn command line, its supervisor, and
stopping it (gracefully, then by force). It never touches the network (network.py) or what is in the layer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from mesh.lab import supervisor as supervisor_module
from mesh.lab.errors import LabError, run
from mesh.lab.layers import CONSUL_IN_NODE, IMAGES_IN_NODE, Images
from mesh.lab.state import LabPaths, NodeRecord, is_alive, process_start_time
from mesh.lab.topology import Node

log = structlog.get_logger("mesh.lab.nodes")
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class NodeFiles:
    """A node's directory in the lab state: layer (upper, work), mount point, Docker's data, logs, pid file."""

    base: Path

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def docker(self) -> Path:
        return self.base / "docker"

    @property
    def prepared(self) -> Path:
        return self.base / "prepared"

    @property
    def spec(self) -> Path:
        return self.base / "supervisor.json"

    @property
    def log(self) -> Path:
        return self.base / "supervisor.log"

    @property
    def pidfile(self) -> Path:
        return self.base / "nspawn.pid"


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path in this mount namespace, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(_unescape(line.split()[4]))
        if point == path or path in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def mount_layer(files: NodeFiles, rootfs: Path) -> bool:
    """Mount the node's overlay (its own upper layer over the shared rootfs); return whether it was needed."""
    if files.root in mounts_under(files.root):
        return False
    for directory in (files.upper, files.work, files.root):
        directory.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={rootfs},upperdir={files.upper},workdir={files.work}"
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(files.root)])
    return True


def unmount_all(path: Path) -> list[Path]:
    """Unmount everything at or below path, deepest first (lazily when busy)."""
    points = mounts_under(path)
    for point in points:
        if run(["umount", str(point)], check=False).returncode != 0:
            run(["umount", "-l", str(point)], check=False)
    return points


def nspawn_command(node: Node, files: NodeFiles, images: Images) -> tuple[list[str], dict[str, str]]:
    argv = ["systemd-nspawn", "--quiet", "-D", str(files.root), "--boot", "--register=no", "--keep-unit",
            f"--machine={node.name}", f"--network-namespace-path=/run/netns/{node.netns}",
            "--link-journal=no", "--resolv-conf=off", "--timezone=off", "--console=passive"]
    env: dict[str, str] = {}
    if node.role != "container_host":
        # A VM's root manages its own network namespace's firewall (mesh's nftables table): nspawn drops
        # CAP_NET_ADMIN unless the container has a private network, which --network-namespace-path is.
        argv.append("--capability=CAP_NET_ADMIN")
    if node.role == "consul":
        argv.append(f"--bind-ro={images.consul}:{CONSUL_IN_NODE}")
    if node.role == "container_host":
        # Docker inside nspawn on cgroup v1 (REAL-PARTS.md): writable /proc/sys, all capabilities, keyrings and
        # bpf, and a real directory as Docker's data root (overlay2 refuses an overlay upper layer)
        env["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] = "1"
        files.docker.mkdir(parents=True, exist_ok=True)
        argv += ["--capability=all", "--system-call-filter=@keyring bpf",
                 f"--bind={files.docker}:/var/lib/docker", f"--bind-ro={images.app_tar.parent}:{IMAGES_IN_NODE}"]
    return argv, env


def start_supervisor(paths: LabPaths, files: NodeFiles, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Start the node's supervisor, detached from this command; return its PID and start time."""
    import json
    import shutil

    # a copy of the supervisor in the state dir, so that it does not depend on the checkout that started it
    script = paths.root / "supervisor.py"
    source = Path(supervisor_module.__file__)
    if not script.exists() or script.read_bytes() != source.read_bytes():
        shutil.copyfile(source, script)
    spec = {"argv": argv, "env": env, "pidfile": str(files.pidfile), "cgroup": f"mesh-lab-{files.base.name}"}
    files.spec.write_text(json.dumps(spec))
    with open(files.log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-I", str(script), str(files.spec)], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
                                   close_fds=True)
    start = process_start_time(process.pid)
    if start is None:
        raise LabError(f"the supervisor of {files.base.name} exited at once; see {files.log}")
    return process.pid, start


def nspawn_pid(files: NodeFiles) -> int | None:
    """The node's running nspawn, from its pid file, checked against /proc (never a reused PID)."""
    try:
        pid = int(files.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"systemd-nspawn" in cmdline[0] and str(files.root).encode() in cmdline else None


def running(record: NodeRecord, files: NodeFiles) -> bool:
    return is_alive(record.supervisor_pid, record.supervisor_start) and nspawn_pid(files) is not None


def _signal(pid: int | None, signum: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def stop_node(record: NodeRecord, files: NodeFiles, timeout: float = STOP_TIMEOUT) -> None:
    """Power the node off (SIGTERM to nspawn is an orderly shutdown), then kill what is left after timeout."""
    supervisor_pid = record.supervisor_pid if is_alive(record.supervisor_pid, record.supervisor_start) else None
    container = nspawn_pid(files)
    if supervisor_pid is None and container is None:
        return
    log.info("stopping node", node=record.name, supervisor=supervisor_pid, nspawn=container)
    _signal(supervisor_pid if supervisor_pid is not None else container, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor_left = supervisor_pid is not None and is_alive(supervisor_pid, record.supervisor_start)
        if not supervisor_left and nspawn_pid(files) is None:
            return
        time.sleep(0.2)
    log.warning("node did not stop in time: killing it", node=record.name, timeout=timeout)
    _signal(nspawn_pid(files), signal.SIGKILL)
    if supervisor_pid is not None and is_alive(supervisor_pid, record.supervisor_start):
        _signal(supervisor_pid, signal.SIGKILL)
    time.sleep(0.5)


def ssh_banner(address: str, timeout: float = 1.0) -> bool:
    """Whether sshd answers on address:22 with its version banner."""
    try:
        with socket.create_connection((address, 22), timeout=timeout) as connection:
            connection.settimeout(timeout)
            return connection.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_sshd(node: Node, files: NodeFiles, record: NodeRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh_banner(node.address):
            return
        if not is_alive(record.supervisor_pid, record.supervisor_start):
            raise LabError(f"{node.name} stopped while booting; see {files.log}")
        time.sleep(0.1)
    raise LabError(f"{node.name}: sshd did not answer on {node.address}:22 within {timeout:.0f} s",
                   hint=f"see {files.log}")
