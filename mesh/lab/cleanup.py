"""What `mesh lab down` sweeps besides nodes and links: stray processes, cgroup directories, Envoy's shared
memory files, sysctls and the state files. It removes only what carries the lab's marks or paths.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import structlog

from mesh.lab.errors import LabError, run
from mesh.lab.network import lab_netns_names, netns_pids
from mesh.lab.state import LabPaths

log = structlog.get_logger("mesh.lab.cleanup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Top-level cgroup directories the lab leaves in the host's hierarchies: Docker's (no cgroup namespace on v1)
# and each node's own (its supervisor's, holding nspawn's `payload` and `supervisor`: see supervisor.py)
CGROUP_NAMES = ("docker",)
CGROUP_PREFIXES = ("mesh-lab-",)


def check_free_space(path: Path, needed: int) -> None:
    probe = path if path.exists() else path.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise LabError(f"the disk holding {path} is full or nearly ({free >> 20} MiB free, the lab needs "
                       f"{needed >> 20} MiB)", hint="free some space, or set MESH_LAB_STATE to another disk")


def _cmdline(pid: int) -> list[str]:
    try:
        return [part.decode(errors="replace") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return []


def _root_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return ""


def lab_processes(paths: LabPaths) -> list[int]:
    """Supervisors run from the lab's state dir, nspawn processes of its layers, and processes in its namespaces
    or rooted in its layers."""
    found: set[int] = set()
    supervisor = str(paths.root / "supervisor.py")
    nodes_dir = str(paths.nodes) + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        cmdline = _cmdline(pid)
        if supervisor in cmdline or _root_of(pid).startswith(nodes_dir) or cmdline and cmdline[0].endswith("systemd-nspawn") and any(a.startswith(nodes_dir) for a in cmdline):
            found.add(pid)
    for netns in lab_netns_names():
        found.update(netns_pids(netns))
    return sorted(found)


def kill_leftover_processes(paths: LabPaths) -> list[str]:
    pids = lab_processes(paths)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        log.warning("killed leftover processes", pids=pids)
    return [f"process {pid} (killed)" for pid in pids]


def _rmdir_tree(top: Path) -> bool:
    """Depth-first rmdir of empty cgroup directories; True when top itself is gone."""
    for child in top.iterdir():
        if child.is_dir() and not child.is_symlink():
            _rmdir_tree(child)
    try:
        top.rmdir()
        return True
    except OSError:
        return False


def remove_cgroups() -> list[str]:
    removed: list[str] = []
    if not CGROUP_ROOT.is_dir():
        return removed
    hierarchies = [CGROUP_ROOT] if (CGROUP_ROOT / "cgroup.controllers").exists() else sorted(CGROUP_ROOT.iterdir())
    for hierarchy in hierarchies:
        if hierarchy.is_symlink() or not hierarchy.is_dir():
            continue
        for top in sorted(hierarchy.iterdir()):
            if not top.is_dir():
                continue
            if top.name in CGROUP_NAMES or top.name.startswith(CGROUP_PREFIXES):
                if _rmdir_tree(top):
                    removed.append(f"cgroup {top}")
                else:
                    log.warning("cgroup directory still in use", path=str(top))
    return removed


def remove_envoy_shm() -> list[str]:
    removed: list[str] = []
    for path in Path("/dev/shm").glob("envoy_*"):
        path.unlink(missing_ok=True)
        removed.append(f"shm {path}")
    return removed


def restore_sysctls(old_values: dict[str, str]) -> list[str]:
    restored = []
    for key, value in old_values.items():
        run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
        restored.append(f"sysctl {key}={value}")
    return restored


def remove_state_files(paths: LabPaths) -> list[str]:
    """Everything in the state dir but its lock; refuses to delete across a mount point."""
    from mesh.lab.nodes import mounts_under

    left = mounts_under(paths.nodes)
    if left:
        raise LabError(f"still mounted under {paths.nodes}: {', '.join(map(str, left))}",
                       hint="stop what uses them, then run `mesh lab down` again")
    removed: list[str] = []
    if not paths.root.exists():
        return removed
    for entry in sorted(paths.root.iterdir()):
        if entry == paths.lock:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(f"state {entry}")
    return removed
