"""mesh.catalog without Consul: registrations() and plan_sync() are pure; errors name the URL.

The same behaviour against a real `consul agent -dev` is in tests/test_catalog_consul.py.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.catalog import CatalogState, InstanceRef, ObservedInstance, Registration


def observed(reg: Registration, status: str = "passing", **service_changes: Any) -> ObservedInstance:
    """What Consul would hold after registering `reg` (and the checker writing `status`)."""
    service = {**reg.service_body(), **service_changes}
    check = {**catalog.check_body(reg.ref, "critical", ""), "Status": status, "Output": f"was {status}"}
    return ObservedInstance(reg.node, reg.address, MappingProxyType(dict(catalog.NODE_META)),
                            MappingProxyType(service), check)


def test_registrations_follow_the_inventory_contract() -> None:
    regs = catalog.registrations(make_mesh())
    assert [r.service_id for r in regs] == ["web-vm1-0", "api-vm2-0", "db-vm2-1", "api-dock1-0"]
    api = regs[1]
    assert (api.node, api.address, api.service, api.port) == ("vm2", "10.77.0.12", "api", 21000)
    assert dict(api.meta) == {"version": "v1", "host": "vm2", "kind": "vm", "managed-by": "mesh"}
    assert dict(regs[3].meta)["kind"] == "container" and dict(regs[3].meta)["version"] == "v2"
    assert api.check_id == "mesh-health:api-vm2-0"


def test_register_body_is_an_external_node_with_a_critical_check_first() -> None:
    reg = catalog.registrations(make_mesh())[0]
    body = catalog.register_body(reg, catalog.check_body(reg.ref, "critical", catalog.NOT_CHECKED_YET))
    assert body["NodeMeta"] == {"external-node": "true", "external-probe": "false", "managed-by": "mesh"}
    assert body["Service"]["ID"] == "web-vm1-0" and body["Service"]["Port"] == 21000
    assert body["Check"]["CheckID"] == "mesh-health:web-vm1-0"
    assert body["Check"]["ServiceID"] == "web-vm1-0" and body["Check"]["Status"] == "critical"


def test_plan_on_an_empty_catalog_registers_everything() -> None:
    plan = catalog.plan_sync(catalog.registrations(make_mesh()), CatalogState())
    assert [sid for sid, _ in plan.register] == ["web-vm1-0", "api-vm2-0", "db-vm2-1", "api-dock1-0"]
    assert not plan.unchanged and not plan.deregister and not plan.remove_nodes


def test_plan_on_the_same_catalog_changes_nothing() -> None:
    regs = catalog.registrations(make_mesh())
    plan = catalog.plan_sync(regs, CatalogState(tuple(observed(r) for r in regs), ("vm1", "vm2", "dock1")))
    assert not plan.register and not plan.deregister and not plan.remove_nodes
    assert len(plan.unchanged) == 4


def test_a_changed_service_is_reregistered_and_its_check_left_alone() -> None:
    regs = catalog.registrations(make_mesh())
    state = CatalogState(tuple(observed(r, Port=29999) if r.service_id == "api-vm2-0" else observed(r)
                               for r in regs))
    plan = catalog.plan_sync(regs, state)
    assert [sid for sid, _ in plan.register] == ["api-vm2-0"]
    body = plan.register[0][1]
    assert body["Service"]["Port"] == 21000 and "Check" not in body  # the checker's status stays


def test_a_missing_or_foreign_check_is_rewritten_keeping_its_status() -> None:
    regs = catalog.registrations(make_mesh())
    renamed = observed(regs[0], status="passing")
    renamed = ObservedInstance(renamed.node, renamed.node_address, renamed.node_meta, renamed.service,
                               {**(renamed.check or {}), "Name": "old name"})
    plan = catalog.plan_sync(regs[:1], CatalogState((renamed,)))
    check = plan.register[0][1]["Check"]
    assert check["Status"] == "passing" and check["Name"] == catalog.CHECK_NAME


def test_only_mesh_managed_instances_are_deregistered() -> None:
    regs = catalog.registrations(make_mesh())
    foreign = ObservedInstance("vm2", "10.77.0.12", MappingProxyType({}),
                               MappingProxyType({"ID": "redis-1", "Service": "redis", "Meta": {}}), None)
    state = CatalogState(tuple(observed(r) for r in regs) + (foreign,), ("vm1", "vm2", "dock1"))
    plan = catalog.plan_sync(catalog.registrations(make_mesh(drop="api-vm2-0")), state)
    assert plan.deregister == (InstanceRef("vm2", "api-vm2-0"),)
    assert not plan.remove_nodes


def test_a_mesh_node_left_without_services_is_removed_but_not_one_with_foreign_services() -> None:
    regs = catalog.registrations(make_mesh())
    foreign = ObservedInstance("vm2", "10.77.0.12", MappingProxyType(dict(catalog.NODE_META)),
                               MappingProxyType({"ID": "redis-1", "Service": "redis"}), None)
    state = CatalogState(tuple(observed(r) for r in regs) + (foreign,), ("vm1", "vm2", "dock1", "gone"))
    wanted = [r for r in regs if r.node not in ("vm1", "vm2")]
    plan = catalog.plan_sync(wanted, state)
    assert {ref.service_id for ref in plan.deregister} == {"web-vm1-0", "api-vm2-0", "db-vm2-1"}
    assert plan.remove_nodes == ("vm1", "gone")


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(catalog.CatalogError, match="not http"):
        catalog.connect("consul:8500")


def test_an_unreachable_consul_is_a_clear_error_naming_the_url() -> None:
    from mesh.testing.health_endpoint import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(catalog.CatalogError, match=f"unreachable at {url}") as caught:
        catalog.service_health(url, "api")
    assert caught.value.exit_code == 1
