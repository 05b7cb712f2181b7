"""mesh.catalog without Consul: registrations() and plan_sync() are pure; errors name the URL.

The same behaviour against a real `consul agent -dev` is in tests/test_catalog_consul.py.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.catalog import CatalogState, InstanceRef, ObservedInstance, Registration

MESH_ID = "lab.mesh"  # make_mesh()'s trust domain, so its default mesh id


def observed(reg: Registration, status: str = "passing", **service_changes: Any) -> ObservedInstance:
    """What Consul would hold after registering `reg` (and the checker writing `status`)."""
    service = {**reg.service_body(), **service_changes}
    check = {**catalog.check_body(reg.ref, "critical", ""), "Status": status, "Output": f"was {status}"}
    node_meta = catalog.node_meta(reg.meta.get(catalog.MESH_ID, MESH_ID))
    return ObservedInstance(reg.node, reg.address, MappingProxyType(node_meta), MappingProxyType(service), check)


def state(instances: tuple[ObservedInstance, ...], nodes: dict[str, str] | tuple[str, ...] = ()) -> CatalogState:
    """A catalog holding these instances, and these mesh nodes (a tuple: all of MESH_ID; a dict: node -> id)."""
    owners = nodes if isinstance(nodes, dict) else dict.fromkeys(nodes, MESH_ID)
    return CatalogState(instances, tuple(owners), MappingProxyType(owners))


def other_mesh(regs: list[Registration], mesh_id: str = "other") -> list[Registration]:
    """The same registrations as another mesh id would make them, on its own hosts (b-vm1, ...)."""
    return [Registration(f"b-{r.node}", r.address, f"{r.service}-b-{r.node}-0", r.service, r.port,
                         MappingProxyType({**r.meta, "host": f"b-{r.node}", catalog.MESH_ID: mesh_id}))
            for r in regs]


def test_registrations_follow_the_inventory_contract() -> None:
    regs = catalog.registrations(make_mesh())
    assert [r.service_id for r in regs] == ["web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"]
    api = regs[1]
    assert (api.node, api.address, api.service, api.port) == ("vm2", "10.77.0.12", "api", 21000)
    assert dict(api.meta) == {"version": "v1", "host": "vm2", "kind": "vm", "managed-by": "mesh",
                              "mesh-id": MESH_ID}
    assert dict(regs[3].meta)["kind"] == "container" and dict(regs[3].meta)["version"] == "v2"
    assert api.check_id == "mesh-health:api-vm2-9090"


def test_register_body_is_an_external_node_with_a_critical_check_first() -> None:
    reg = catalog.registrations(make_mesh())[0]
    body = catalog.register_body(reg, catalog.check_body(reg.ref, "critical", catalog.NOT_CHECKED_YET))
    assert body["NodeMeta"] == {"external-node": "true", "external-probe": "false", "managed-by": "mesh",
                                "mesh-id": MESH_ID}
    assert body["Service"]["ID"] == "web-vm1-8080" and body["Service"]["Port"] == 21000
    assert body["Check"]["CheckID"] == "mesh-health:web-vm1-8080"
    assert body["Check"]["ServiceID"] == "web-vm1-8080" and body["Check"]["Status"] == "critical"


def test_plan_on_an_empty_catalog_registers_everything() -> None:
    plan = catalog.plan_sync(catalog.registrations(make_mesh()), CatalogState())
    assert [sid for sid, _ in plan.register] == ["web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"]
    assert not plan.unchanged and not plan.deregister and not plan.remove_nodes


def test_plan_on_the_same_catalog_changes_nothing() -> None:
    regs = catalog.registrations(make_mesh())
    plan = catalog.plan_sync(regs, state(tuple(observed(r) for r in regs), ("vm1", "vm2", "dock1")), MESH_ID)
    assert not plan.register and not plan.deregister and not plan.remove_nodes
    assert len(plan.unchanged) == 4


def test_a_changed_service_is_reregistered_and_its_check_left_alone() -> None:
    regs = catalog.registrations(make_mesh())
    seen = state(tuple(observed(r, Port=29999) if r.service_id == "api-vm2-9090" else observed(r) for r in regs))
    plan = catalog.plan_sync(regs, seen, MESH_ID)
    assert [sid for sid, _ in plan.register] == ["api-vm2-9090"]
    body = plan.register[0][1]
    assert body["Service"]["Port"] == 21000 and "Check" not in body  # the checker's status stays


def test_a_missing_or_foreign_check_is_rewritten_keeping_its_status() -> None:
    regs = catalog.registrations(make_mesh())
    renamed = observed(regs[0], status="passing")
    renamed = ObservedInstance(renamed.node, renamed.node_address, renamed.node_meta, renamed.service,
                               {**(renamed.check or {}), "Name": "old name"})
    plan = catalog.plan_sync(regs[:1], state((renamed,)), MESH_ID)
    check = plan.register[0][1]["Check"]
    assert check["Status"] == "passing" and check["Name"] == catalog.CHECK_NAME


def test_only_mesh_managed_instances_are_deregistered() -> None:
    regs = catalog.registrations(make_mesh())
    foreign = ObservedInstance("vm2", "10.77.0.12", MappingProxyType({}),
                               MappingProxyType({"ID": "redis-1", "Service": "redis", "Meta": {}}), None)
    seen = state(tuple(observed(r) for r in regs) + (foreign,), ("vm1", "vm2", "dock1"))
    plan = catalog.plan_sync(catalog.registrations(make_mesh(drop="api-vm2-9090")), seen, MESH_ID)
    assert plan.deregister == (InstanceRef("vm2", "api-vm2-9090"),)
    assert not plan.remove_nodes


def test_a_mesh_node_left_without_services_is_removed_but_not_one_with_foreign_services() -> None:
    regs = catalog.registrations(make_mesh())
    foreign = ObservedInstance("vm2", "10.77.0.12", MappingProxyType(catalog.node_meta(MESH_ID)),
                               MappingProxyType({"ID": "redis-1", "Service": "redis"}), None)
    seen = state(tuple(observed(r) for r in regs) + (foreign,), ("vm1", "vm2", "dock1", "gone"))
    wanted = [r for r in regs if r.node not in ("vm1", "vm2")]
    plan = catalog.plan_sync(wanted, seen, MESH_ID)
    assert {ref.service_id for ref in plan.deregister} == {"web-vm1-8080", "api-vm2-9090", "db-vm2-5432"}
    assert plan.remove_nodes == ("vm1", "gone")


def test_another_mesh_ids_instances_and_nodes_are_never_deregistered_or_removed() -> None:
    ours = catalog.registrations(make_mesh())
    theirs = other_mesh(ours)
    nodes = {r.node: MESH_ID for r in ours} | {r.node: "other" for r in theirs}
    seen = state(tuple(observed(r) for r in ours + theirs), nodes)
    plan = catalog.plan_sync([], seen, MESH_ID)  # our inventory emptied: only ours go
    assert {ref.service_id for ref in plan.deregister} == {r.service_id for r in ours}
    assert set(plan.remove_nodes) == {"vm1", "vm2", "dock1"}
    plan = catalog.plan_sync(theirs, seen, "other")  # their sync leaves ours alone
    assert not plan.deregister and not plan.remove_nodes and not plan.register and not plan.conflicts


def test_an_instance_on_another_mesh_ids_node_is_a_conflict_and_not_registered() -> None:
    regs = catalog.registrations(make_mesh())
    seen = state((), {"vm1": "other", "vm2": MESH_ID})
    plan = catalog.plan_sync(regs, seen, MESH_ID)
    assert "web-vm1-8080" not in [sid for sid, _ in plan.register]
    [conflict] = plan.conflicts
    assert "web-vm1-8080" in conflict and "node vm1" in conflict and "'other'" in conflict


def test_an_instance_registered_before_mesh_ids_is_claimed_but_never_deregistered() -> None:
    regs = catalog.registrations(make_mesh())
    legacy_meta = {k: v for k, v in regs[0].meta.items() if k != catalog.MESH_ID}
    legacy = observed(regs[0], Meta=legacy_meta)
    plan = catalog.plan_sync(regs[:1], state((legacy,), {"vm1": ""}), MESH_ID)
    assert [sid for sid, _ in plan.register] == ["web-vm1-8080"] and not plan.conflicts
    plan = catalog.plan_sync([], state((legacy,), {"vm1": ""}), MESH_ID)
    assert not plan.deregister and not plan.remove_nodes


def test_the_token_file_must_hold_one_token(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text("  3f1c8a3e-0000-4000-8000-000000000001\n")
    assert catalog.read_token(str(good)) == "3f1c8a3e-0000-4000-8000-000000000001"
    for text in ("", "two\nlines", "a b"):
        good.write_text(text)
        with pytest.raises(catalog.CatalogError, match="one token on one line") as caught:
            catalog.read_token(str(good))
        assert text.strip() == "" or text.split()[0] not in str(caught.value)
    with pytest.raises(catalog.CatalogError, match="cannot read the Consul token file"):
        catalog.read_token(str(tmp_path / "missing"))


def test_the_token_is_sent_as_a_header_and_never_shown() -> None:
    access = catalog.ConsulAccess("https://consul:8501", "s3cret-token", "/etc/ca.pem")
    assert "s3cret" not in repr(access)
    client = catalog.connect(access)
    assert client.prepare_headers() == {"X-Consul-Token": "s3cret-token"}
    assert client.http.verify == "/etc/ca.pem" and client.http.base_uri == "https://consul:8501"
    assert catalog.connect("http://consul:8500").prepare_headers() == {}


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(catalog.CatalogError, match="not http"):
        catalog.connect("consul:8500")


def test_an_unreachable_consul_is_a_clear_error_naming_the_url() -> None:
    from mesh.testing.health_endpoint import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(catalog.CatalogError, match=f"unreachable at {url}") as caught:
        catalog.service_health(url, "api")
    assert caught.value.exit_code == 1
