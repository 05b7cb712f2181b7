"""The inventory as Ansible holds it in memory: groups, hosts, children and variables, each variable with the
place it was written. Format readers (YAML, INI, variable folders) fill it; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InventoryWarning, Origin


@dataclass(frozen=True)
class Var:
    """One variable's value and where it was written."""

    value: Any
    origin: Origin


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

    def __post_init__(self) -> None:
        if "all" not in self.groups:
            self.groups["all"] = Group("all", Origin("<implicit>"))
            self.groups["ungrouped"] = Group("ungrouped", Origin("<implicit>"))
            self.add_child("all", "ungrouped")

    def add_group(self, name: str, origin: Origin) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, origin)
        return group

    def add_host(self, name: str, origin: Origin, group: str | None = None) -> Host:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = Host(name, origin)
        if group is not None and group != "all":
            target = self.add_group(group, origin)
            if name not in target.hosts:
                target.hosts.append(name)
            if group not in host.groups:
                host.groups.append(group)
        return host

    def add_child(self, parent: str, child: str, origin: Origin | None = None) -> None:
        where = origin or Origin("<implicit>")
        parent_group = self.add_group(parent, where)
        child_group = self.add_group(child, where)
        if child not in parent_group.children:
            parent_group.children.append(child)
        if parent not in child_group.parents:
            child_group.parents.append(parent)

    def set_group_var(self, group: str, key: str, var: Var) -> None:
        self.add_group(group, var.origin).vars[key] = var

    def set_host_var(self, host: str, key: str, var: Var) -> None:
        self.hosts[host].vars[key] = var

    def warn(self, warning: InventoryWarning) -> None:
        self.warnings.append(warning)
