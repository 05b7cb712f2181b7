"""The controller's endpoints and snapshot (pure): which instances a caller's EDS file gets from Consul's health
answer, the panic rule, the last snapshot kept when Consul lists nothing, and files equal for equal sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mesh.controller.endpoints import (
    Endpoint,
    ServiceEndpoints,
    chosen_endpoints,
    file_endpoints,
    service_endpoints,
    with_endpoints,
)
from mesh.controller.snapshot import build_snapshot, proxy_snapshot, remembered, watched_services
from mesh.render import ENDPOINT_TYPE, resources_version
from mesh.testing.fake_ctl import MESH_ID, controller_spec, host_spec, proxy_spec, web_files


def entry(address: str, port: int, *statuses: str, mesh_id: str = MESH_ID, managed: bool = True,
          node_address: str = "10.0.0.1") -> dict[str, Any]:
    meta = {"managed-by": "mesh", "mesh-id": mesh_id, "version": "v2", "host": f"h-{address}"} if managed else {}
    return {"Node": {"Node": f"n-{address}", "Address": node_address},
            "Service": {"ID": f"api-{address}-{port}", "Service": "api", "Address": address, "Port": port,
                        "Meta": meta},
            "Checks": [{"CheckID": f"c{index}", "Status": status} for index, status in enumerate(statuses)]}


def test_an_instance_is_up_unless_one_of_its_checks_is_critical() -> None:
    seen = service_endpoints("api", [entry("10.0.0.12", 21001, "passing"),
                                     entry("10.0.0.11", 21001, "passing", "warning"),
                                     entry("10.0.0.20", 21001, "passing", "critical")], MESH_ID)  # a drain check
    assert [(e.address, e.port) for e in seen.up] == [("10.0.0.11", 21001), ("10.0.0.12", 21001)]
    assert [(e.address, e.port) for e in seen.registered] == [("10.0.0.11", 21001), ("10.0.0.12", 21001),
                                                              ("10.0.0.20", 21001)]
    # who answers there, from Service, Meta version and host, ID: its lb_endpoint's metadata
    assert seen.up[0] == Endpoint("10.0.0.11", 21001, "api", "v2", "api-10.0.0.11-21001", "h-10.0.0.11")


def test_only_this_mesh_ids_own_instances_with_an_ip_and_a_port_count() -> None:
    seen = service_endpoints("api", [entry("10.0.0.12", 1, "passing", mesh_id="other.mesh"),
                                     entry("10.0.0.13", 1, "passing", managed=False),
                                     entry("", 2, "passing", node_address="10.0.0.14"),
                                     entry("api.example", 3, "passing"), entry("10.0.0.15", 0, "passing")], MESH_ID)
    # no service address: the node's
    assert seen.registered == seen.up == (Endpoint("10.0.0.14", 2, "api", "v2", "api--2", "h-"),)


def test_every_instance_critical_keeps_them_all_and_none_registered_keeps_the_last() -> None:
    everyone = ServiceEndpoints("api", (Endpoint("10.0.0.11", 1), Endpoint("10.0.0.12", 1)), ())
    assert chosen_endpoints(everyone) == everyone.registered  # Envoy's panic threshold decides
    assert chosen_endpoints(ServiceEndpoints("api", (), ())) is None
    seen = ServiceEndpoints("api", (Endpoint("10.0.0.11", 1),), (Endpoint("10.0.0.11", 1),))
    known = remembered({}, seen)
    assert known == {"api": seen}
    assert remembered(known, ServiceEndpoints("api", (), ())) is known  # Consul lists none: nothing changes
    assert remembered(known, seen) is known


def test_an_eds_file_gets_the_endpoints_sorted_and_equal_sets_make_equal_files(tmp_path: Path) -> None:
    files = web_files(tmp_path / "web")
    eds = next(file for file in files.files if file.path.endswith("/eds.upstream-api.yaml"))
    planned = file_endpoints(eds)
    assert with_endpoints(files.proxy, eds, planned) is eds  # the deploy's own file when nothing changed

    one = with_endpoints(files.proxy, eds, (Endpoint("10.0.0.12", 2), Endpoint("10.0.0.11", 1)))
    other = with_endpoints(files.proxy, eds, (Endpoint("10.0.0.11", 1), Endpoint("10.0.0.12", 2)))
    assert one == other and one.path == eds.path and one.kind == eds.kind
    body = yaml.safe_load(one.content)
    [assignment] = body["resources"]
    assert assignment["@type"] == ENDPOINT_TYPE
    assert assignment["cluster_name"] == yaml.safe_load(eds.content)["resources"][0]["cluster_name"]
    assert [item["endpoint"]["address"]["socket_address"] for item in assignment["endpoints"][0]["lb_endpoints"]] \
        == [{"address": "10.0.0.11", "port_value": 1}, {"address": "10.0.0.12", "port_value": 2}]
    assert body["version_info"] == resources_version(body["resources"])


def test_an_eds_file_from_consul_carries_who_answers_as_the_deploy_writes_it(tmp_path: Path) -> None:
    files = web_files(tmp_path / "web")
    eds = next(file for file in files.files if file.path.endswith("/eds.upstream-api.yaml"))
    planned = file_endpoints(eds)
    assert all(endpoint.service == "api" and endpoint.instance and endpoint.version and endpoint.host
               for endpoint in planned)  # the deploy's file has them
    # the same endpoints from Consul (Meta version and host, ID) give the deploy's own file back
    entries = [{"Node": {"Address": e.address}, "Checks": [],
                "Service": {"ID": e.instance, "Service": "api", "Address": e.address, "Port": e.port,
                            "Meta": {"managed-by": "mesh", "mesh-id": MESH_ID, "version": e.version,
                                     "host": e.host}}} for e in planned]
    seen = service_endpoints("api", entries, MESH_ID)
    assert with_endpoints(files.proxy, eds, seen.up) is eds
    # another version at the same address is another file, whose lb_endpoints say so
    moved = [{**entry, "Service": {**entry["Service"], "Meta": {**entry["Service"]["Meta"], "version": "v9"}}}
             for entry in entries]
    rewritten = with_endpoints(files.proxy, eds, service_endpoints("api", moved, MESH_ID).up)
    [assignment] = yaml.safe_load(rewritten.content)["resources"]
    assert {item["metadata"]["filter_metadata"]["mesh"]["version"]
            for item in assignment["endpoints"][0]["lb_endpoints"]} == {"v9"}
    # an instance Consul says nothing about gets no metadata (Envoy logs null)
    bare = with_endpoints(files.proxy, eds, (Endpoint("10.0.0.11", 1),))
    [assignment] = yaml.safe_load(bare.content)["resources"]
    assert "metadata" not in assignment["endpoints"][0]["lb_endpoints"][0]


def test_the_snapshot_rewrites_only_the_eds_files_the_spec_maps_to_a_service(tmp_path: Path) -> None:
    files = web_files(tmp_path / "web")
    proxy = proxy_spec(files)
    spec = controller_spec((host_spec("vm1", (proxy,)),))
    assert watched_services(spec) == ("api",)

    at_start = build_snapshot(spec, {})[("vm1", proxy.name)]
    assert at_start.files.files == files.files  # nothing known yet: the spec's own files

    known = {"api": ServiceEndpoints("api", (Endpoint("10.0.0.99", 7),), (Endpoint("10.0.0.99", 7),))}
    wanted = proxy_snapshot("vm1", proxy, known)
    changed = [file.path for file, before in zip(wanted.files.files, files.files, strict=True) if file != before]
    assert changed == list(proxy.endpoints)
    assert wanted.version != at_start.version
    assert set(wanted.digests) == {path for path in at_start.digests}
    assert "envoy.yaml" not in wanted.digests and wanted.bootstrap_sha256 == files.bootstrap.sha256
