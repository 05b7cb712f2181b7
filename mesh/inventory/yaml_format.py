"""Ansible's YAML inventory structure (`all` and groups with `hosts`, `vars`, `children`) read into
InventoryData, with Ansible's acceptance rules; strict (InventoryError) where Ansible warns and drops data.

It owns what the keys of a YAML inventory mean; reading bytes is yamlfile's, merging variables is resolve's.
"""

from __future__ import annotations

import re
from typing import Any

from mesh.errors import InventoryError, InventoryWarning, Origin
from mesh.inventory.data import InventoryData, Var
from mesh.inventory.hostpattern import expand_host_pattern
from mesh.inventory.yamlfile import Marks, YamlDocument
from mesh.suggest import did_you_mean

GROUP_KEYS = ("hosts", "vars", "children")
# Ansible's test for a name that is not a valid variable name (it warns about such group names).
_INVALID_NAME = re.compile(r"^[\d\W]|[^\w]")
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)$")


def read_yaml_inventory(doc: YamlDocument, data: InventoryData) -> None:
    """Add the groups, hosts and variables of one YAML inventory file to data."""
    data.warnings.extend(doc.warnings)
    root = doc.data
    if root is None or root == {}:
        raise InventoryError(doc.marks.origin, "the file is empty; a YAML inventory is a mapping of groups",
                             hint="start with `all:` and its `hosts:`")
    if not isinstance(root, dict):
        raise InventoryError(doc.marks.origin,
                             f"a YAML inventory is a mapping of groups, not {_kind(root)}",
                             hint="start with `all:` and its `hosts:`")
    if root.get("plugin"):
        raise InventoryError(doc.marks.key_origin("plugin"),
                             "an inventory plugin configuration, not a YAML inventory; Ansible reads plugin "
                             "configurations only from files ending in .yml or .yaml", key="plugin")
    for name, body in root.items():
        _read_group(data, name, body, doc.marks.at(name), doc.marks.key_origin(name))


def _read_group(data: InventoryData, name: Any, body: Any, marks: Marks, where: Origin) -> str:
    if not isinstance(name, str) or not name:
        raise InventoryError(where, f"a group name must be text, not {_kind(name)}", key=str(name),
                             hint="quote it")
    if body is not None and not isinstance(body, dict):
        raise InventoryError(marks.origin, f"a group is a mapping of hosts, vars and children, not {_kind(body)}"
                             " (Ansible skips it)", key=name)
    if name not in data.groups and _INVALID_NAME.search(name):
        data.warn(InventoryWarning(where, "the group name has characters other than letters, digits and '_'; "
                                   "Ansible keeps it but warns, and it cannot be used in patterns as is", key=name))
    data.add_group(name, where)
    if body is None:
        return name
    sections = {key: _section(name, key, body[key], marks) for key in GROUP_KEYS if key in body}
    for key in body:
        if key not in GROUP_KEYS:
            raise _unknown_group_key(name, key, body, marks)
    if "hosts" in body and sections["hosts"] is None:
        # Ansible reads an empty `hosts:` as a group with no hosts; almost always hosts lost to indentation.
        data.warn(InventoryWarning(marks.key_origin("hosts"), "`hosts:` is empty, so the group has no hosts "
                                   "(Ansible reads it so); indent the hosts under it, or remove the line",
                                   key=f"{name}.hosts"))
    for key in body:  # in file order, as Ansible walks them
        content = sections[key]
        if content is None:
            continue
        section_marks = marks.at(key)
        if key == "vars":
            for var_name, value in content.items():
                data.set_group_var(name, _var_name(var_name, section_marks, name),
                                   yaml_var(var_name, value, section_marks, data))
        elif key == "children":
            for child, child_body in content.items():
                child_where = section_marks.key_origin(child)
                child_name = _read_group(data, child, child_body, section_marks.at(child), child_where)
                data.add_child(name, child_name, child_where)
                child_group = data.groups[child_name]
                if child_group.child_origin is None:
                    child_group.child_origin = child_where
        else:
            for pattern, host_vars in content.items():
                _read_hosts(data, name, pattern, host_vars, section_marks)
    return name


def _section(group: str, key: str, value: Any, marks: Marks) -> dict[Any, Any] | None:
    """A `hosts`, `vars` or `children` value as a mapping; Ansible reads a lone name as {name: None}."""
    if isinstance(value, str):
        return {value: None}
    if value is None or isinstance(value, dict):
        return value
    hint = "write each host as a key ending in ':' under `hosts:`" if key == "hosts" else None
    raise InventoryError(marks.at(key).origin, f"`{key}` must be a mapping, not {_kind(value)}",
                         key=f"{group}.{key}", hint=hint)


def _unknown_group_key(group: str, key: Any, body: dict[Any, Any], marks: Marks) -> InventoryError:
    where = marks.key_origin(key)
    hint = did_you_mean(str(key), GROUP_KEYS)
    if hint is None and (body[key] is None or isinstance(body[key], dict)):
        hint = "if it is a host or a group, indent it under `hosts:` or `children:`"
    return InventoryError(
        where, f"unknown key in group '{group}': only hosts, vars and children are read (Ansible skips it)",
        key=str(key), hint=hint)


def _read_hosts(data: InventoryData, group: str, pattern: Any, host_vars: Any, section: Marks) -> None:
    where = section.key_origin(pattern)
    if not isinstance(pattern, str):
        raise InventoryError(where, f"a host name must be text, not {_kind(pattern)}", key=str(pattern),
                             hint="quote it")
    host_vars = host_vars or {}
    if not isinstance(host_vars, dict):
        raise InventoryError(section.at(pattern).origin,
                             f"a host's variables must be a mapping, not {_kind(host_vars)}", key=pattern)
    names, port = expand_host_pattern(pattern, where)
    if not names:
        data.warn(InventoryWarning(where, "the host range stands for no host at all", key=pattern))
    var_marks = section.at(pattern)
    for name in names:
        if not name:
            raise InventoryError(where, "an empty host name", key=pattern)
        new = name not in data.hosts
        data.add_host(name, where, group)
        if new and port:
            data.set_host_var(name, "ansible_port", Var(port, where))
        for var_name, value in host_vars.items():
            data.set_host_var(name, _var_name(var_name, var_marks, name), yaml_var(var_name, value, var_marks, data))


def _var_name(name: Any, marks: Marks, owner: str) -> str:
    if not isinstance(name, str):
        raise InventoryError(marks.key_origin(name), f"a variable name must be text, not {_kind(name)}",
                             key=str(name), hint=f"in the variables of '{owner}'")
    return name


def yaml_var(name: Any, value: Any, mapping: Marks, data: InventoryData) -> Var:
    """One variable read from YAML, with its origin (the key's line) and the marks of nested values; warns
    where YAML 1.1 reads a port not as written."""
    key_origin = mapping.key_origin(name)
    marks = mapping.at(name)
    if name == "ansible_port" and isinstance(value, int) and marks.raw is not None:
        raw = marks.raw.strip()
        if not _DECIMAL.fullmatch(raw):
            data.warn(InventoryWarning(
                key_origin, f"YAML 1.1 reads {raw} as the number {value}, not as written (quote it, or write "
                "it in decimal digits without a leading zero)", key=name))
    return Var(value, key_origin, marks)


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
             float: "a number", type(None): "nothing"}
    return names.get(type(value), type(value).__name__)
