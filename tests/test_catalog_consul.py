"""mesh.catalog against a real Consul 1.8.7 (`consul agent -dev` on 127.0.0.1, free ports, one per module).

Sync registers, a second sync changes nothing, a removed workload is deregistered alone, others' services are
never touched, and a critical status drops the instance from /v1/health/service/NAME?passing. With ACLs on
(deny by default): the token is sent, a wrong one is refused by name (the CLI exits 1), https verifies with
mesh_consul_ca_file, and two mesh ids share one Consul without touching each other's instances.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.errors import MeshError
from mesh.healthcheck.config import lock_key
from mesh.healthcheck.leader import Leadership
from mesh.inventory.model import Mesh
from mesh.testing.consul_server import ConsulDevServer, make_server_tls
from mesh.testing.fake_connector import NoHostMayBeReached

MESH = str(Path(sys.executable).with_name("mesh"))


def consul_binary() -> Path:
    from mesh.lab.images import ensure_consul_binary

    return ensure_consul_binary()  # the real Consul: a failure to get it fails these tests, never skips


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    with ConsulDevServer(consul_binary()) as server:
        yield server


@pytest.fixture
def url(consul: ConsulDevServer) -> Iterator[str]:
    yield consul.url
    client = catalog.connect(consul.url)  # leave an empty catalog for the next test
    for node in client.catalog.nodes()[1]:
        if node["Node"] != consul.node:
            client.catalog.deregister(node["Node"])


def get(url: str, path: str, headers: dict[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=5) as answer:
        return json.loads(answer.read())


def test_sync_registers_every_instance_as_the_contract_says(url: str) -> None:
    result = catalog.sync(url, make_mesh())
    assert result.registered == ("web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1")
    [api] = [e for e in get(url, "/v1/health/service/api") if e["Service"]["ID"] == "api-vm2-9090"]
    assert api["Node"]["Node"] == "vm2" and api["Node"]["Address"] == "10.77.0.12"
    assert api["Node"]["Meta"] == {"external-node": "true", "external-probe": "false", "managed-by": "mesh",
                                 "mesh-id": "lab.mesh"}
    assert (api["Service"]["Address"], api["Service"]["Port"]) == ("10.77.0.12", 21000)
    assert api["Service"]["Meta"] == {"version": "v1", "host": "vm2", "kind": "vm", "managed-by": "mesh",
                                    "mesh-id": "lab.mesh"}
    [check] = api["Checks"]
    assert (check["CheckID"], check["ServiceID"], check["Status"]) == ("mesh-health:api-vm2-9090", "api-vm2-9090",
                                                                       "critical")
    assert get(url, "/v1/health/service/api?passing") == []


def test_a_second_sync_changes_nothing_and_keeps_the_status(url: str) -> None:
    catalog.sync(url, make_mesh())
    catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-9090"), "passing", "200 OK")
    before = get(url, "/v1/catalog/service/api")
    result = catalog.sync(url, make_mesh())
    assert not result.changed and len(result.unchanged) == 4
    assert get(url, "/v1/catalog/service/api") == before  # same ModifyIndex: nothing was written
    statuses = [h.status for h in catalog.service_health(url, "api") if h.service_id == "api-vm2-9090"]
    assert statuses == ["passing"]


def test_removing_a_workload_deregisters_only_it_and_never_others_services(url: str) -> None:
    catalog.sync(url, make_mesh())
    client = catalog.connect(url)
    client.catalog.register("vm2", "10.77.0.12", service={"ID": "redis-1", "Service": "redis", "Port": 6379},
                            skip_node_update=True)
    client.catalog.register("ext1", "10.77.0.99", service={"ID": "api-ext1-0", "Service": "api", "Port": 1})
    result = catalog.sync(url, make_mesh(drop="api-vm2-9090"))
    assert result.deregistered == ("api-vm2-9090",) and not result.registered
    assert {h.service_id for h in catalog.service_health(url, "api")} == {"api-dock1-api-v2-1", "api-ext1-0"}
    assert [h.service_id for h in catalog.service_health(url, "redis")] == ["redis-1"]
    assert [h.service_id for h in catalog.service_health(url, "db")] == ["db-vm2-5432"]


def test_a_host_that_loses_all_its_workloads_loses_its_external_node(url: str) -> None:
    catalog.sync(url, make_mesh())
    result = catalog.sync(url, make_mesh(drop="web-vm1-8080"))
    assert result.deregistered == ("web-vm1-8080",) and result.removed_nodes == ("vm1",)
    nodes = {n["Node"] for n in get(url, "/v1/catalog/nodes")}
    assert "vm1" not in nodes and {"vm2", "dock1"} <= nodes


def test_critical_drops_the_instance_from_passing(url: str) -> None:
    catalog.sync(url, make_mesh())
    for service_id, node in (("api-vm2-9090", "vm2"), ("api-dock1-api-v2-1", "dock1")):
        catalog.set_health(url, catalog.InstanceRef(node, service_id), "passing", "200 OK")
    assert len(get(url, "/v1/health/service/api?passing")) == 2
    catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-9090"), "critical", "GET /mesh/health: 503")
    passing = get(url, "/v1/health/service/api?passing")
    assert [e["Service"]["ID"] for e in passing] == ["api-dock1-api-v2-1"]
    [vm2] = [h for h in catalog.service_health(url, "api") if h.node == "vm2"]
    assert (vm2.status, vm2.output) == ("critical", "GET /mesh/health: 503")


def test_set_health_never_resurrects_a_deregistered_instance(url: str) -> None:
    catalog.sync(url, make_mesh())
    catalog.sync(url, make_mesh(drop="api-vm2-9090"))
    with pytest.raises(catalog.CatalogError, match="Missing service registration"):
        catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-9090"), "passing", "late")
    assert "api-vm2-9090" not in {h.service_id for h in catalog.service_health(url, "api")}


# ---- Consul with ACLs (deny by default) and HTTPS, and two meshes sharing it ------------------------------

@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDevServer]:
    """A Consul that denies by default (mesh's token has the README's policy) and also serves https."""
    tls = make_server_tls(tmp_path_factory.mktemp("consul-tls"))
    with ConsulDevServer(consul_binary(), acl=True, tls=tls) as server:
        yield server


@pytest.fixture
def access(secure: ConsulDevServer) -> Iterator[catalog.ConsulAccess]:
    yield catalog.ConsulAccess(secure.url, secure.mesh_token())
    assert secure.master_token is not None
    headers = {"X-Consul-Token": secure.master_token}
    for node in get(secure.url, "/v1/catalog/nodes", headers):  # leave an empty catalog for the next test
        if node["Node"] != secure.node:
            request = urllib.request.Request(f"{secure.url}/v1/catalog/deregister", method="PUT", headers=headers,
                                             data=json.dumps({"Node": node["Node"]}).encode())
            urllib.request.urlopen(request, timeout=5).close()


def renamed(mesh: Mesh, mesh_id: str, prefix: str) -> Mesh:
    """The same fleet as another inventory would describe it: its own mesh id and host names."""
    hosts = tuple(replace(host, name=prefix + host.name,
                          workloads=tuple(replace(w, host=prefix + host.name) for w in host.workloads))
                  for host in mesh.hosts)
    return replace(mesh, settings=replace(mesh.settings, mesh_id=mesh_id), hosts=hosts)


def test_with_acls_the_token_is_sent_and_anonymous_reads_see_nothing(
        secure: ConsulDevServer, access: catalog.ConsulAccess) -> None:
    assert catalog.sync(access, make_mesh()).registered == ("web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1")
    assert {h.service_id for h in catalog.service_health(access, "api")} == {"api-vm2-9090", "api-dock1-api-v2-1"}
    assert get(secure.url, "/v1/health/service/api") == []  # what a missing token would silently get
    lock = Leadership(access, lock_key("lab.mesh"), 10)
    try:
        assert lock.step(), "the policy lets mesh's token take the checker's session and lock"
    finally:
        lock.release()


@pytest.mark.parametrize("token", ["3b7ce0a4-0000-4000-8000-00000000dead", None])
def test_a_wrong_or_missing_token_is_refused_before_anything_is_read(
        secure: ConsulDevServer, access: catalog.ConsulAccess, token: str | None) -> None:
    wrong = catalog.ConsulAccess(secure.url, token)
    for call in (lambda: catalog.sync(wrong, make_mesh()), lambda: catalog.service_health(wrong, "api"),
                 lambda: catalog.plan(wrong, make_mesh())):
        with pytest.raises(catalog.TokenRefused, match="Consul refused the token") as caught:
            call()
        assert caught.value.exit_code == 1 and (token is None or token not in str(caught.value))
    assert catalog.service_health(access, "api") == []  # nothing was registered


def test_https_with_the_inventorys_ca_file(secure: ConsulDevServer, access: catalog.ConsulAccess) -> None:
    assert secure.tls is not None
    https = catalog.ConsulAccess(secure.https_url, access.token, str(secure.tls.ca))
    assert len(catalog.sync(https, make_mesh()).registered) == 4
    assert len(catalog.service_health(https, "api")) == 2
    with pytest.raises(catalog.CatalogError, match="CERTIFICATE_VERIFY_FAILED"):  # the system CAs: refused
        catalog.service_health(catalog.ConsulAccess(secure.https_url, access.token), "api")


def test_two_mesh_ids_sharing_one_consul_never_deregister_each_other(access: catalog.ConsulAccess) -> None:
    ours, theirs = make_mesh(), renamed(make_mesh(), "team-b", "b-")
    catalog.sync(access, ours)
    assert len(catalog.sync(access, theirs).registered) == 4
    again = catalog.sync(access, ours)  # before mesh ids, this deregistered all of team-b's instances
    assert not again.changed and not again.conflicts
    gone = catalog.sync(access, replace(ours, hosts=()))  # our inventory emptied: only ours go
    assert set(gone.deregistered) == {"web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"}
    assert set(gone.removed_nodes) == {"vm1", "vm2", "dock1"}
    left = catalog.service_health(access, "api")
    assert {h.service_id for h in left} == {"api-b-vm2-9090", "api-b-dock1-api-v2-1"}
    assert {h.meta["mesh-id"] for h in left} == {"team-b"}
    assert catalog.service_health(access, "api", mesh_id="lab.mesh") == []


def test_an_instance_on_a_node_of_another_mesh_id_is_refused_not_taken(access: catalog.ConsulAccess) -> None:
    catalog.sync(access, make_mesh())
    clash = renamed(make_mesh(), "team-b", "")  # the same host names under another mesh id
    result = catalog.sync(access, clash)
    assert not result.registered and not result.deregistered and len(result.conflicts) == 4
    assert "belongs to the mesh id 'lab.mesh'" in result.conflicts[0]
    assert {h.meta["mesh-id"] for h in catalog.service_health(access, "api")} == {"lab.mesh"}


def write_inventory(folder: Path, url: str, token: str | None, **extra: str) -> Path:
    """An inventory with Consul settings and no managed host: deploy and status only talk to Consul."""
    variables = {"mesh_trust_domain": "lab.mesh", "mesh_consul_url": url, **extra}
    if token is not None:
        (folder / "consul-token").write_text(token + "\n")
        (folder / "consul-token").chmod(0o600)
        variables["mesh_consul_token_file"] = "consul-token"  # relative: from the inventory's folder
    path = folder / "hosts.yaml"
    path.write_text(json.dumps({"all": {"vars": variables, "hosts": {"consul1": {"ansible_host": "127.0.0.1"}}}}))
    return path


@pytest.mark.parametrize("command", ["deploy", "status"])
def test_the_cli_says_consul_refused_the_token_and_exits_1(
        secure: ConsulDevServer, access: catalog.ConsulAccess, tmp_path: Path, command: str) -> None:
    assert access.token is not None
    good = subprocess.run([MESH, command, str(write_inventory(tmp_path, secure.url, access.token))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    inventory = write_inventory(tmp_path, secure.url, "3b7ce0a4-0000-4000-8000-00000000dead")
    bad = subprocess.run([MESH, command, str(inventory)], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Consul refused the token" in bad.stdout + bad.stderr
    assert "3b7ce0a4" not in bad.stdout + bad.stderr


def test_the_cli_reaches_an_https_consul_with_mesh_consul_ca_file(
        secure: ConsulDevServer, access: catalog.ConsulAccess, tmp_path: Path) -> None:
    assert access.token is not None and secure.tls is not None
    inventory = write_inventory(tmp_path, secure.https_url, access.token, mesh_consul_ca_file=str(secure.tls.ca))
    done = subprocess.run([MESH, "status", str(inventory)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([MESH, "deploy", str(inventory)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    inventory = write_inventory(tmp_path, secure.https_url, access.token)  # no CA file: the system's CAs
    done = subprocess.run([MESH, "deploy", str(inventory)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in done.stdout + done.stderr


def write_fleet_inventory(folder: Path, url: str, token: str, mesh_id: str = "lab.mesh",
                          host: str = "vm1") -> Path:
    """A fleet with one VM workload and a controller, at addresses nothing listens on."""
    (folder / "consul-token").write_text(token + "\n")
    (folder / "consul-token").chmod(0o600)
    inventory = {"all": {
        "vars": {"mesh_trust_domain": "lab.mesh", "mesh_consul_url": url, "mesh_id": mesh_id,
                 "mesh_consul_token_file": "consul-token", "mesh_state_dir": str(folder / "state")},
        "children": {
            "mesh_controllers": {"hosts": {"ctl1": {"ansible_host": "192.0.2.3"}}},
            "vms": {"hosts": {host: {"ansible_host": "192.0.2.11", "mesh_workloads": [
                {"service": "web", "port": 8080}]}}}}}}
    path = folder / "hosts.yaml"
    path.write_text(json.dumps(inventory))
    return path


def test_a_refused_token_stops_the_deploy_before_any_host_is_touched(
        secure: ConsulDevServer, tmp_path: Path) -> None:
    from mesh.deploy.command import deploy

    inventory = write_fleet_inventory(tmp_path, secure.url, "3b7ce0a4-0000-4000-8000-00000000dead")
    factory = NoHostMayBeReached()
    with pytest.raises(catalog.TokenRefused, match="Consul refused the token"):
        deploy(str(inventory), connector_factory=factory)
    assert factory.calls == []
    assert not (tmp_path / "state").exists(), "no CA is made for a deploy Consul refused"


def test_an_instance_another_mesh_id_owns_stops_the_deploy_before_any_host_is_touched(
        secure: ConsulDevServer, access: catalog.ConsulAccess, tmp_path: Path) -> None:
    from mesh.deploy.command import deploy

    assert access.token is not None
    catalog.sync(access, make_mesh())  # mesh id lab.mesh owns the node vm1
    inventory = write_fleet_inventory(tmp_path, secure.url, access.token, mesh_id="team-b")
    factory = NoHostMayBeReached()
    with pytest.raises(MeshError, match="belongs to the mesh id 'lab.mesh'"):
        deploy(str(inventory), connector_factory=factory)
    assert factory.calls == []
    assert {h.meta["mesh-id"] for h in catalog.service_health(access, "web")} == {"lab.mesh"}
