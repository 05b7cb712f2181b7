"""The controller's authorization part with fake hosts and a scripted Consul: the spec a deploy hands it (each
proxy's inbound inputs, the policies of the services it serves); a run-time deny in Consul KV (`mesh authz deny`)
redone into the inbound files of every instance of the service and pushed alone, byte for byte what a deploy with
that deny writes; an invalid one ignored (logged once); `--undo` putting the inventory's rules back; a new spec
followed; the files left as the hosts have them until the KV was read; and `authz` in the published state, held
back while an instance's files are not there and never naming a revision that was replaced."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mesh.controller.consul_watch import Entries
from mesh.controller.daemon import Controller, ControllerOptions
from mesh.controller.protocol import CertState, relpath_in
from mesh.controller.spec import ControllerSpec, SpecError, authz_prefix, parse_spec
from mesh.controller.spec_build import build_spec
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.policy import AuthzOverride
from mesh.inventory.services import authz_override_to_json, policy_to_json
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.plan.model import Plan
from mesh.testing.fake_ctl import FakeCtlHost, FakeCtlTransport
from tests.unit.test_controller_loop import START, FakeLeader, FakeStore, write_intermediate

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: authz.mesh
    mesh_consul_url: http://10.0.0.2:8500
    mesh_services:
      api:
        authz:
          deny:
            - {from: [web], paths: [/admin/*]}
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.0.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_workloads:
            - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19102}]}
            - {service: db, port: 5432, protocol: tcp}
        vm3:
          ansible_host: 10.0.0.13
          mesh_workloads:
            - {service: api, version: v2, port: 9090}
"""
API, DB = "api-9090", "db-5432"
DENY_WEB = AuthzOverride(deny_from=("web",), revision="a-1")


def mesh_of(folder: Path, inventory: str = INVENTORY) -> Mesh:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inventory.yml"
    path.write_text(inventory)
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def plan_of(mesh: Mesh, denies: Mapping[str, AuthzOverride] | None = None) -> Plan:
    """The plan a deploy makes (with these run-time denies read from Consul)."""
    inputs = ControllerInputs(keys={"ctl1": "ssh-ed25519 AAAActl1key"}, ctl_script=b"#!/bin/sh\n")
    return build_plan(mesh, PlanInputs(b"root pem", "00:11", controller=inputs, authz_overrides=denies or {}))


def spec_of(mesh: Mesh) -> ControllerSpec:
    plan = plan_of(mesh)
    return build_spec(plan, mesh, {}, plan.controller_digest)


def deployed(mesh: Mesh, host: str, proxy: str, denies: Mapping[str, AuthzOverride] | None = None
             ) -> dict[str, str]:
    """relpath -> content of every xds file a deploy writes for `proxy` on `host`."""
    [planned] = [item for item in plan_of(mesh, denies).host(host).proxies if item.name == proxy]
    return {relpath_in(planned.rendered.proxy_dir, item.path): item.content for item in planned.rendered.files}


def value(override: AuthzOverride) -> str:
    return json.dumps(authz_override_to_json(override, "alice@laptop", "2026-12-06T20:00:00Z"))


def inbound_of(spec: ControllerSpec, host: str, proxy: str) -> dict[str, str]:
    """relpath -> kind of the proxy's inbound files the controller redoes."""
    [found] = [item for item in spec.host(host).proxies if item.name == proxy]
    return {relpath_in(found.proxy_dir, path): str(entry["kind"]) for path, entry in found.inbound.items()}


@dataclass
class Loop:
    controller: Controller
    hosts: dict[str, FakeCtlHost]
    transport: FakeCtlTransport
    store: FakeStore
    time: list[float]
    specs: list[ControllerSpec]

    def files(self, host: str, proxy: str) -> dict[str, str]:
        return self.hosts[host].files[proxy]

    def inbound(self, host: str, proxy: str) -> list[str]:
        return sorted(inbound_of(self.specs[-1], host, proxy))

    def settle(self, seconds: float = 1.1) -> None:
        """Moves the clock on by `seconds` in two passes (the debounce, then the round)."""
        self.time[0] += 0.06
        self.controller.tick()
        self.time[0] += seconds
        self.controller.tick()

    def moved(self, host: str) -> list[dict[str, list[str]]]:
        return [{proxy: sorted(paths) for proxy, paths in moved.items()} for moved in self.hosts[host].applied]

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.store.puts[self.controller.spec.state_key])
        return loaded


def make_loop(tmp_path: Path, mesh: Mesh) -> Loop:
    spec = spec_of(mesh)
    plan = plan_of(mesh)
    hosts: dict[str, FakeCtlHost] = {}
    for name in ("vm2", "vm3"):  # api's and db's hosts; web's and the controller's are not reached here
        hosts[name] = FakeCtlHost(name)
        for proxy in plan.host(name).proxies:
            hosts[name].add_proxy(proxy.rendered, CertState("01", START, START.replace(year=2027)))
    store = FakeStore()
    clock = [0.0]
    specs = [spec]
    cert_path, key_path = write_intermediate(tmp_path / "ca")
    transport = FakeCtlTransport(hosts)
    transport.down |= {item.name for item in spec.hosts if item.name not in hosts}
    controller = Controller(
        lambda: specs[-1], ControllerOptions(intermediate_cert=cert_path, intermediate_key=key_path,
                                             holder="ctl-test", serve_metrics=False),
        transport=transport, validate=lambda _files: None,
        leader=lambda _spec, _holder: FakeLeader(), store=lambda _spec: store, clock=lambda: clock[0],
        wall=lambda: 1_765_000_000 + clock[0], now=lambda: START, watch=False)
    loop = Loop(controller, hosts, transport, store, clock, specs)
    loop.controller.on_traffic({})  # the traffic KV read (nothing there): only authorization is at stake here
    loop.settle()
    return loop


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return mesh_of(tmp_path / "inventory")


@pytest.fixture
def loop(tmp_path: Path, mesh: Mesh) -> Loop:
    return make_loop(tmp_path, mesh)


# --- the spec ---

def test_the_spec_carries_each_proxys_inbound_inputs_and_the_policies_of_the_services_it_serves(mesh: Mesh) -> None:
    spec = spec_of(mesh)
    assert spec.policies["api"] == policy_to_json(mesh.policy("api"))  # served by vm2 and vm3: its authz rules
    assert sorted(inbound_of(spec, "vm2", API).values()) == ["route"]  # HTTP: the inbound route file
    assert sorted(inbound_of(spec, "vm2", DB).values()) == ["tcp-allow", "tcp-deny"]  # TCP: the RBAC filter files
    [api] = [proxy for proxy in spec.host("vm2").proxies if proxy.name == API]
    [entry] = api.inbound.values()
    inputs = entry["inputs"]
    assert (inputs["service"], inputs["version"], inputs["protocol"], inputs["trust_domain"],
            inputs["authz_default"], list(inputs["callers"])) == ("api", "v1", "http", "authz.mesh", "declared",
                                                                  ["web"])
    assert all(path in {file.path for file in api.files} for path in api.inbound)  # files the plan rendered
    [web] = spec.host("vm1").proxies
    [web_entry] = web.inbound.values()
    assert list(web_entry["inputs"]["callers"]) == []  # nobody declares web as an upstream
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize(("change", "named"), [
    (lambda entry: entry.update(kind="listener"), "kind"),
    (lambda entry: entry["inputs"].pop("callers"), "not inbound inputs"),
    (lambda entry: entry.pop("inputs"), "kind"),
])
def test_a_spec_with_a_malformed_inbound_entry_is_refused_naming_it(mesh: Mesh, change: Any, named: str) -> None:
    data = json.loads(spec_of(mesh).to_json())
    [vm2] = [host for host in data["hosts"] if host["name"] == "vm2"]
    [api] = [proxy for proxy in vm2["proxies"] if proxy["name"] == API]
    [(path, entry)] = api["inbound"].items()
    change(entry)
    with pytest.raises(SpecError, match=rf"spec\.json: proxies\[{API}\]\.inbound\[{path}\]: .*{named}"):
        parse_spec(json.dumps(data), "spec.json")


def test_an_older_spec_is_refused_with_the_way_out(mesh: Mesh) -> None:
    data = json.loads(spec_of(mesh).to_json())
    data["version"] = 3
    with pytest.raises(SpecError, match="version: expected 4, got 3") as refused:
        parse_spec(json.dumps(data), "spec.json")
    assert refused.value.hint == "deploy again with this mesh version"


# --- the inbound files ---

def test_a_deny_redoes_every_instances_inbound_route_as_a_deploy_with_it_would(loop: Loop, mesh: Mesh) -> None:
    [route] = loop.inbound("vm2", API)
    planned = loop.files("vm2", API)[route]
    loop.controller.on_authz({"api": value(DENY_WEB)})
    loop.settle()
    for host in ("vm2", "vm3"):  # each api instance's route file alone: no listener, no db file, no restart
        assert loop.moved(host)[-1] == {API: [route]}
        assert loop.files(host, API)[route] == deployed(mesh, host, API, {"api": DENY_WEB})[route] != planned
    assert "runtime-deny" in loop.files("vm2", API)[route]
    assert loop.files("vm2", DB) == deployed(mesh, "vm2", DB)


def test_a_deny_of_a_tcp_service_rewrites_its_deny_filter_file_alone(loop: Loop, mesh: Mesh) -> None:
    deny = AuthzOverride(deny_from=("api",), revision="d-1")
    loop.controller.on_authz({"db": value(deny)})
    loop.settle()
    [relpath] = [path for path, kind in inbound_of(loop.specs[-1], "vm2", DB).items() if kind == "tcp-deny"]
    assert loop.moved("vm2")[-1] == {DB: [relpath]}
    assert loop.files("vm2", DB) == deployed(mesh, "vm2", DB, {"db": deny})
    assert "runtime-deny" in loop.files("vm2", DB)[relpath]
    assert loop.state()["authz"]["db"] == "d-1"


@pytest.mark.parametrize("text", [
    "{not json",
    value(AuthzOverride(deny_from=("nosuch",), revision="bad-1")),  # not a service of the mesh
    value(AuthzOverride(deny_from=("spiffe://other.mesh/svc/web",), revision="bad-2")),  # another trust domain
])
def test_an_invalid_deny_is_ignored_and_logged_once(loop: Loop, mesh: Mesh, text: str) -> None:
    with capture_logs() as logs:
        loop.controller.on_authz({"api": text})
        loop.settle()
        loop.settle(5.0)
    assert loop.moved("vm2") == [] and loop.moved("vm3") == []
    assert loop.files("vm2", API) == deployed(mesh, "vm2", API)
    ignored = [entry for entry in logs if entry["event"] == "authz_deny_ignored"]
    assert len(ignored) == 1 and ignored[0]["service"] == "api"
    assert loop.state()["authz"]["api"] == ""  # the inventory's rules run everywhere


def test_undo_puts_the_inventory_rules_back(loop: Loop, mesh: Mesh) -> None:
    [route] = loop.inbound("vm2", API)
    loop.controller.on_authz({"api": value(DENY_WEB)})
    loop.settle()
    loop.controller.on_authz({})  # `mesh authz deny api --from web --undo` deleted the key
    loop.settle()
    assert loop.files("vm2", API) == deployed(mesh, "vm2", API) and loop.moved("vm2")[-1] == {API: [route]}
    assert loop.state()["authz"]["api"] == ""


def test_a_new_spec_is_followed_with_the_deny_kept(tmp_path: Path, loop: Loop) -> None:
    loop.controller.on_authz({"api": value(DENY_WEB)})
    loop.settle()
    changed = mesh_of(tmp_path / "changed", INVENTORY.replace("paths: [/admin/*]", "paths: [/internal/*]"))
    loop.specs.append(spec_of(changed))
    loop.controller.request_reload()
    loop.settle()
    [route] = loop.inbound("vm2", API)
    assert loop.files("vm2", API)[route] == deployed(changed, "vm2", API, {"api": DENY_WEB})[route]
    assert "/internal/" in loop.files("vm2", API)[route] and loop.moved("vm2")[-1] == {API: [route]}


def test_the_inbound_files_are_the_hosts_until_the_denies_are_read(loop: Loop) -> None:
    [route] = loop.inbound("vm2", API)
    newer = loop.files("vm2", API)[route] + "# an earlier controller's push\n"
    loop.files("vm2", API)[route] = newer
    loop.controller.pusher.forget()
    loop.settle(5.0)
    assert loop.files("vm2", API)[route] == newer and loop.state()["authz"] == {}
    loop.controller.on_authz({})
    loop.settle()
    assert loop.files("vm2", API)[route] != newer and loop.state()["authz"] == {"api": "", "db": ""}


# --- state.authz ---

def test_the_state_names_a_revision_once_every_instance_runs_it_and_never_a_replaced_one(loop: Loop) -> None:
    assert loop.state()["authz"] == {}  # the denies not read yet
    loop.controller.on_authz({})
    loop.settle()
    assert loop.state()["authz"] == {"api": "", "db": ""}  # web's host is not reached: web is left out
    loop.hosts["vm3"].refuse.add(API)  # vm3's Envoy refuses the push: not applied there
    loop.controller.on_authz({"api": value(DENY_WEB)})
    loop.settle()
    assert "api" not in loop.state()["authz"]
    second = replace(DENY_WEB, deny_from=("db", "web"), revision="a-2")
    loop.controller.on_authz({"api": value(second)})
    loop.settle()
    assert "api" not in loop.state()["authz"]  # a-1 never ran everywhere, a-2 not yet
    loop.hosts["vm3"].refuse.clear()  # a refused push is retried with the next change
    loop.controller.on_authz({"api": value(AuthzOverride(deny_from=("db",), revision="a-3"))})
    loop.settle()
    assert loop.state()["authz"]["api"] == "a-3"


def test_an_instance_on_an_unreached_host_holds_the_revision_back(loop: Loop) -> None:
    loop.controller.on_authz({})
    loop.settle()
    loop.transport.down.add("vm3")
    loop.controller.on_authz({"api": value(DENY_WEB)})
    loop.settle()
    assert loop.moved("vm2")[-1] == {API: loop.inbound("vm2", API)} and "api" not in loop.state()["authz"]
    loop.transport.down.discard("vm3")
    loop.settle(5.0)
    assert loop.state()["authz"]["api"] == "a-1"


# --- the KV watch ---

def test_the_controller_watches_the_prefix_mesh_authz_deny_writes_under() -> None:
    from mesh.authz.kv import authz_key

    assert authz_key("authz.mesh", "api") == authz_prefix("authz.mesh") + "api" == "mesh/authz.mesh/authz/api"


def test_the_controller_watches_the_authz_prefix_with_blocking_queries(loop: Loop) -> None:
    prefix = authz_prefix("authz.mesh")
    watch = loop.controller.authz_watch
    assert watch.what == prefix
    script: list[tuple[int, Entries]] = [(3, []), (8, [{"Key": prefix + "api", "Value": value(DENY_WEB).encode()}])]
    asked: list[tuple[str, int]] = []

    def fetch(what: str, index: int, wait: float) -> tuple[int, Entries]:
        asked.append((what, index))
        return script.pop(0)

    watch.fetch, watch.sleep = fetch, lambda _s: None
    watch.step()
    watch.step()
    assert asked == [(prefix, 0), (prefix, 3)]
    assert loop.controller.authz_values == {"api": value(DENY_WEB)}
    loop.settle()
    assert loop.state()["authz"]["api"] == "a-1"

