"""Builders for the mesh-variables tests: InventoryData written by hand from small YAML snippets, so that
every variable keeps a real file, line and marks. No file is read; nothing here is a test."""

from __future__ import annotations

import pytest

from mesh.errors import InventoryError, InventoryErrors, Origin
from mesh.inventory.data import InventoryData, Var
from mesh.inventory.model import Mesh
from mesh.inventory.validate import build_mesh
from mesh.inventory.yamlfile import load_yaml_text

INVENTORY = "/srv/fleet/inventory.yml"


def yaml_vars(text: str, file: str) -> dict[str, Var]:
    """The variables of a YAML mapping, each with its key's line and the marks of its value (as the reader)."""
    doc = load_yaml_text(text, file)
    if doc.data is None:
        return {}
    return {key: Var(value, doc.marks.key_origin(key), doc.marks.at(key)) for key, value in doc.data.items()}


class Fleet:
    """An inventory under construction: groups, hosts and their variables from YAML text."""

    def __init__(self, all_vars: str = "mesh_consul_url: http://10.77.0.2:8500\n") -> None:
        self.data = InventoryData(sources=[INVENTORY])
        if all_vars:
            self.group_vars("all", all_vars)

    def group_vars(self, group: str, text: str, file: str | None = None) -> Fleet:
        self.data.add_group(group, Origin(INVENTORY, 1))
        if group not in ("all", "ungrouped") and group not in self.data.groups["all"].children:
            self.data.add_child("all", group)
        for key, var in yaml_vars(text, file or f"/srv/fleet/group_vars/{group}.yml").items():
            self.data.groups[group].file_vars[key] = var
        return self

    def host(self, name: str, text: str = "", group: str = "ungrouped", file: str | None = None) -> Fleet:
        if group not in self.data.groups:
            self.data.add_child("all", group)
        self.data.add_host(name, Origin(INVENTORY, 1), group)
        for key, var in yaml_vars(text, file or f"/srv/fleet/host_vars/{name}.yml").items():
            self.data.set_host_var(name, key, var)
        return self

    def controller(self, name: str = "ctl1", text: str = "ansible_host: 10.77.0.3\n") -> Fleet:
        return self.host(name, text, group="mesh_controllers")

    def build(self, inventory: str = INVENTORY) -> Mesh:
        return build_mesh(self.data, inventory)

    def errors(self) -> list[InventoryError]:
        with pytest.raises(InventoryErrors) as caught:
            self.build()
        return caught.value.errors


def find(errors: list[InventoryError], file: str, line: int, key: str, fragment: str) -> InventoryError:
    """The error at file:line about key whose message holds fragment; fails listing all errors if none."""
    for error in errors:
        if (error.origin.file.endswith(file) and error.origin.line == line and error.key == key
                and fragment in str(error)):
            return error
    listing = "\n".join(str(error) for error in errors)
    raise AssertionError(f"no error at {file}:{line} for {key} with {fragment!r}; got:\n{listing}")
