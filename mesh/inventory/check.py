"""`mesh inventory check`: refuses everything `deploy` would refuse before connecting (reader warnings too)
and summarizes the mesh. It must not connect to hosts; `list` and `host` never call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import InventoryError, InventoryErrors, Origin
from mesh.inventory.data import InventoryData
from mesh.inventory.model import Mesh
from mesh.inventory.validate import VarsOf, build_mesh


@dataclass(frozen=True)
class CheckReport:
    """A valid inventory's mesh, summarized for people."""

    mesh: Mesh
    inventory_path: str

    def summary_lines(self) -> list[str]:
        mesh = self.mesh
        vms = [host.name for host in mesh.hosts if host.kind == "vm"]
        container_hosts = [host.name for host in mesh.hosts if host.kind == "container_host"]
        kinds = f"{len(vms)} vm, {len(container_hosts)} container_host"
        roles = f"{len(mesh.controllers)} controller(s) among them, {len(mesh.unmanaged_hosts)} other (left alone)"
        lines = [f"inventory {self.inventory_path}: ok", f"hosts: {kinds}, {roles}"]
        if mesh.controllers:
            lines.append("controllers: " + ", ".join(host.name for host in mesh.controllers))
        lines.append(f"services: {len(mesh.services)}")
        for name, instances in mesh.services.items():
            versions = ", ".join(sorted({workload.version for workload in instances}))
            lines.append(f"  {name}: {len(instances)} instance(s), version(s) {versions}")
        lines.append(f"instances: {len(mesh.workloads)}")
        return lines


def check_inventory(data: InventoryData, inventory_path: str | None = None,
                    vars_of: VarsOf | None = None) -> CheckReport:
    """Refuse the inventory's warnings and every broken rule of INVENTORY.md (InventoryErrors, exit 4);
    else a CheckReport. inventory_path defaults to the first source the reader read."""
    path = inventory_path if inventory_path is not None else (data.sources[0] if data.sources else ".")
    errors: list[InventoryError] = [warning.as_error() for warning in data.warnings]
    try:
        mesh = _build(data, path, vars_of)
    except InventoryErrors as exc:
        # The reader already warned about some of these (ansible_port, ansible_host): say it once.
        warned = {(error.origin, error.key) for error in errors}
        raise InventoryErrors(errors + [e for e in exc.errors if (e.origin, e.key) not in warned]) from None
    if errors:
        raise InventoryErrors(errors)
    return CheckReport(mesh, path)


def _build(data: InventoryData, path: str, vars_of: VarsOf | None) -> Mesh:
    # Templates are bounded (sandbox.py); this is the last guard: exit 4 with the inventory named, never 250.
    try:
        return build_mesh(data, path, vars_of=vars_of)
    except MemoryError:
        raise InventoryErrors([InventoryError(Origin(path), "the inventory needs more memory than mesh has to "
                                              "check it")]) from None
    except RecursionError:
        raise InventoryErrors([InventoryError(Origin(path), "the inventory's values refer to each other too "
                                              "deeply to check")]) from None
