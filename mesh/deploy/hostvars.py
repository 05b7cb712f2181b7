"""The inventory as the runner needs it: each host's variables (rendered on use) and group memberships.
It owns adapting the inventory reader for the runner; it must not validate mesh variables.

As in Ansible, the runner's magic variables cannot be overridden: the inventory's values of those names are
hidden from the runner (ansible-inventory already drops most of them, RUNNER_MAGIC lists the rest).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.inventory.data import InventoryData
from mesh.inventory.resolve import INTERNAL_VARS, host_vars_with_origins
from mesh.inventory.templating import Templating, host_groups

# What mesh's runner sets itself (runner.py, PlaybookRun._inventory_scope), beyond INTERNAL_VARS: Ansible sets
# ansible_check_mode from the command line whatever the inventory says, and mesh's runner gives ansible_host
# the validated address it connects to. `hostvars` stays: the runner has none of its own.
RUNNER_MAGIC = (INTERNAL_VARS - {"hostvars"}) | {"ansible_check_mode", "ansible_host"}


@dataclass(frozen=True)
class InventoryVars:
    """What run_playbook takes as host_vars and groups."""

    host_vars: Mapping[str, Mapping[str, Any]]
    groups: Mapping[str, list[str]]


def inventory_vars(data: InventoryData) -> InventoryVars:
    """Every host's variables and every group's hosts (children included), from a loaded inventory."""
    templating = Templating(data, lambda host: host_vars_with_origins(data, host))
    lock = threading.RLock()  # the templating caches are not safe for the runner's host threads
    groups: dict[str, list[str]] = {}
    for host in data.hosts:
        for group in host_groups(data, host):
            groups.setdefault(group, []).append(host)
    host_vars = {host: _LockedScope(templating.scope(host), lock) for host in data.hosts}
    return InventoryVars(host_vars, groups)


class _LockedScope(Mapping[str, Any]):
    def __init__(self, scope: Mapping[str, Any], lock: threading.RLock) -> None:
        self._scope = scope
        self._lock = lock

    def __getitem__(self, key: str) -> Any:
        if key in RUNNER_MAGIC:
            raise KeyError(key)
        with self._lock:
            return self._scope[key]

    def __contains__(self, key: object) -> bool:
        if key in RUNNER_MAGIC:
            return False
        with self._lock:
            return key in self._scope

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter([key for key in self._scope if key not in RUNNER_MAGIC])

    def __len__(self) -> int:
        return sum(1 for _ in self)
