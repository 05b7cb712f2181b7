"""The inventory as the runner needs it: each host's variables (rendered on use) and group memberships.
It owns adapting the inventory reader for the runner; it must not validate mesh variables.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.inventory.data import InventoryData
from mesh.inventory.resolve import host_vars_with_origins
from mesh.inventory.templating import Templating, host_groups


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
        with self._lock:
            return self._scope[key]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._scope

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._scope))

    def __len__(self) -> int:
        with self._lock:
            return len(self._scope)
