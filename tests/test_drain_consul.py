"""`mesh drain` against a real Consul 1.8.7 (`consul agent -dev`, free ports): the drain check makes the
instance critical (so it leaves /v1/health/service/NAME?passing, what the controllers read), survives the
checker's writes and a re-deploy's catalog sync (even one that re-registers the service), and `--undo`
removes it alone, giving back the checker's status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.inventory.model import Mesh
from mesh.testing.consul_server import ConsulDevServer

MESH = str(Path(sys.executable).with_name("mesh"))
API_VM2 = catalog.InstanceRef("vm2", "api-vm2-9090")


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    from mesh.lab.images import ensure_consul_binary

    with ConsulDevServer(ensure_consul_binary()) as server:  # a failure to get Consul fails, never skips
        yield server


@pytest.fixture
def mesh(consul: ConsulDevServer) -> Iterator[Mesh]:
    """make_mesh()'s fleet registered in the dev Consul, every instance passing (as the checker writes it)."""
    ours = replace(make_mesh(), settings=replace(make_mesh().settings, consul_url=consul.url))
    catalog.sync(consul.url, ours)
    for reg in catalog.registrations(ours):
        catalog.set_health(consul.url, reg, "passing", "GET /mesh/health: 200 OK")
    yield ours
    client = catalog.connect(consul.url)
    for node in client.catalog.nodes()[1]:
        if node["Node"] != client.agent.self()["Config"]["NodeName"]:
            client.catalog.deregister(node["Node"])


def inventory(folder: Path, url: str) -> Path:
    """make_mesh()'s hosts as an inventory (addresses nothing listens on: drain connects to no host)."""
    path = folder / "hosts.yaml"
    path.write_text(json.dumps({"all": {
        "vars": {"mesh_trust_domain": "lab.mesh", "mesh_consul_url": url, "mesh_state_dir": str(folder / "state")},
        "children": {
            "mesh_controllers": {"hosts": {"ctl1": {"ansible_host": "10.77.0.3"}}},
            "vms": {"hosts": {
                "vm1": {"ansible_host": "10.77.0.11", "mesh_workloads": [{"service": "web", "port": 8080}]},
                "vm2": {"ansible_host": "10.77.0.12", "mesh_workloads": [
                    {"service": "api", "port": 9090}, {"service": "db", "port": 5432, "protocol": "tcp"}]}}}}}}))
    return path


def mesh_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH, *args], capture_output=True, text=True, timeout=120, check=False)


def health(url: str, service_id: str) -> catalog.InstanceHealth:
    [found] = [item for item in catalog.service_health(url, "api") if item.service_id == service_id]
    return found


def passing_ids(url: str, service: str) -> set[str]:
    client = catalog.connect(url)
    return {entry["Service"]["ID"] for entry in client.health.service(service, passing=True)[1]}


def checks_of(url: str, ref: catalog.InstanceRef) -> dict[str, str]:
    client = catalog.connect(url)
    return {check["CheckID"]: check["Status"] for check in client.health.node(ref.node)[1]
            if check.get("ServiceID") == ref.service_id}


def test_drain_and_undo_through_the_cli(consul: ConsulDevServer, mesh: Mesh, tmp_path: Path) -> None:
    path = str(inventory(tmp_path, consul.url))
    assert passing_ids(consul.url, "api") == {"api-vm2-9090", "api-dock1-api-v2-1"}
    done = mesh_cli("drain", "api", "vm2", "-i", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("drained api-vm2-9090 on vm2: check mesh-drain:api-vm2-9090 is critical")
    assert "no controller is active (nobody holds the controllers' lock)" in done.stderr
    assert passing_ids(consul.url, "api") == {"api-dock1-api-v2-1"}, "the drained instance is not passing"
    drained = health(consul.url, "api-vm2-9090")
    assert drained.status == "critical" and drained.output.startswith("drained by ") and drained.drained
    assert not health(consul.url, "api-dock1-api-v2-1").drained
    assert checks_of(consul.url, API_VM2) == {"mesh-health:api-vm2-9090": "passing",
                                              "mesh-drain:api-vm2-9090": "critical"}

    undone = mesh_cli("drain", "api", "vm2", "--undo", "-i", path)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert undone.stdout.startswith("undrained api-vm2-9090 on vm2")
    assert checks_of(consul.url, API_VM2) == {"mesh-health:api-vm2-9090": "passing"}
    assert not health(consul.url, "api-vm2-9090").drained
    assert passing_ids(consul.url, "api") == {"api-vm2-9090", "api-dock1-api-v2-1"}
    again = mesh_cli("drain", "api", "vm2", "--undo", "-i", path)
    assert again.returncode == 0 and "was not drained" in again.stdout


def test_the_checker_and_a_redeploy_keep_an_instance_drained(consul: ConsulDevServer, mesh: Mesh) -> None:
    catalog.set_drain(consul.url, API_VM2, "drained by test")
    catalog.set_health(consul.url, API_VM2, "passing", "GET /mesh/health: 200 OK")  # the checker's next round
    assert catalog.sync(consul.url, mesh).registered == (), "a converged sync re-registers nothing"
    # a re-deploy that changes the service (a new version: Meta) re-registers it; the drain check stays
    workloads = [replace(w, version="v9") if w.consul_id == API_VM2.service_id else w for w in mesh.hosts[2].workloads]
    changed = replace(mesh, hosts=(*mesh.hosts[:2], replace(mesh.hosts[2], workloads=tuple(workloads)),
                                   *mesh.hosts[3:]))
    assert catalog.sync(consul.url, changed).registered == (API_VM2.service_id,)
    assert health(consul.url, API_VM2.service_id).meta["version"] == "v9"
    # a service whose mesh-health check went missing is re-registered with one: the drain check stays too
    catalog.connect(consul.url).http.put(
        catalog.CB.boolean(), "/v1/catalog/deregister",
        data=json.dumps({"Node": "vm2", "CheckID": API_VM2.check_id}))
    assert catalog.sync(consul.url, changed).registered == (API_VM2.service_id,)
    assert checks_of(consul.url, API_VM2)["mesh-drain:api-vm2-9090"] == "critical"
    assert API_VM2.service_id not in passing_ids(consul.url, "api")
    assert catalog.drain_states(consul.url, "api")[API_VM2.service_id].drain is not None

    catalog.clear_drain(consul.url, API_VM2)
    assert set(checks_of(consul.url, API_VM2)) == {"mesh-health:api-vm2-9090"}


def test_drain_refuses_an_instance_consul_does_not_hold(consul: ConsulDevServer, tmp_path: Path) -> None:
    done = mesh_cli("drain", "api", "vm2", "-i", str(inventory(tmp_path, consul.url)))
    assert done.returncode == 1
    assert "api-vm2-9090 is not registered in Consul on node vm2 (run `mesh deploy` first)" in done.stderr
