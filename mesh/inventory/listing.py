"""The data `ansible-inventory --list` and `--host NAME` print, built from a loaded inventory.

It owns the shape and the JSON typing of that output; it must not change the inventory or judge it.
"""

from __future__ import annotations

import datetime
from typing import Any

from mesh.inventory.data import InventoryData, UnsafeText
from mesh.inventory.resolve import host_vars

PROFILE = "inventory_legacy"


def list_inventory(data: InventoryData) -> dict[str, Any]:
    """Groups (with their direct `hosts` and `children`, empty ones left out as Ansible does) and
    `_meta.hostvars` for every host that has variables."""
    result: dict[str, Any] = {}
    _format_group(data, "all", result, set())
    hostvars: dict[str, Any] = {}
    for name in data.hosts:
        variables = host_vars(data, name)
        if variables:
            hostvars[name] = to_json_data(variables)
    result["_meta"] = {"hostvars": hostvars, "profile": PROFILE}
    return result


def host_variables(data: InventoryData, name: str) -> dict[str, Any]:
    """One host's variables as `ansible-inventory --host NAME` prints them (`!unsafe` text as plain text, unlike
    `--list`); UnknownHostError otherwise."""
    return to_json_data(host_vars(data, name), wrap_unsafe=False)


def _format_group(data: InventoryData, name: str, result: dict[str, Any], seen: set[str]) -> None:
    group = data.groups[name]
    entry: dict[str, Any] = {}
    if name != "all" and group.hosts:
        entry["hosts"] = list(group.hosts)
    if group.children:
        entry["children"] = list(group.children)
    if entry:
        result[name] = entry
    for child in group.children:
        if child not in seen:
            seen.add(child)
            _format_group(data, child, result, seen)


def to_json_data(value: Any, wrap_unsafe: bool = True) -> Any:
    """A value as Ansible's `inventory_legacy` JSON profile prints it: dates in ISO form, sets and tuples as
    lists, `!unsafe` text wrapped in {"__ansible_unsafe": ...} (unless wrap_unsafe is False)."""
    if isinstance(value, UnsafeText):
        return {"__ansible_unsafe": str(value)} if wrap_unsafe else str(value)
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {key: to_json_data(item, wrap_unsafe) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_data(item, wrap_unsafe) for item in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value
