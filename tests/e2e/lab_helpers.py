"""Helpers of the lab end-to-end tests: run `mesh`, snapshot what the lab may touch on the machine, and reach
nodes with plain `ssh` (the lab's key and known_hosts, strict checking). No fixtures here (conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

MESH = str(Path(sys.executable).with_name("mesh"))
LAB_ARGS = ["--vms", "2", "--containers", "1", "--controllers", "2"]


def mesh(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH, *args], input=input, capture_output=True, text=True, timeout=timeout,
                          check=False)


@dataclass(frozen=True)
class MachineState:
    """What the lab may touch on the host, to compare before `up` and after `down`."""

    netns: frozenset[str]
    links: frozenset[str]
    mounts: frozenset[str]
    nft: str
    cgroups: frozenset[str]
    processes: frozenset[tuple[int, str, bool]]  # pid, command line, runs in another root or network namespace
    shm: frozenset[str]


def _processes() -> frozenset[tuple[int, str, bool]]:
    own_netns = os.readlink("/proc/self/ns/net")
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            contained = os.readlink(entry / "root") != "/" or os.readlink(entry / "ns/net") != own_netns
        except OSError:
            continue
        if cmdline:  # kernel threads have none
            found.add((int(entry.name), cmdline, contained))
    return frozenset(found)


def _cgroups() -> frozenset[str]:
    root = Path("/sys/fs/cgroup")
    found: set[str] = set()
    for hierarchy in root.iterdir():
        if hierarchy.is_dir() and not hierarchy.is_symlink():
            found.update(str(d) for d in hierarchy.iterdir() if d.is_dir())
    return frozenset(found)


def machine_state() -> MachineState:
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False).stdout
    return MachineState(
        netns=frozenset(line.split()[0] for line in netns.splitlines() if line.strip()),
        links=frozenset(link["ifname"] for link in links), mounts=frozenset(mounts), nft=nft,
        cgroups=_cgroups(), processes=_processes(), shm=frozenset(str(p) for p in Path("/dev/shm").iterdir()))


@dataclass(frozen=True)
class LabUp:
    inventory: Path
    state_dir: Path
    hosts: dict[str, str]  # inventory host name -> address
    before: MachineState
    up_output: str

    @property
    def private_key(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "known_hosts"

    def ssh_argv(self, host: str, command: str, known_hosts: Path | None = None) -> list[str]:
        return ["ssh", "-i", str(self.private_key), "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", "-F", "/dev/null", f"root@{self.hosts[host]}", command]

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(host, command), capture_output=True, text=True, timeout=timeout,
                              check=False)


def inventory_hosts(inventory: Path) -> dict[str, str]:
    document = yaml.safe_load(inventory.read_text())
    hosts: dict[str, str] = {}
    for group in document["all"]["children"].values():
        for name, variables in (group.get("hosts") or {}).items():
            hosts[name] = variables["ansible_host"]
    return hosts
