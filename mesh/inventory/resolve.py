"""The finished inventory as Ansible reconciles it (ungrouped hosts, top-level groups under `all`, group depth
and priority) and each host's variables in the precedence of Ansible's VariableManager at inventory stage.

It owns merging; it must not read files nor judge values (that is the loader's and the validators' job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InventoryWarning, UnknownHostError
from mesh.inventory.data import InventoryData, Var
from mesh.suggest import closest

# ansible-core's INTERNAL_STATIC_VARS: magic variables that `ansible-inventory` removes from what it prints,
# even when the inventory sets them.
INTERNAL_VARS = frozenset({
    "ansible_async_path", "ansible_collection_name", "ansible_config_file", "ansible_dependent_role_names",
    "ansible_diff_mode", "ansible_facts", "ansible_forks", "ansible_inventory_sources", "ansible_limit",
    "ansible_play_batch", "ansible_play_hosts", "ansible_play_hosts_all", "ansible_play_role_names",
    "ansible_playbook_python", "ansible_role_name", "ansible_role_names", "ansible_run_tags",
    "ansible_skip_tags", "ansible_verbosity", "ansible_version", "inventory_dir", "inventory_file",
    "inventory_hostname", "inventory_hostname_short", "groups", "group_names", "hostvars", "playbook_dir",
    "play_hosts", "role_name", "role_names", "role_path", "role_uuid",
})


def reconcile(data: InventoryData) -> None:
    """What Ansible does once every source is read: groups without a parent go under `all`; a host in no
    group goes to `ungrouped`, and leaves it when it is also in another group."""
    for name, group in list(data.groups.items()):
        if name != "all" and not group.parents:
            data.add_child("all", name, group.origin)
    ungrouped = data.groups["ungrouped"]
    closures = _Closures(data)
    leaving: set[str] = set()
    for host in data.hosts.values():
        member_of = closures.of_host(host.groups)
        if "ungrouped" in member_of:
            if member_of - {"ungrouped"} and "ungrouped" in host.groups:
                leaving.add(host.name)
                host.groups.remove("ungrouped")
        elif not member_of:
            data.add_host(host.name, host.origin, "ungrouped")
    if leaving:
        # One pass over the list, not one search per host: keeps 10,000-host inventories linear.
        ungrouped.hosts = [name for name in ungrouped.hosts if name not in leaving]
        ungrouped.host_set -= leaving
    for name in data.groups.keys() & data.hosts.keys():
        data.warn(InventoryWarning(data.hosts[name].origin, "a group and a host have the same name; Ansible "
                                   "warns and patterns naming it mean the group", key=name))
    data.revision += 1


def host_vars_with_origins(data: InventoryData, host: str) -> dict[str, Var]:
    """One host's variables as Ansible merges them, each with the place it was written.

    Order, lowest first: `all`'s inventory vars, other groups' inventory vars (by depth, priority, name),
    group_vars/all, group_vars of the other groups (same order), the host's inventory vars, host_vars/.
    """
    found = data.hosts.get(host)
    if found is None:
        matches = closest(host, data.hosts)
        hint = "did you mean " + " or ".join(repr(m) for m in matches) + "?" if matches else None
        raise UnknownHostError(f"no host named {host!r} in the inventory", hint=hint)
    merged = dict(_resolver(data).group_layers(found.groups))
    merged.update(found.vars)
    merged.update(found.file_vars)
    for name in INTERNAL_VARS.intersection(merged):
        del merged[name]
    return merged


def host_vars(data: InventoryData, host: str) -> dict[str, Any]:
    """One host's variables as Ansible merges them (values only)."""
    return {key: var.value for key, var in host_vars_with_origins(data, host).items()}


def group_depth(data: InventoryData, group: str) -> int:
    """Ansible's depth of a group: the longest chain of parents up to `all` (which is 0)."""
    return _resolver(data).depth(group)


def _resolver(data: InventoryData) -> _Resolver:
    cached = data.cache.get("resolve")
    if not isinstance(cached, _Resolver) or cached.revision != data.revision:
        cached = data.cache["resolve"] = _Resolver(data, data.revision)
    return cached


class _Closures:
    """Each group with all its ancestors except `all`, memoized per group and per set of direct groups."""

    def __init__(self, data: InventoryData) -> None:
        self.data = data
        self._groups: dict[str, frozenset[str]] = {}
        self._hosts: dict[tuple[str, ...], frozenset[str]] = {}

    def of_group(self, name: str) -> frozenset[str]:
        known = self._groups.get(name)
        if known is None:
            found = (self.data.ancestors(name) | {name}) - {"all"}
            known = self._groups[name] = frozenset(found)
        return known

    def of_host(self, direct: list[str]) -> frozenset[str]:
        key = tuple(direct)
        known = self._hosts.get(key)
        if known is None:
            result: set[str] = set()
            for name in direct:
                result |= self.of_group(name)
            known = self._hosts[key] = frozenset(result)
        return known


@dataclass
class _Resolver:
    data: InventoryData
    revision: int
    _depths: dict[str, int] = field(default_factory=dict)
    _layers: dict[frozenset[str], dict[str, Var]] = field(default_factory=dict)
    _closures: _Closures | None = None

    def depth(self, name: str) -> int:
        if name in self._depths:
            return self._depths[name]
        # Iterative longest-path walk: inventories may nest groups deeper than Python's recursion limit.
        stack = [name]
        while stack:
            current = stack[-1]
            parents = self.data.groups[current].parents
            missing = [p for p in parents if p not in self._depths]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            self._depths[current] = max((self._depths[p] + 1 for p in parents), default=0)
        return self._depths[name]

    def group_layers(self, direct: list[str]) -> dict[str, Var]:
        if self._closures is None:
            self._closures = _Closures(self.data)
        member_of = self._closures.of_host(direct)
        known = self._layers.get(member_of)
        if known is not None:
            return known
        groups = self.data.groups
        ordered = sorted(member_of, key=lambda name: (self.depth(name), groups[name].priority, name))
        merged: dict[str, Var] = dict(groups["all"].vars)
        for name in ordered:
            merged.update(groups[name].vars)
        merged.update(groups["all"].file_vars)
        for name in ordered:
            merged.update(groups[name].file_vars)
        self._layers[member_of] = merged
        return merged
