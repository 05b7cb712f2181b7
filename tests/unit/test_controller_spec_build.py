"""build_spec and the plan's spec.json: what a deploy hands to every controller, from its plan. Pure: a plan of a
small fleet (web on a VM calling api on a VM and in a container, two controllers, a Consul host mesh leaves
alone), read back as a controller reads it (mesh.controller.spec.parse_spec)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.controller.spec import (
    SPEC_PATH,
    SPEC_VERSION,
    TOKEN_FILE,
    ControllerSpec,
    EndpointSource,
    parse_spec,
)
from mesh.controller.spec_build import build_spec
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.plan.model import Plan

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: spec.mesh
    mesh_consul_url: http://10.0.0.2:8500
    mesh_cert_ttl: 2h
  children:
    consul:
      hosts:
        consul1: {ansible_host: 10.0.0.2}
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.0.0.3}
        ctl2: {ansible_host: 10.0.0.4, ansible_port: 2222}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_workloads:
            - {service: api, port: 9090}
    containers:
      vars: {mesh_host_kind: container_host}
      hosts:
        dock1:
          ansible_host: 10.0.0.20
          mesh_workloads:
            - {service: api, port: 9090, container: api-v2-1}
"""
KNOWN = {"vm1": ("10.0.0.11 ssh-ed25519 AAAAvm1",), "ctl2": ("[10.0.0.4]:2222 ssh-ed25519 AAAActl2",)}
KEYS = {"ctl1": "ssh-ed25519 AAAActl1key", "ctl2": "ssh-ed25519 AAAActl2key"}


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def plan_of(mesh: Mesh, **controller: object) -> Plan:
    inputs = replace(ControllerInputs(keys=KEYS, known_hosts=KNOWN, issuer_cert=b"controller intermediate",
                                      issuer_key=b"controller key", ctl_script=b"#!/bin/sh\n"), **controller)
    return build_plan(mesh, PlanInputs(b"root pem", "00:11", envoy_sha256="e" * 64, sidecar_image="mesh-envoy:abc",
                                       consul_token=b"token\n", controller=inputs))


def spec_on(plan: Plan, host: str) -> ControllerSpec:
    return parse_spec(plan.host(host).file(SPEC_PATH).content.decode())


def test_every_managed_host_is_in_the_spec_as_the_deploy_reaches_it(mesh: Mesh) -> None:
    spec = build_spec(plan_of(mesh), mesh, KNOWN, "d" * 64)
    assert [host.name for host in spec.hosts] == ["ctl1", "ctl2", "vm1", "vm2", "dock1"]  # no consul1
    assert (spec.host("ctl2").address, spec.host("ctl2").port) == ("10.0.0.4", 2222)
    assert spec.host("vm1").known_hosts == KNOWN["vm1"] and spec.host("vm2").known_hosts == ()
    assert all(host.user == "mesh-ctl" for host in spec.hosts)
    assert (spec.mesh_id, spec.trust_domain, spec.plan_digest, spec.cert_ttl_s) == ("spec.mesh", "spec.mesh",
                                                                                   "d" * 64, 7200)
    assert spec.consul_url == "http://10.0.0.2:8500" and spec.consul_token_file is None
    assert spec.renew_fraction == 0.5  # mesh_cert_renew_fraction's default


def test_the_renew_fraction_is_the_inventory_s(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.replace("    mesh_cert_ttl: 2h", "    mesh_cert_ttl: 2h\n    mesh_cert_renew_fraction: 0.3"))
    fleet = check_inventory(load_inventory(str(path)), str(path)).mesh
    assert build_spec(plan_of(fleet), fleet, KNOWN, "d" * 64).renew_fraction == 0.3


def test_a_proxy_carries_its_rendered_files_and_which_endpoint_file_each_upstream_fills(mesh: Mesh) -> None:
    plan = plan_of(mesh)
    web = build_spec(plan, mesh, KNOWN, "d" * 64).host("vm1").proxies[0]
    rendered = plan.host("vm1").proxy("web-8080").rendered
    assert (web.name, web.service, web.proxy_dir) == ("web-8080", "web", "/etc/mesh/proxies/web-8080")
    assert [(item.path, item.kind, item.content) for item in web.files] == \
        [(item.path, item.kind, item.content) for item in rendered.files]
    assert web.files[-1].kind == "bootstrap" and web.bootstrap_sha256 == rendered.bootstrap_sha256
    # Consul fills the upstream's endpoints; the local app's are the plan's alone
    assert web.endpoints == {"/etc/mesh/proxies/web-8080/xds/eds.upstream-api.yaml": EndpointSource("api")}
    assert "/etc/mesh/proxies/web-8080/xds/eds.local-app.yaml" in {item.path for item in web.files}
    # its outbound route is redone from these inputs when api's policy or override changes
    [(path, inputs)] = web.routes.items()
    assert path in {item.path for item in web.files} and path.startswith("/etc/mesh/proxies/web-8080/xds/rds.")
    assert (inputs["service"], inputs["protocol"], inputs["versions"]) == ("api", "http", ["v1"])


def test_identities_are_each_proxy_and_the_checker_of_each_controller(mesh: Mesh) -> None:
    spec = build_spec(plan_of(mesh), mesh, KNOWN, "d" * 64)
    assert [(i.name, i.kind, i.spiffe_id) for i in spec.host("vm1").identities] == \
        [("web-8080", "vm", "spiffe://spec.mesh/svc/web")]
    assert [(i.name, i.kind) for i in spec.host("dock1").identities] == [("api-api-v2-1", "container")]
    assert [(i.name, i.kind, i.spiffe_id) for i in spec.host("ctl1").identities] == \
        [("checker", "checker", "spiffe://spec.mesh/mesh/health")]


def test_every_controller_gets_the_same_spec_json_holding_the_digest_of_the_rest_of_the_plan(mesh: Mesh) -> None:
    plan = plan_of(mesh)
    text = plan.host("ctl1").file(SPEC_PATH)
    assert text.content == plan.host("ctl2").file(SPEC_PATH).content
    assert (text.mode, text.owner, text.group) == (0o640, "root", "mesh-controller")
    spec = spec_on(plan, "ctl1")
    assert spec.plan_digest == plan.controller_digest and len(spec.plan_digest) == 64
    # the digest is the plan's without spec.json: the same plan without controllers' inputs digests alike
    without = replace(plan, hosts=tuple(replace(h, files=tuple(f for f in h.files if f.path != SPEC_PATH))
                                        for h in plan.hosts))
    assert without.stable_digest == plan.controller_digest
    assert spec == build_spec(plan, mesh, KNOWN, plan.controller_digest)  # parse(to_json) is the spec itself
    assert SPEC_PATH not in {f.path for f in plan.host("vm1").files}  # only controllers hold it


def test_the_spec_changes_with_the_plan_and_only_with_it(mesh: Mesh) -> None:
    first, again = plan_of(mesh), plan_of(mesh)
    assert first.host("ctl1").file(SPEC_PATH).content == again.host("ctl1").file(SPEC_PATH).content
    other_keys = plan_of(mesh, keys={"ctl1": KEYS["ctl1"]})  # ctl2 left out of every authorized_keys
    assert spec_on(other_keys, "ctl1").plan_digest != spec_on(first, "ctl1").plan_digest
    assert json.loads(first.host("ctl1").file(SPEC_PATH).content)["version"] == SPEC_VERSION == 4


def test_a_token_file_in_the_inventory_points_the_controller_at_its_copy(mesh: Mesh) -> None:
    settings = replace(mesh.settings, consul_token_file="/somewhere/token")
    spec = build_spec(plan_of(mesh), replace(mesh, settings=settings), KNOWN, "d" * 64)
    assert spec.consul_token_file == TOKEN_FILE


def test_mesh_controller_run_i_builds_the_spec_a_deploy_would_hand_out_without_reaching_a_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.deploy.controller_inputs import record_keys
    from mesh.deploy.prepare import inventory_spec
    from mesh.errors import MeshError
    from mesh.pki import CertificateAuthority

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "inventory.yml"
    monkeypatch.setattr("mesh.deploy.controller_inputs.controller_active", lambda mesh, warn: False)  # no Consul
    path.write_text(INVENTORY.replace("    mesh_cert_ttl: 2h", "    mesh_cert_ttl: 2h\n    mesh_state_dir: state"))
    with pytest.raises(MeshError, match="no mesh CA"):
        inventory_spec(str(path))
    CertificateAuthority.ensure(str(tmp_path / "state"), "spec.mesh")
    record_keys(str(tmp_path / "state"), KEYS)
    spec = inventory_spec(str(path))
    assert [host.name for host in spec.hosts] == ["ctl1", "ctl2", "vm1", "vm2", "dock1"]
    assert spec.host("vm1").proxies[0].endpoints == {
        "/etc/mesh/proxies/web-8080/xds/eds.upstream-api.yaml": EndpointSource("api")}
    assert inventory_spec(str(path)).plan_digest == spec.plan_digest  # the same inventory, the same spec
    (tmp_path / "none.yml").write_text("all:\n  hosts:\n    h1: {ansible_host: 10.0.0.9}\n")
    with pytest.raises(MeshError, match="no host in mesh_controllers"):
        inventory_spec(str(tmp_path / "none.yml"))


def test_whether_a_controller_answered_does_not_change_the_spec(mesh: Mesh) -> None:
    live, not_live = plan_of(mesh, endpoints_live=True), plan_of(mesh)
    assert live.digest != not_live.digest  # the deploy's own plan says which files it leaves to the controller
    assert live.host("ctl1").file(SPEC_PATH).content == not_live.host("ctl1").file(SPEC_PATH).content


def test_a_host_being_cleaned_after_it_left_does_not_change_the_spec(mesh: Mesh) -> None:
    from mesh.inventory.model import Connection, ManagedHost

    retired = ManagedHost("vm9", "vm", Connection("10.0.0.19"))  # left the inventory: planned with nothing
    inputs = ControllerInputs(keys=KEYS, known_hosts=KNOWN, ctl_script=b"#!/bin/sh\n")
    with_retired = build_plan(mesh, PlanInputs(b"root pem", "00:11", controller=inputs), [*mesh.hosts, retired])
    without = build_plan(mesh, PlanInputs(b"root pem", "00:11", controller=inputs))
    assert with_retired.digest != without.digest
    assert with_retired.host("ctl1").file(SPEC_PATH).content == without.host("ctl1").file(SPEC_PATH).content


def test_a_proxy_carries_its_version_kind_container_and_metrics_address(mesh: Mesh) -> None:
    spec = spec_on(plan_of(mesh), "ctl1")  # as a controller reads it back
    [web] = spec.host("vm1").proxies
    assert (web.version, web.kind, web.container, web.metrics) == ("v1", "vm", None, "10.0.0.11:20000")
    [api] = spec.host("dock1").proxies
    assert (api.service, api.kind, api.container, api.metrics) == ("api", "container", "api-v2-1", "10.0.0.20:20000")


def test_no_tracing_means_no_span_receiver_and_the_web_port_is_the_default(mesh: Mesh) -> None:
    spec = spec_on(plan_of(mesh), "ctl1")
    assert (spec.trace_port, spec.web_port) == (0, 9191)


@pytest.mark.parametrize(("tracing", "port"), [
    ("{sampling: 100}", 9411),  # mesh's own collector: every controller runs the span receiver
    ("{zipkin: 'http://zipkin.example:9411', sampling: 5}", 0),  # spans go elsewhere: no receiver
    ("{otlp: 'https://otel.example', sampling: 5}", 0),
])
def test_the_span_receiver_runs_only_for_mesh_s_own_collector(tmp_path: Path, tracing: str, port: int) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.replace("    mesh_cert_ttl: 2h", f"    mesh_cert_ttl: 2h\n    mesh_tracing: {tracing}"))
    fleet = check_inventory(load_inventory(str(path)), str(path)).mesh
    assert spec_on(plan_of(fleet), "ctl1").trace_port == port
