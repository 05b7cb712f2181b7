"""Authorization as Ansible reads it: for a YAML and an INI inventory with `mesh_authz_default`, `mtls` and
`authz`, the values `ansible-inventory --list` gives every host, read as mesh reads JSON, equal the policies and
default `mesh inventory check` validated from the files (and `mesh inventory list` equals the reference: the good
corpus test covers these cases too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inventory_reference import GOOD, Sandbox, compare_list, inventory_path

from mesh.inventory.loader import load_inventory
from mesh.inventory.policy import AuthzRule, PathMatch
from mesh.inventory.services import ServiceFacts, policy_from_json
from mesh.inventory.validate import build_mesh

CASES = [GOOD / "39-mesh-authz-yaml", GOOD / "40-mesh-authz-ini"]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_mesh_reads_the_authz_ansible_reads(sandbox: Sandbox, case: Path) -> None:
    path = inventory_path(case)
    reference = sandbox.ansible_list(path)
    assert reference.returncode == 0, reference.describe()
    assert not compare_list(reference, sandbox.mesh_inprocess("inventory", "list", str(path)))
    check = sandbox.mesh_inprocess("inventory", "check", str(path))
    assert check.returncode == 0, check.describe()
    mesh = build_mesh(load_inventory(str(path)), str(path))
    for host, variables in reference.json()["_meta"]["hostvars"].items():
        assert variables["mesh_authz_default"] == mesh.settings.authz_default, host
        for service, data in variables["mesh_services"].items():
            versions = mesh.versions(service)
            protocol = mesh.services[service][0].protocol
            assert policy_from_json(data, ServiceFacts(service, versions, protocol)) == mesh.policy(service), host


def test_the_ini_literal_gives_the_rules_written() -> None:
    path = inventory_path(GOOD / "40-mesh-authz-ini")
    mesh = build_mesh(load_inventory(str(path)), str(path))
    assert mesh.settings.authz_default == "deny"
    api = mesh.policy("api")
    assert api.mtls == "permissive"
    assert api.authz.allow == (
        AuthzRule(("web",), ("GET",), (PathMatch("exact", "/orders"), PathMatch("prefix", "/orders/"))),
        AuthzRule(("unauthenticated",), mode="shadow"))
    assert api.authz.deny == (AuthzRule(("web",), paths=(PathMatch("prefix", "/admin/"),)),)
    assert mesh.policy("db").authz.allow == (AuthzRule(("spiffe://lab.mesh/svc/api",)),)
