"""The controller's traffic management with fake hosts and a scripted Consul: the spec a deploy hands it (policies,
route inputs, per-version endpoint files, zones); an override in Consul KV redone into the caller's route file and
pushed alone, byte for byte what a deploy with that override writes; an invalid one ignored (logged once); a reset
putting the inventory's policy back; a new spec's policy followed; version files holding only their version;
endpoints in priorities for the caller's zone; and `traffic` in the published state."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from mesh.config.compute import compute_proxy_config
from mesh.controller.consul_watch import Entries, PrefixWatch
from mesh.controller.daemon import Controller, ControllerOptions
from mesh.controller.endpoints import file_endpoints, service_endpoints
from mesh.controller.protocol import CertState
from mesh.controller.spec import ControllerSpec, EndpointSource, SpecError, parse_spec, traffic_prefix
from mesh.controller.spec_build import build_spec
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.policy import Abort, Fault, TrafficOverride
from mesh.inventory.services import override_to_json, policy_to_json
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.render import ProxyFiles, RenderedFile, render_proxy_files
from mesh.testing.fake_ctl import FakeCtlHost, FakeCtlTransport
from tests.unit.test_controller_loop import START, FakeLeader, FakeStore, write_intermediate

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: traffic.mesh
    mesh_consul_url: http://10.0.0.2:8500
    mesh_services:
      api:
        timeout: 2s
        routes:
          - match: {headers: {x-canary: "1"}}
            to: {v2: 100}
          - to: {v1: 100}
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.0.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_zone: a
          mesh_region: r1
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_zone: a
          mesh_region: r1
          mesh_workloads:
            - {service: api, version: v1, port: 9090}
            - {service: db, port: 5432, protocol: tcp}
        vm3:
          ansible_host: 10.0.0.13
          mesh_zone: b
          mesh_region: r1
          mesh_workloads:
            - {service: api, version: v2, port: 9090}
        vm4:
          ansible_host: 10.0.0.14
          mesh_zone: c
          mesh_region: r2
          mesh_workloads:
            - {service: api, version: v1, port: 9090}
"""
XDS = "/etc/mesh/proxies/web-8080/xds"
EDS_ALL, EDS_V1, EDS_V2 = "xds/eds.upstream-api.yaml", "xds/eds.upstream-api.v1.yaml", "xds/eds.upstream-api.v2.yaml"
SPLIT = TrafficOverride(split=(("v1", 50), ("v2", 50)), revision="r-1")


def mesh_of(folder: Path, inventory: str = INVENTORY) -> Mesh:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inventory.yml"
    path.write_text(inventory)
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def spec_of(mesh: Mesh) -> ControllerSpec:
    inputs = ControllerInputs(keys={"ctl1": "ssh-ed25519 AAAActl1key"}, ctl_script=b"#!/bin/sh\n")
    plan = build_plan(mesh, PlanInputs(b"root pem", "00:11", controller=inputs))
    return build_spec(plan, mesh, {}, plan.controller_digest)


def web_files(mesh: Mesh, overrides: dict[str, TrafficOverride] | None = None) -> ProxyFiles:
    """What a deploy renders for web on vm1 (with these overrides in Consul)."""
    return render_proxy_files(compute_proxy_config(mesh, mesh.host("vm1").workloads[0], overrides or {}))


def kv(*overrides: tuple[str, TrafficOverride | str]) -> dict[str, str]:
    """The traffic KV prefix's values: service -> override_to_json's text (or raw text)."""
    return {service: value if isinstance(value, str) else json.dumps(override_to_json(value, "test", "now"))
            for service, value in overrides}


def instance(address: str, version: str, zone: str | None, region: str | None, port: int = 21000,
             status: str = "passing") -> dict[str, Any]:
    """One entry of Consul's health answer for api, registered as mesh registers it."""
    meta = {"managed-by": "mesh", "mesh-id": "traffic.mesh", "version": version, "host": f"h-{address}"}
    meta |= {key: value for key, value in (("zone", zone), ("region", region)) if value is not None}
    return {"Node": {"Node": f"n-{address}", "Address": address}, "Checks": [{"Status": status}],
            "Service": {"ID": f"api-{address}", "Service": "api", "Address": address, "Port": port, "Meta": meta}}


@dataclass
class Loop:
    controller: Controller
    host: FakeCtlHost
    transport: FakeCtlTransport
    store: FakeStore
    time: list[float]
    specs: list[ControllerSpec]

    @property
    def files(self) -> dict[str, str]:
        return self.host.files["web-8080"]

    @property
    def rds(self) -> str:
        [relpath] = [relpath for relpath in self.files if relpath == "xds/rds.outbound-api.yaml"]
        return relpath

    def settle(self, seconds: float = 1.1) -> None:
        """Moves the clock on by `seconds` in two passes (the debounce, then the round)."""
        self.time[0] += 0.06
        self.controller.tick()
        self.time[0] += seconds
        self.controller.tick()

    def moved(self) -> list[list[str]]:
        return [sorted(moved.get("web-8080", [])) for moved in self.host.applied]

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.store.puts[self.controller.spec.state_key])
        return loaded


def make_loop(tmp_path: Path, mesh: Mesh) -> Loop:
    spec = spec_of(mesh)
    files = web_files(mesh)
    host = FakeCtlHost("vm1")
    host.add_proxy(files, CertState("01", START, START.replace(year=2027)))
    store = FakeStore()
    time = [0.0]
    specs = [spec]
    cert_path, key_path = write_intermediate(tmp_path / "ca")
    transport = FakeCtlTransport({"vm1": host})
    transport.down |= {item.name for item in spec.hosts if item.name != "vm1"}  # only web's host is reached here
    controller = Controller(
        lambda: specs[-1], ControllerOptions(intermediate_cert=cert_path, intermediate_key=key_path,
                                             holder="ctl-test", serve_metrics=False),
        transport=transport, validate=lambda _files: None,
        leader=lambda _spec, _holder: FakeLeader(), store=lambda _spec: store, clock=lambda: time[0],
        wall=lambda: 1_765_000_000 + time[0], now=lambda: START, watch=False)
    loop = Loop(controller, host, transport, store, time, specs)
    loop.settle()
    return loop


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return mesh_of(tmp_path / "inventory")


@pytest.fixture
def loop(tmp_path: Path, mesh: Mesh) -> Loop:
    return make_loop(tmp_path, mesh)


# --- the spec ---

def test_the_spec_carries_policies_route_inputs_version_files_and_zones(mesh: Mesh) -> None:
    spec = spec_of(mesh)
    assert spec.policies == {"api": policy_to_json(mesh.policy("api"))}
    [web] = spec.host("vm1").proxies
    assert (web.zone, web.region) == ("a", "r1")
    assert web.endpoints == {f"{XDS}/eds.upstream-api.yaml": EndpointSource("api"),
                             f"{XDS}/eds.upstream-api.v1.yaml": EndpointSource("api", "v1"),
                             f"{XDS}/eds.upstream-api.v2.yaml": EndpointSource("api", "v2"),
                             f"{XDS}/eds.upstream-db.yaml": EndpointSource("db")}
    [(path, inputs)] = web.routes.items()  # api's HTTP route; db is TCP: no route
    assert path.startswith(f"{XDS}/rds.") and path in {file.path for file in web.files}
    assert (inputs["service"], inputs["protocol"], inputs["versions"]) == ("api", "http", ["v1", "v2"])
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize(("change", "named"), [
    (lambda data: data["policies"].update(api={"timeout": "soon"}), "policies[api]"),
    (lambda data: data["hosts"][0]["proxies"][0]["endpoints"].update({"/x/eds.a.yaml": "api"}),
     "proxies[web-8080].endpoints[/x/eds.a.yaml]"),
    (lambda data: data["hosts"][0]["proxies"][0]["routes"].update({"/x/rds.a.yaml": {"service": "api"}}),
     "proxies[web-8080].routes[/x/rds.a.yaml]"),
    (lambda data: data["hosts"][0]["proxies"][0].pop("zone"), "'zone'"),
])
def test_a_spec_with_a_malformed_traffic_key_is_refused_naming_it(mesh: Mesh, change: Any, named: str) -> None:
    data = json.loads(spec_of(mesh).to_json())
    data["hosts"] = sorted(data["hosts"], key=lambda host: host["name"] != "vm1")  # vm1 first: the one changed
    change(data)
    with pytest.raises(SpecError, match=r"spec\.json: .*" + named.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(json.dumps(data), "spec.json")


# --- routes ---

def test_an_override_redoes_the_callers_route_file_as_a_deploy_with_it_would(loop: Loop, mesh: Mesh) -> None:
    planned = loop.files[loop.rds]
    loop.controller.on_traffic(kv(("api", SPLIT)))
    loop.settle()
    assert loop.moved()[-1] == [loop.rds]  # the route file alone: no listener, cluster or restart
    deployed = web_files(mesh, {"api": SPLIT}).file(f"{XDS}/{loop.rds[4:]}")
    assert loop.files[loop.rds] == deployed.content != planned
    [route] = yaml.safe_load(loop.files[loop.rds])["resources"]
    canary, rest = route["virtual_hosts"][0]["routes"]
    assert canary["route"]["cluster"] == "upstream-api.v2"  # the inventory's header route stays
    assert rest["route"]["weighted_clusters"]["clusters"] == [{"name": "upstream-api.v1", "weight": 50},
                                                               {"name": "upstream-api.v2", "weight": 50}]
    assert rest["route"]["timeout"] == "2s"


def test_a_fault_override_goes_into_every_route_of_the_service(loop: Loop) -> None:
    fault = TrafficOverride(fault=Fault(abort=Abort(503, 50.0), when_headers=(("x-test", "1"),)), revision="f-1")
    loop.controller.on_traffic(kv(("api", fault)))
    loop.settle()
    [route] = yaml.safe_load(loop.files[loop.rds])["resources"]
    for entry in route["virtual_hosts"][0]["routes"]:
        injected = entry["typed_per_filter_config"]["envoy.filters.http.fault"]
        assert injected["abort"] == {"http_status": 503, "percentage": {"numerator": 50, "denominator": "HUNDRED"}}
        assert injected["headers"] == [{"name": "x-test", "string_match": {"exact": "1"}}]


@pytest.mark.parametrize("value", ["{not json", json.dumps({"split": {"v1": 50, "v9": 50}, "fault": None,
                                                             "revision": "bad", "set_by": "", "at": ""})])
def test_an_invalid_override_is_ignored_and_logged_once(loop: Loop, value: str) -> None:
    planned = loop.files[loop.rds]
    with capture_logs() as logs:
        loop.controller.on_traffic(kv(("api", value)))
        loop.settle()
        loop.settle(5.0)
    assert loop.files[loop.rds] == planned and loop.moved() == []
    ignored = [entry for entry in logs if entry["event"] == "traffic_override_ignored"]
    assert len(ignored) == 1 and ignored[0]["service"] == "api"
    assert loop.state()["traffic"] == {"api": ""}  # the inventory's policy runs everywhere


def test_a_reset_puts_the_inventory_policy_back(loop: Loop) -> None:
    planned = loop.files[loop.rds]
    loop.controller.on_traffic(kv(("api", SPLIT)))
    loop.settle()
    assert loop.files[loop.rds] != planned
    loop.controller.on_traffic({})  # `mesh route reset api` deleted the key
    loop.settle()
    assert loop.files[loop.rds] == planned and loop.moved()[-1] == [loop.rds]


def test_a_new_spec_with_another_inventory_policy_is_followed(tmp_path: Path, loop: Loop) -> None:
    loop.controller.on_traffic({})
    loop.settle()
    changed = mesh_of(tmp_path / "changed", INVENTORY.replace("to: {v1: 100}", "to: {v1: 80, v2: 20}"))
    loop.specs.append(spec_of(changed))
    loop.controller.request_reload()
    loop.settle()
    assert loop.files[loop.rds] == web_files(changed).file(f"{XDS}/{loop.rds[4:]}").content
    assert loop.moved()[-1] == [loop.rds]


def test_the_route_files_are_the_hosts_until_the_overrides_are_read(loop: Loop) -> None:
    newer = loop.files[loop.rds].replace("upstream-api.v1", "upstream-api.v2")  # an earlier controller's push
    loop.files[loop.rds] = newer
    loop.controller.pusher.forget()
    loop.settle(5.0)
    assert loop.files[loop.rds] == newer and "api" not in loop.state()["traffic"]
    loop.controller.on_traffic({})
    loop.settle()
    assert loop.files[loop.rds] != newer


# --- state.traffic ---

def test_the_state_says_which_revision_every_caller_runs(loop: Loop, mesh: Mesh) -> None:
    assert loop.state()["traffic"] == {}  # the overrides not read yet
    loop.controller.on_traffic({})
    loop.settle()
    assert loop.state()["traffic"] == {"api": ""}
    loop.host.refuse.add("web-8080")  # the host's Envoy refuses the push: not applied
    loop.controller.on_traffic(kv(("api", SPLIT)))
    loop.settle()
    assert "api" not in loop.state()["traffic"]
    loop.host.refuse.clear()
    loop.controller.on_traffic(kv(("api", replace(SPLIT, split=(("v1", 40), ("v2", 60)), revision="r-2"))))
    loop.settle()
    assert loop.state()["traffic"] == {"api": "r-2"}


def test_a_caller_on_an_unreached_host_holds_the_revision_back(tmp_path: Path, loop: Loop) -> None:
    loop.controller.on_traffic({})
    loop.settle()
    assert loop.state()["traffic"] == {"api": ""}
    second = replace(loop.specs[-1].host("vm1"), name="vm9")  # another caller of api, on a host that is down
    spec = replace(loop.specs[-1], hosts=(*loop.specs[-1].hosts, second))
    loop.transport.down.add("vm9")
    loop.specs.append(spec)
    loop.controller.request_reload()
    loop.controller.on_traffic(kv(("api", SPLIT)))
    loop.settle()
    assert loop.moved()[-1] == [loop.rds] and "api" not in loop.state()["traffic"]


# --- endpoints ---

def test_version_files_get_only_their_versions_instances(loop: Loop) -> None:
    answer = [instance("10.0.0.12", "v1", "a", "r1"), instance("10.0.0.13", "v2", "b", "r1"),
              instance("10.0.0.15", "v2", "a", "r1")]
    loop.controller.on_answer(service_endpoints("api", answer, "traffic.mesh"))
    loop.settle()

    def addresses(relpath: str) -> set[str]:
        return {e.address for e in file_endpoints(RenderedFile(relpath, loop.files[relpath], "resource"))}

    assert addresses(EDS_ALL) == {"10.0.0.12", "10.0.0.13", "10.0.0.15"}
    assert addresses(EDS_V1) == {"10.0.0.12"}
    assert addresses(EDS_V2) == {"10.0.0.13", "10.0.0.15"}
    # every v2 instance critical: the v2 file gets them all back (Envoy's panic threshold), v1 unchanged
    down = [answer[0], instance("10.0.0.13", "v2", "b", "r1", status="critical"),
            instance("10.0.0.15", "v2", "a", "r1", status="critical")]
    loop.controller.on_answer(service_endpoints("api", down, "traffic.mesh"))
    loop.settle()
    assert addresses(EDS_V2) == {"10.0.0.13", "10.0.0.15"} and addresses(EDS_ALL) == {"10.0.0.12"}


def test_endpoints_come_in_priorities_for_the_callers_zone(loop: Loop) -> None:
    answer = [instance("10.0.0.12", "v1", "a", "r1"), instance("10.0.0.13", "v2", "b", "r1"),
              instance("10.0.0.14", "v1", "c", "r2"), instance("10.0.0.16", "v1", None, None)]
    loop.controller.on_answer(service_endpoints("api", answer, "traffic.mesh"))
    loop.settle()
    [assignment] = yaml.safe_load(loop.files[EDS_ALL])["resources"]
    assert assignment["policy"] == {"overprovisioning_factor": 140}
    found = [(group.get("priority", 0), group.get("locality"),
              [item["endpoint"]["address"]["socket_address"]["address"] for item in group["lb_endpoints"]])
             for group in assignment["endpoints"]]
    assert found == [(0, {"region": "r1", "zone": "a"}, ["10.0.0.12"]),  # its zone
                     (1, {"region": "r1", "zone": "b"}, ["10.0.0.13"]),  # its region
                     (2, None, ["10.0.0.16"]),  # elsewhere (unknown) and in another region
                     (2, {"region": "r2", "zone": "c"}, ["10.0.0.14"])]
    # v1 has nothing in zone b: its priorities have no gap
    [v1] = yaml.safe_load(loop.files[EDS_V1])["resources"]
    assert [(group.get("priority", 0), group.get("locality", {}).get("zone")) for group in v1["endpoints"]] == \
        [(0, "a"), (1, None), (1, "c")]


def test_consul_listing_what_the_deploy_planned_rewrites_nothing(loop: Loop, mesh: Mesh) -> None:
    planned = web_files(mesh)
    endpoints = file_endpoints(planned.file(f"{XDS}/eds.upstream-api.yaml"))
    assert {(e.zone, e.region) for e in endpoints} == {("a", "r1"), ("b", "r1"), ("c", "r2")}
    answer = [{"Node": {"Address": e.address}, "Checks": [],
               "Service": {"ID": e.instance, "Service": "api", "Address": e.address, "Port": e.port,
                           "Meta": {"managed-by": "mesh", "mesh-id": "traffic.mesh", "version": e.version,
                                    "host": e.host, "zone": e.zone, "region": e.region}}} for e in endpoints]
    loop.controller.on_answer(service_endpoints("api", answer, "traffic.mesh"))
    loop.controller.on_traffic({})
    loop.settle()
    loop.settle(3.0)
    assert loop.moved() == []
    assert all(loop.files[relpath] == planned.file(f"{XDS}/{relpath[4:]}").content
               for relpath in (EDS_ALL, EDS_V1, EDS_V2, loop.rds))



# --- the KV watch ---

def test_the_traffic_prefix_is_watched_with_blocking_queries(mesh: Mesh) -> None:
    prefix = traffic_prefix("traffic.mesh")
    value = kv(("api", SPLIT))["api"]
    script: list[Any] = [(0, []), (7, [{"Key": prefix + "api", "Value": value.encode()},
                                       {"Key": prefix + "api/old", "Value": b"x"}, {"Key": prefix, "Value": None}]),
                         (7, [{"Key": prefix + "api", "Value": value.encode()}]), OSError("connection refused"),
                         (9, [])]
    asked: list[tuple[str, int]] = []
    delivered: list[Mapping[str, str]] = []

    def fetch(what: str, index: int, wait: float) -> tuple[int, Entries]:
        asked.append((what, index))
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = PrefixWatch(prefix, fetch, delivered.append, sleep=lambda _s: None)
    for _ in range(5):
        watch.step()
    assert asked == [(prefix, 0), (prefix, 1), (prefix, 7), (prefix, 7), (prefix, 7)]
    # no key yet (the overrides are read: none), one override, the same again (not delivered), the key deleted
    assert delivered == [{}, {"api": value}, {}]
