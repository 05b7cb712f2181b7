"""The inventory as Ansible holds it in memory: groups, hosts, children and variables, each variable with the
place it was written. Format readers (YAML, INI, variable folders) fill it; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InventoryError, InventoryWarning, Origin


class UnsafeText(str):
    """A string written with YAML's `!unsafe`: Ansible never templates it and prints it as
    `{"__ansible_unsafe": TEXT}`."""


@dataclass(frozen=True)
class Var:
    """One variable's value and where it was written (marks: positions of nested values, when known)."""

    value: Any
    origin: Origin
    marks: Any = field(default=None, compare=False, repr=False)


@dataclass
class Group:
    name: str
    origin: Origin
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    # Variables written in inventory sources (the YAML `vars:` or INI `[g:vars]`), lowest precedence layer.
    vars: dict[str, Var] = field(default_factory=dict)
    # Variables from group_vars/ folders beside the inventory sources, in source order.
    file_vars: dict[str, Var] = field(default_factory=dict)
    # `ansible_group_priority` as Ansible reads it: not a variable, it orders groups of equal depth.
    priority: int = 1
    # Where a YAML `children:` first named this group (None when it never was one).
    child_origin: Origin | None = None
    # The same names as `hosts`, for constant-time membership tests (`hosts` keeps Ansible's order).
    host_set: set[str] = field(default_factory=set, repr=False)


@dataclass
class Host:
    name: str
    origin: Origin
    groups: list[str] = field(default_factory=list)
    vars: dict[str, Var] = field(default_factory=dict)
    file_vars: dict[str, Var] = field(default_factory=dict)


@dataclass
class InventoryData:
    """Groups and hosts in the order Ansible records them; `all` and `ungrouped` always exist."""

    sources: list[str] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    warnings: list[InventoryWarning] = field(default_factory=list)
    # Bumped by every change made through the methods below, so that derived views know when to rebuild.
    revision: int = field(default=0, compare=False)
    # A derived view (resolve.py) kept with the data it was computed from.
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if "all" not in self.groups:
            self.groups["all"] = Group("all", Origin("<implicit>"))
            self.groups["ungrouped"] = Group("ungrouped", Origin("<implicit>"))
            self.add_child("all", "ungrouped")

    def add_group(self, name: str, origin: Origin) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, origin)
            self.revision += 1
        return group

    def add_host(self, name: str, origin: Origin, group: str | None = None) -> Host:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = Host(name, origin)
        if group is not None and group != "all":
            target = self.add_group(group, origin)
            if name not in target.host_set:
                target.host_set.add(name)
                target.hosts.append(name)
            if group not in host.groups:
                host.groups.append(group)
        self.revision += 1
        return host

    def add_child(self, parent: str, child: str, origin: Origin | None = None) -> None:
        """Make child a subgroup of parent; refuses a group inside itself or a loop, as Ansible does."""
        where = origin or Origin("<implicit>")
        if parent == child:
            raise InventoryError(where, f"group '{child}' cannot be a child of itself", key=child)
        parent_group = self.add_group(parent, where)
        child_group = self.add_group(child, where)
        if child in parent_group.children:
            return
        if child in self.ancestors(parent):
            raise InventoryError(
                where,
                f"adding group '{child}' as a child of '{parent}' makes a loop: '{child}' already contains '{parent}'",
                key=child,
            )
        parent_group.children.append(child)
        if parent not in child_group.parents:
            child_group.parents.append(parent)
        self.revision += 1

    def ancestors(self, group: str) -> set[str]:
        """Every group that contains group, directly or through other groups."""
        seen: set[str] = set()
        stack = list(self.groups[group].parents) if group in self.groups else []
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(self.groups[name].parents)
        return seen

    def set_group_var(self, group: str, key: str, var: Var) -> None:
        target = self.add_group(group, var.origin)
        if key == "ansible_group_priority":
            target.priority = _group_priority(var, target.priority)
        else:
            _set_var(target.vars, key, var)
        self.revision += 1

    def set_host_var(self, host: str, key: str, var: Var) -> None:
        _set_var(self.hosts[host].vars, key, var)
        self.revision += 1

    def warn(self, warning: InventoryWarning) -> None:
        self.warnings.append(warning)


def _set_var(variables: dict[str, Var], key: str, var: Var) -> None:
    # Ansible's Host/Group.set_variable would merge a mapping into a mapping, but in ansible-core 2.19 the
    # inventory wrapper hands it copies that are not MutableMappings: measured, a later value replaces.
    variables[key] = var


def _group_priority(var: Var, current: int) -> int:
    value = var.value
    if value is None or isinstance(value, (list, dict)):
        return current  # Ansible ignores a priority int() cannot take (a TypeError)
    try:
        return int(value)
    except ValueError:
        raise InventoryError(var.origin, f"must be an integer, not {value!r}", key="ansible_group_priority") from None
