"""The controller's snapshot built incrementally with shared EDS renders (issue 23: one Consul change converges
fast): the memoized EDS rewrite gives the bytes with_endpoints gives, and a build from the previous one gives
exactly what a full build gives after endpoint, traffic override and authorization deny changes, reusing the
proxies no change touched."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from mesh.controller.endpoints import EdsRenders, Endpoint, ServiceEndpoints, chosen_endpoints, with_endpoints
from mesh.controller.inbound import inbound_rules, read_denies
from mesh.controller.routes import effective_policies, read_overrides
from mesh.controller.snapshot import (
    Built,
    KnownEndpoints,
    ProxyKey,
    build_snapshot,
    remembered,
    watched_services,
)
from mesh.controller.spec import ControllerSpec
from mesh.controller.spec_build import build_spec
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.policy import AuthzOverride, TrafficOverride
from mesh.inventory.services import authz_override_to_json, override_to_json
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.render import RenderedFile

# web on three hosts in two zones (three proxies of the same name), api in two versions and zones, db on TCP; api
# and db served with inbound files (authz), web's route files redone from api's policy.
INVENTORY = """\
all:
  vars:
    mesh_trust_domain: incr.mesh
    mesh_consul_url: http://10.0.0.2:8500
    mesh_services:
      api:
        timeout: 2s
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
          mesh_zone: a
          mesh_region: r1
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}]}
        vm5:
          ansible_host: 10.0.0.15
          mesh_zone: b
          mesh_region: r1
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}]}
        vm6:
          ansible_host: 10.0.0.16
          mesh_zone: a
          mesh_region: r1
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_zone: a
          mesh_region: r1
          mesh_workloads:
            - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19102}]}
            - {service: db, port: 5432, protocol: tcp}
        vm3:
          ansible_host: 10.0.0.13
          mesh_zone: b
          mesh_region: r1
          mesh_workloads:
            - {service: api, version: v2, port: 9090}
"""
WEB = "web-8080"


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ControllerSpec:
    path = tmp_path_factory.mktemp("incremental") / "inventory.yml"
    path.write_text(INVENTORY)
    mesh = check_inventory(load_inventory(str(path)), str(path)).mesh
    inputs = ControllerInputs(keys={"ctl1": "ssh-ed25519 AAAActl1key"}, ctl_script=b"#!/bin/sh\n")
    plan = build_plan(mesh, PlanInputs(b"root pem", "00:11", controller=inputs))
    return build_spec(plan, mesh, {}, plan.controller_digest)


def endpoint(index: int, service: str) -> Endpoint:
    version = "v1" if index % 2 else "v2"
    zone, region = (("a", "r1"), ("b", "r1"), ("c", "r2"), ("", ""))[index % 4]
    return Endpoint(f"10.1.{index // 250}.{index % 250 + 1}", 9000 + index % 3, service, version,
                    f"{service}-{index}", f"h{index}", zone, region)


def answer(chooser: random.Random, service: str) -> ServiceEndpoints:
    """A Consul answer for `service`: some of 12 instances registered, some of those up."""
    registered = tuple(sorted(chooser.sample([endpoint(index, service) for index in range(12)], chooser.randint(0, 8))))
    up = tuple(item for item in registered if chooser.random() < 0.7)
    return ServiceEndpoints(service, registered, up)


def traffic_values(chooser: random.Random) -> dict[str, str]:
    override = chooser.choice([None, TrafficOverride(split=(("v1", 50), ("v2", 50)), revision="r-1"),
                               TrafficOverride(split=(("v1", 100),), revision="r-2")])
    return {} if override is None else {"api": json.dumps(override_to_json(override, "test", "now"))}


def authz_values(chooser: random.Random) -> dict[str, str]:
    deny = chooser.choice([None, AuthzOverride(deny_from=("web",), revision="a-1"),
                           AuthzOverride(deny_from=("api",), revision="d-1")])
    if deny is None:
        return {}
    service = "api" if deny.deny_from == ("web",) else "db"
    return {service: json.dumps(authz_override_to_json(deny, "alice@laptop", "2026-12-06T20:00:00Z"))}


def test_the_memoized_eds_render_gives_the_bytes_of_the_plain_one(spec: ControllerSpec) -> None:
    renders = EdsRenders()
    chooser = random.Random(23)
    for _ in range(30):
        seen = answer(chooser, "api")
        for host in spec.hosts:
            for proxy in host.proxies:
                for path, source in proxy.endpoints.items():
                    if source.service != "api":
                        continue
                    [file] = [item for item in proxy.files if item.path == path]
                    planned = RenderedFile(file.path, file.content, file.kind)  # type: ignore[arg-type]
                    endpoints, digest = renders.chosen(seen, source.version)
                    assert endpoints == chosen_endpoints(seen.of_version(source.version))
                    if endpoints is None:
                        continue
                    memoized = renders.with_endpoints(proxy.name, planned, endpoints, digest, proxy.zone,
                                                      proxy.region)
                    assert memoized == with_endpoints(proxy.name, planned, endpoints, proxy.zone, proxy.region)
    assert renders.hits > 0 and renders.misses > 0  # web on vm1 and vm6 (same zone) shared renders


def test_the_render_memo_stays_within_its_bounds(spec: ControllerSpec) -> None:
    renders = EdsRenders(max_entries=3)
    chooser = random.Random(5)
    known: KnownEndpoints = {}
    for _ in range(10):
        known = remembered(known, answer(chooser, "api"))
        build_snapshot(spec, known, renders=renders)
        assert len(renders._renders) <= 3
    small = EdsRenders(max_chars=1)
    build_snapshot(spec, {"api": ServiceEndpoints("api", (endpoint(1, "api"),), (endpoint(1, "api"),))},
                   renders=small)
    assert len(small._renders) <= 1


@pytest.mark.parametrize("seed", range(6))
def test_an_incremental_build_is_the_full_build_after_random_changes(spec: ControllerSpec, seed: int) -> None:
    chooser = random.Random(seed)
    services = watched_services(spec)
    assert set(services) == {"api", "db"}
    renders = EdsRenders()
    known: KnownEndpoints = {}
    traffic: dict[str, str] | None = None
    authz: dict[str, str] | None = None
    policies = rules = None
    built = build_snapshot(spec, known, policies, rules, renders=renders)
    previous = Built(built, spec, known, policies, rules)
    for _ in range(25):
        change = chooser.choice(["endpoints", "endpoints", "same answer", "traffic", "authz"])
        if change == "endpoints":
            known = remembered(known, answer(chooser, chooser.choice(services)))
        elif change == "same answer" and known:
            service = chooser.choice(sorted(known))
            again = known[service]
            known = {**known, service: ServiceEndpoints(service, tuple(again.registered), tuple(again.up))}
        elif change == "traffic":
            traffic = traffic_values(chooser)
            policies = effective_policies(spec, read_overrides(traffic, spec))
        elif change == "authz":
            authz = authz_values(chooser)
            rules = inbound_rules(spec, read_denies(authz, spec))
        incremental = build_snapshot(spec, known, policies, rules, previous, renders)
        full = build_snapshot(spec, known, policies, rules)
        assert incremental == full
        assert {key: item.version for key, item in incremental.items()} == \
            {key: item.version for key, item in full.items()}
        previous = Built(incremental, spec, known, policies, rules)


def test_a_change_of_one_service_redoes_only_its_callers(spec: ControllerSpec) -> None:
    chooser = random.Random(7)
    renders = EdsRenders()
    known = remembered(remembered({}, answer(chooser, "api")), answer(chooser, "db"))
    while not known.get("api") or not known.get("db"):
        known = remembered(remembered(known, answer(chooser, "api")), answer(chooser, "db"))
    rules = inbound_rules(spec, read_denies({}, spec))
    policies = effective_policies(spec, read_overrides({}, spec))
    before = build_snapshot(spec, known, policies, rules, renders=renders)
    moved = {**known, "db": ServiceEndpoints("db", (endpoint(40, "db"),), (endpoint(40, "db"),))}
    after = build_snapshot(spec, moved, policies, rules, Built(before, spec, known, policies, rules), renders)
    redone: set[ProxyKey] = {key for key in after if after[key] is not before[key]}
    callers_of_db = {(host.name, proxy.name) for host in spec.hosts for proxy in host.proxies
                     if any(source.service == "db" for source in proxy.endpoints.values())}
    assert redone == callers_of_db and ("vm1", WEB) in redone and ("vm3", "api-9090") not in redone
    assert after == build_snapshot(spec, moved, policies, rules)
    # web on vm1 and vm6 (both zone a) share one rendered EDS file object
    vm1 = {file.path: file for file in after[("vm1", WEB)].files.files}
    vm6 = {file.path: file for file in after[("vm6", WEB)].files.files}
    assert any(vm1[path] is vm6[path] and vm1[path].kind == "resource" and "eds." in path
               for path in vm1 if path in vm6)


def test_a_new_spec_redoes_the_proxies_whose_plan_changed(spec: ControllerSpec) -> None:
    chooser = random.Random(11)
    known = remembered({}, answer(chooser, "api"))
    before = build_snapshot(spec, known)
    smaller = replace(spec, hosts=tuple(host if host.name != "vm5" else replace(host, proxies=())
                                        for host in spec.hosts))
    after = build_snapshot(smaller, known, previous=Built(before, spec, known, None, None))
    assert after == build_snapshot(smaller, known)
    assert ("vm5", WEB) not in after and after[("vm1", WEB)] is before[("vm1", WEB)]


def test_reused_snapshots_are_the_ones_written(spec: ControllerSpec) -> None:
    """A reused proxy keeps its previous ProxySnapshot object: versions and digests as computed then."""
    known = remembered({}, ServiceEndpoints("api", (endpoint(1, "api"),), (endpoint(1, "api"),)))
    first = build_snapshot(spec, known)
    again = build_snapshot(spec, known, previous=Built(first, spec, known, None, None))
    assert all(again[key] is first[key] for key in first)
    assert again[("vm1", WEB)].digests == first[("vm1", WEB)].digests
