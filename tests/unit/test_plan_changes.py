"""host_changes: a host's plan compared with facts read from it (mesh.plan.changes). Pure: each test starts from
the facts of a host that holds exactly its plan (no change), alters one thing, and reads the changes a
`mesh plan` would print and a deploy would make."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from mesh.config import paths
from mesh.hosts.observe import HostFacts, PathFact, SidecarFact, UnitFact
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Workload
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.changes import Change, host_changes, observe_request
from mesh.plan.model import HostPlan

TD = "test.mesh"
IMAGE = "mesh-envoy:0123456789ab"
ENVOY_SHA = "e" * 64


def _plan(workloads_vm1: tuple[Workload, ...] | None = None) -> dict[str, HostPlan]:
    web = Workload("vm1", 0, "web", 8080, TD)
    db = Workload("vm1", 1, "db", 5432, TD, protocol="tcp", proxy_port=21001, admin_port=19001)
    api = Workload("dock1", 0, "api", 9090, TD, container="api-v2-1")
    vm1 = workloads_vm1 if workloads_vm1 is not None else (web, db)
    hosts = (ManagedHost("vm1", "vm", Connection("10.0.0.11"), vm1),
             ManagedHost("dock1", "container_host", Connection("10.0.0.20"), (api,)))
    services: dict[str, tuple[Workload, ...]] = {}
    for workload in (*vm1, api):
        services[workload.service] = (*services.get(workload.service, ()), workload)
    mesh = Mesh(MeshSettings(trust_domain=TD, consul_url="http://127.0.0.1:1"), hosts, services=services)
    plan = build_plan(mesh, PlanInputs(b"root certificate", "00:11", envoy_sha256=ENVOY_SHA, sidecar_image=IMAGE))
    return {host.name: host for host in plan.hosts}


def converged(plan: HostPlan) -> HostFacts:
    """The facts of a host holding exactly its plan: files, folders, users, units, Envoy, sidecars, firewall."""
    found = {planned.path: PathFact(planned.path, "file", planned.mode, planned.owner, planned.group, planned.owner,
                                    planned.group, planned.sha256) for planned in plan.every_file()}
    found |= {folder.path: PathFact(folder.path, "directory", folder.mode, folder.owner, folder.group, folder.owner,
                                    folder.group) for folder in plan.every_folder()}
    if plan.envoy_sha256:  # observed like every path mesh may have put there
        found[paths.ENVOY_BINARY] = PathFact(paths.ENVOY_BINARY, "file", 0o755, "root", "root", "0", "0",
                                             plan.envoy_sha256)
    return HostFacts(
        plan.name, found, proxies=tuple(proxy.name for proxy in plan.proxies),
        unit_files=tuple(paths.envoy_unit_name(proxy.name) for proxy in plan.proxies if proxy.unit is not None),
        units={unit: UnitFact(unit, "enabled", "active") for unit in plan.units}, users=plan.users,
        mesh_users=tuple(proxy.user for proxy in plan.proxies if proxy.unit is not None),
        running={proxy.name: proxy.bootstrap_sha256 for proxy in plan.proxies},
        envoy_sha256=plan.envoy_sha256, firewall_loaded=True if plan.host.kind == "vm" else None,
        sidecars={proxy.sidecar.name: SidecarFact(proxy.sidecar.name, proxy.sidecar.revision, "running")
                  for proxy in plan.proxies if proxy.sidecar is not None},
        image_present=True if plan.sidecar_image else None, rules_in_place=True if plan.sidecar_image else None)


def no_reason(cert: bytes | None, public_key: bytes | None, spiffe_id: str) -> str | None:
    return None


def lines(changes: tuple[Change, ...]) -> list[str]:
    return [change.line() for change in changes]


def with_path(facts: HostFacts, path: str, change: Callable[[PathFact], PathFact | None]) -> HostFacts:
    paths_ = dict(facts.paths)
    changed = change(paths_[path])
    if changed is None:
        del paths_[path]
    else:
        paths_[path] = changed
    return dataclasses.replace(facts, paths=paths_)


@pytest.mark.parametrize("host", ["vm1", "dock1"])
def test_a_host_holding_its_plan_has_no_change(host: str) -> None:
    plan = _plan()[host]
    assert host_changes(plan, converged(plan), no_reason) == ()


def test_a_new_host_gets_users_folders_binary_files_certificates_units_in_that_order() -> None:
    plan = _plan()["vm1"]
    changes = host_changes(plan, HostFacts("vm1"), lambda cert, key, spiffe: "missing")
    kinds = [change.kind for change in changes]
    assert kinds.index("user") < kinds.index("folder") < kinds.index("binary") < kinds.index("file") \
        < kinds.index("certificate") < kinds.index("unit")
    assert "create user mesh-web-8080" in lines(changes) and "create user mesh-db-5432" in lines(changes)
    assert f"send binary {paths.ENVOY_BINARY}" in lines(changes)
    assert "issue certificate spiffe://test.mesh/svc/web (missing)" in lines(changes)
    bootstrap = next(c for c in changes if c.subject == paths.envoy_config_path("web-8080"))
    assert (bootstrap.action, bootstrap.detail, bootstrap.proxy) == ("create", "restarts its proxy", "web-8080")
    assert bootstrap.diff is not None and bootstrap.diff.startswith("--- /dev/null\n+++ b/etc/mesh/proxies/web-8080")
    # Its Envoy restarts for the new bootstrap: no separate restart of a proxy whose bootstrap is created.
    assert not [c for c in changes if c.kind == "proxy"]
    assert not [c for c in changes if c.action == "remove"]


def test_a_changed_resource_file_is_reloaded_and_a_changed_bootstrap_restarts() -> None:
    plan = _plan()["vm1"]
    cds = f"{paths.xds_dir('web-8080')}/cds.yaml"
    facts = with_path(converged(plan), cds, lambda fact: dataclasses.replace(fact, sha256="0" * 64))
    changes = host_changes(plan, facts, no_reason, texts={cds: "resources: []\n"})
    assert lines(changes) == [f"update file {cds} (content, Envoy reloads it)"]
    assert changes[0].diff is not None and "-resources: []" in changes[0].diff  # what is there, then the plan
    bootstrap = paths.envoy_config_path("db-5432")
    facts = with_path(converged(plan), bootstrap, lambda fact: dataclasses.replace(fact, sha256="0" * 64))
    assert lines(host_changes(plan, facts, no_reason)) == [f"update file {bootstrap} (content, restarts its proxy)"]


def test_mode_or_owner_alone_is_an_attributes_change() -> None:
    plan = _plan()["vm1"]
    key_folder = paths.proxy_dir("web-8080")
    facts = with_path(converged(plan), key_folder, lambda fact: dataclasses.replace(fact, mode=0o755, group="root"))
    ca = paths.proxy_ca_path("web-8080")
    facts = with_path(facts, ca, lambda fact: dataclasses.replace(fact, owner="nobody"))
    assert lines(host_changes(plan, facts, no_reason)) == [
        f"attributes folder {key_folder} (root:root 0755 -> root:mesh-web-8080 0750)",
        f"attributes file {ca} (nobody:mesh-web-8080 0640 -> root:mesh-web-8080 0640)"]


def test_a_sidecars_files_compare_by_number() -> None:
    plan = _plan()["dock1"]
    folder = paths.proxy_dir("api-api-v2-1")
    # The sidecar's uid has no name on the host: stat shows the number as name and id.
    facts = with_path(converged(plan), folder, lambda fact: dataclasses.replace(fact, owner="UNKNOWN", group="UNKNOWN"))
    assert host_changes(plan, facts, no_reason) == ()
    facts = with_path(facts, folder, lambda fact: dataclasses.replace(fact, gid="0"))
    assert lines(host_changes(plan, facts, no_reason)) == [f"attributes folder {folder} (0:0 0750 -> 0:64101 0750)"]


def test_a_missing_user_a_stopped_unit_and_a_flushed_firewall_are_drift() -> None:
    plan = _plan()["vm1"]
    facts = converged(plan)
    unit = paths.envoy_unit_name("db-5432")
    facts = dataclasses.replace(facts, users=("mesh-web-8080",), firewall_loaded=False,
                                units={**facts.units, unit: UnitFact(unit, "disabled", "inactive")})
    assert lines(host_changes(plan, facts, no_reason)) == [
        "create user mesh-db-5432", f"enable unit {unit} (disabled)", f"start unit {unit} (inactive)",
        "load firewall inet mesh (the loaded table differs from the file)"]


def test_a_restart_is_owed_when_envoy_runs_another_bootstrap_than_its_files() -> None:
    plan = _plan()["vm1"]
    facts = converged(plan)
    wanted = plan.proxy("web-8080").bootstrap_sha256
    stale = dataclasses.replace(facts, running={**facts.running, "web-8080": "a" * 64})
    assert lines(host_changes(plan, stale, no_reason)) == [
        f"restart proxy web-8080 (Envoy runs {'a' * 12}, files are {wanted[:12]})"]
    silent = dataclasses.replace(facts, running={"db-5432": facts.running["db-5432"]})
    assert lines(host_changes(plan, silent, no_reason)) == [
        f"restart proxy web-8080 (Envoy runs no answer from its admin socket, files are {wanted[:12]})"]


def test_a_sidecar_is_replaced_when_its_revision_differs_or_it_stopped_and_created_when_missing() -> None:
    plan = _plan()["dock1"]
    facts = converged(plan)
    name = "mesh-envoy-api-api-v2-1"
    old = dataclasses.replace(facts, sidecars={name: SidecarFact(name, "0123456789abcdef", "running")})
    assert lines(host_changes(plan, old, no_reason)) == [
        f"replace sidecar {name} (its bootstrap or image changed)"]
    stopped = dataclasses.replace(facts, sidecars={name: dataclasses.replace(facts.sidecars[name], state="exited")})
    assert lines(host_changes(plan, stopped, no_reason)) == [f"replace sidecar {name} (stopped)"]
    gone = dataclasses.replace(facts, sidecars={}, image_present=False, rules_in_place=False)
    assert lines(host_changes(plan, gone, no_reason)) == [
        f"send image {IMAGE}", f"create sidecar {name}",
        "load rules /etc/mesh/sidecar-rules.sh (the reachability rules are not in place)"]


def test_a_certificate_to_renew_names_its_reason() -> None:
    plan = _plan()["vm1"]

    def reason(cert: bytes | None, public_key: bytes | None, spiffe_id: str) -> str | None:
        return "past half its lifetime" if spiffe_id.endswith("/db") else None
    assert lines(host_changes(plan, converged(plan), reason)) == [
        "renew certificate spiffe://test.mesh/svc/db (past half its lifetime)"]


def test_a_proxy_that_left_is_removed_with_its_unit_and_user_last() -> None:
    before = _plan()["vm1"]
    facts = converged(before)  # web-8080 and db-5432 deployed
    web = before.proxy("web-8080").workload
    after = _plan(workloads_vm1=(web,))["vm1"]
    changes = host_changes(after, facts, no_reason)
    assert lines(changes) == [
        "update file /etc/mesh/firewall.nft (content)",  # db's port is no longer closed by mesh
        "remove proxy db-5432 (it left the inventory)",
        f"remove unit {paths.envoy_unit_name('db-5432')}",
        "remove user mesh-db-5432"]


def test_a_host_that_lost_its_last_workload_loses_every_file_of_its_role() -> None:
    before = _plan()["vm1"]
    after = _plan(workloads_vm1=())["vm1"]
    changes = host_changes(after, converged(before), no_reason)
    removed = {(change.kind, change.subject) for change in changes if change.action == "remove"}
    assert {("proxy", "web-8080"), ("proxy", "db-5432"), ("unit", "mesh-envoy-web-8080.service"),
            ("user", "mesh-web-8080"), ("file", paths.FIREWALL_PATH), ("file", paths.ENVOY_BINARY),
            ("file", paths.CA_PATH)} <= removed
    assert all(change.action == "remove" for change in changes), lines(changes)


def test_the_observation_asks_for_every_planned_thing() -> None:
    plan = _plan()["vm1"]
    request = observe_request(plan)
    assert {planned.path for planned in plan.every_file()} <= set(request.paths)
    assert request.listed == (paths.xds_dir("web-8080"), paths.xds_dir("db-5432"))
    assert request.admin_sockets == (("web-8080", paths.admin_socket_path("web-8080")),
                                     ("db-5432", paths.admin_socket_path("db-5432")))
    # the role users (the controllers' account, the controller's own) are asked for everywhere, to remove them
    assert request.users == ("mesh-web-8080", "mesh-db-5432", "mesh-ctl", "mesh-controller") and request.firewall
    assert request.envoy_binary == paths.ENVOY_BINARY and not request.container_host
    dock1 = observe_request(_plan()["dock1"])
    assert dock1.container_host and dock1.sidecar_image == IMAGE and dock1.rules_check is not None
