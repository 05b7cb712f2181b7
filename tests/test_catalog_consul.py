"""mesh.catalog against a real Consul 1.8.7 (`consul agent -dev` on 127.0.0.1, free ports, one per module).

Sync registers, a second sync changes nothing, a removed workload is deregistered alone, others' services are
never touched, and a critical status drops the instance from /v1/health/service/NAME?passing.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.testing.consul_server import ConsulDevServer


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


def get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=5) as answer:
        return json.loads(answer.read())


def test_sync_registers_every_instance_as_the_contract_says(url: str) -> None:
    result = catalog.sync(url, make_mesh())
    assert result.registered == ("web-vm1-0", "api-vm2-0", "db-vm2-1", "api-dock1-0")
    [api] = [e for e in get(url, "/v1/health/service/api") if e["Service"]["ID"] == "api-vm2-0"]
    assert api["Node"]["Node"] == "vm2" and api["Node"]["Address"] == "10.77.0.12"
    assert api["Node"]["Meta"] == {"external-node": "true", "external-probe": "false", "managed-by": "mesh",
                                 "mesh-id": "lab.mesh"}
    assert (api["Service"]["Address"], api["Service"]["Port"]) == ("10.77.0.12", 21000)
    assert api["Service"]["Meta"] == {"version": "v1", "host": "vm2", "kind": "vm", "managed-by": "mesh",
                                    "mesh-id": "lab.mesh"}
    [check] = api["Checks"]
    assert (check["CheckID"], check["ServiceID"], check["Status"]) == ("mesh-health:api-vm2-0", "api-vm2-0",
                                                                       "critical")
    assert get(url, "/v1/health/service/api?passing") == []


def test_a_second_sync_changes_nothing_and_keeps_the_status(url: str) -> None:
    catalog.sync(url, make_mesh())
    catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-0"), "passing", "200 OK")
    before = get(url, "/v1/catalog/service/api")
    result = catalog.sync(url, make_mesh())
    assert not result.changed and len(result.unchanged) == 4
    assert get(url, "/v1/catalog/service/api") == before  # same ModifyIndex: nothing was written
    statuses = [h.status for h in catalog.service_health(url, "api") if h.service_id == "api-vm2-0"]
    assert statuses == ["passing"]


def test_removing_a_workload_deregisters_only_it_and_never_others_services(url: str) -> None:
    catalog.sync(url, make_mesh())
    client = catalog.connect(url)
    client.catalog.register("vm2", "10.77.0.12", service={"ID": "redis-1", "Service": "redis", "Port": 6379},
                            skip_node_update=True)
    client.catalog.register("ext1", "10.77.0.99", service={"ID": "api-ext1-0", "Service": "api", "Port": 1})
    result = catalog.sync(url, make_mesh(drop="api-vm2-0"))
    assert result.deregistered == ("api-vm2-0",) and not result.registered
    assert {h.service_id for h in catalog.service_health(url, "api")} == {"api-dock1-0", "api-ext1-0"}
    assert [h.service_id for h in catalog.service_health(url, "redis")] == ["redis-1"]
    assert [h.service_id for h in catalog.service_health(url, "db")] == ["db-vm2-1"]


def test_a_host_that_loses_all_its_workloads_loses_its_external_node(url: str) -> None:
    catalog.sync(url, make_mesh())
    result = catalog.sync(url, make_mesh(drop="web-vm1-0"))
    assert result.deregistered == ("web-vm1-0",) and result.removed_nodes == ("vm1",)
    nodes = {n["Node"] for n in get(url, "/v1/catalog/nodes")}
    assert "vm1" not in nodes and {"vm2", "dock1"} <= nodes


def test_critical_drops_the_instance_from_passing(url: str) -> None:
    catalog.sync(url, make_mesh())
    for service_id, node in (("api-vm2-0", "vm2"), ("api-dock1-0", "dock1")):
        catalog.set_health(url, catalog.InstanceRef(node, service_id), "passing", "200 OK")
    assert len(get(url, "/v1/health/service/api?passing")) == 2
    catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-0"), "critical", "GET /mesh/health: 503")
    passing = get(url, "/v1/health/service/api?passing")
    assert [e["Service"]["ID"] for e in passing] == ["api-dock1-0"]
    [vm2] = [h for h in catalog.service_health(url, "api") if h.node == "vm2"]
    assert (vm2.status, vm2.output) == ("critical", "GET /mesh/health: 503")


def test_set_health_never_resurrects_a_deregistered_instance(url: str) -> None:
    catalog.sync(url, make_mesh())
    catalog.sync(url, make_mesh(drop="api-vm2-0"))
    with pytest.raises(catalog.CatalogError, match="Missing service registration"):
        catalog.set_health(url, catalog.InstanceRef("vm2", "api-vm2-0"), "passing", "late")
    assert "api-vm2-0" not in {h.service_id for h in catalog.service_health(url, "api")}
