"""`mesh_tracing` as Ansible reads it: for a YAML and an INI inventory, the value `ansible-inventory --list` gives
every host, read as mesh reads the inventory's own values, equals the settings `mesh inventory check` validated
from the files (and `mesh inventory list` equals the reference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inventory_reference import GOOD, Sandbox, compare_list, inventory_path

from mesh.errors import Origin
from mesh.inventory.loader import load_inventory
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import TracingSettings
from mesh.inventory.tracing import read_tracing
from mesh.inventory.validate import build_mesh

CASES = {
    GOOD / "41-mesh-tracing-yaml": TracingSettings("zipkin", 12.5, "https://zipkin.example.internal:9411", "https",
                                                   "zipkin.example.internal", 9411, None),
    GOOD / "42-mesh-tracing-ini": TracingSettings("mesh", 100.0),
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: case.name)
def test_mesh_reads_the_tracing_ansible_reads(sandbox: Sandbox, case: Path) -> None:
    path = inventory_path(case)
    reference = sandbox.ansible_list(path)
    assert reference.returncode == 0, reference.describe()
    assert not compare_list(reference, sandbox.mesh_inprocess("inventory", "list", str(path)))
    check = sandbox.mesh_inprocess("inventory", "check", str(path))
    assert check.returncode == 0, check.describe()
    mesh = build_mesh(load_inventory(str(path)), str(path))
    assert mesh.settings.tracing == CASES[case]
    for host, variables in reference.json()["_meta"]["hostvars"].items():
        problems = Problems()
        read = read_tracing(Located(variables["mesh_tracing"], Origin("<ansible>"), "mesh_tracing"), problems)
        assert not problems.errors, host
        assert read == mesh.settings.tracing, host
