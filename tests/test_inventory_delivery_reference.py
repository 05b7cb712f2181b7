"""`mesh_delivery` as Ansible reads it: for a YAML inventory (all vars, group_vars, host_vars) and an INI one (bare,
quoted and [group:vars] values), the value `ansible-inventory --list` gives every host, read as mesh reads the
inventory's own values, is the delivery `mesh inventory check` validated from the files for that host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inventory_reference import GOOD, Sandbox, compare_list, inventory_path

from mesh.errors import Origin
from mesh.inventory.delivery import read_delivery
from mesh.inventory.loader import load_inventory
from mesh.inventory.located import Located, Problems
from mesh.inventory.validate import build_mesh

CASES = {
    GOOD / "43-mesh-delivery-yaml": {"ctl1": "xds", "ctl2": "xds", "vm1": "xds", "vm2": "files", "vm3": "xds"},
    GOOD / "44-mesh-delivery-ini": {"ctl1": "files", "vm1": "xds", "vm2": "files", "vm3": "xds"},
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: case.name)
def test_mesh_reads_the_delivery_ansible_reads(sandbox: Sandbox, case: Path) -> None:
    path = inventory_path(case)
    reference = sandbox.ansible_list(path)
    assert reference.returncode == 0, reference.describe()
    assert not compare_list(reference, sandbox.mesh_inprocess("inventory", "list", str(path)))
    check = sandbox.mesh_inprocess("inventory", "check", str(path))
    assert check.returncode == 0, check.describe()
    mesh = build_mesh(load_inventory(str(path)), str(path))
    validated = {host.name: host.delivery for host in mesh.hosts}
    assert validated == CASES[case]
    for host, variables in reference.json()["_meta"]["hostvars"].items():
        problems = Problems()
        spot = Located(variables["mesh_delivery"], Origin("<ansible>"), "mesh_delivery") \
            if "mesh_delivery" in variables else None
        assert read_delivery(spot, problems) == validated[host], host
        assert not problems.errors, host
