"""The lab's machine-wide state: where it lives (/var/lib/mesh-lab or MESH_LAB_STATE), its JSON record and lock.
It records what exists and never creates or removes lab resources itself (nodes.py and network.py do).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mesh.lab.errors import LabError

STATE_VERSION = 1
DEFAULT_STATE_DIR = "/var/lib/mesh-lab"


@dataclass(frozen=True)
class LabPaths:
    """Every file the lab keeps, under one directory for the whole machine."""

    root: Path

    @classmethod
    def from_env(cls) -> LabPaths:
        return cls(Path(os.environ.get("MESH_LAB_STATE") or DEFAULT_STATE_DIR).absolute())

    @property
    def record(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def private_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def public_key(self) -> Path:
        return self.root / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node_dir(self, name: str) -> Path:
        return self.nodes / name


@dataclass
class NodeRecord:
    """One node as it was created: names on the host, paths, and its supervisor's identity."""

    name: str
    role: str
    address: str
    netns: str
    veth: str
    merged: str
    supervisor_pid: int | None = None
    supervisor_start: int | None = None  # /proc/PID/stat starttime, so a reused PID is never taken for ours


@dataclass
class LabRecord:
    """The whole lab: sizes asked for, network, nodes, sysctls changed (with old values) and completeness."""

    vms: int
    containers: int
    controllers: int
    bridge: str
    subnet: str
    inventory: str
    complete: bool = False
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    version: int = STATE_VERSION

    def sizes(self) -> tuple[int, int, int]:
        return (self.vms, self.containers, self.controllers)


def load_record(paths: LabPaths) -> LabRecord | None:
    try:
        raw = json.loads(paths.record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read the lab state {paths.record}: {exc}",
                       hint="remove the file and clean up by hand, or run `mesh lab down`") from exc
    nodes = {name: NodeRecord(**node) for name, node in raw.pop("nodes", {}).items()}
    return LabRecord(**raw, nodes=nodes)


def save_record(paths: LabPaths, record: LabRecord) -> None:
    """Write atomically, so an interrupted write never leaves half a record."""
    paths.root.mkdir(parents=True, exist_ok=True)
    temporary = paths.record.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, paths.record)


@contextlib.contextmanager
def locked(paths: LabPaths) -> Iterator[None]:
    """One `up` or `down` at a time on this machine, from any clone."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(paths.lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LabError(f"another `mesh lab` command holds {paths.lock}", hint="wait for it to finish") from exc
        yield


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its last ")"
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(pid: int | None, start: int | None) -> bool:
    if pid is None:
        return False
    started = process_start_time(pid)
    if started is None or started != start:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
