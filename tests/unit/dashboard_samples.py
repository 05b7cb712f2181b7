"""A controller spec shaped like the lab's (web on vm1 calls api on vm2 and dock1, which call db on vm2 over TCP),
made by hand, and the other inputs of the dashboard's view. Nothing here is a test."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.controller.spec import ControllerSpec, EndpointSource, HostSpec, IdentitySpec, ProxySpec
from mesh.dashboard.view import ControllerReading, Instance
from mesh.telemetry.fleet import FleetNumbers, FleetSnapshot, ProxyScrape
from mesh.telemetry.targets import ProxyTarget

TRUST = "lab.mesh"
MESH_ID = "lab"


def _inbound(service: str, version: str, protocol: str, callers: tuple[str, ...]) -> dict[str, Any]:
    inputs = {"service": service, "version": version, "protocol": protocol, "trust_domain": TRUST,
              "authz_default": "allow", "callers": list(callers)}
    if protocol == "http":
        return {"/etc/mesh/proxies/x/xds/rds.inbound.yaml": {"kind": "route", "inputs": inputs}}
    return {f"/etc/mesh/proxies/x/xds/ecds.{kind}.yaml": {"kind": kind, "inputs": inputs}
            for kind in ("tcp-deny", "tcp-allow")}


def _route(service: str, versions: tuple[str, ...]) -> dict[str, Mapping[str, Any]]:
    return {f"/etc/mesh/proxies/x/xds/rds.{service}.yaml": {
        "route_name": f"outbound-{service}", "service": service, "protocol": "http", "versions": list(versions),
        "request_headers": []}}


def proxy(name: str, service: str, version: str, *, upstreams: tuple[str, ...] = (), routes: tuple[str, ...] = (),
          protocol: str = "http", callers: tuple[str, ...] = (), kind: str = "vm", container: str | None = None,
          metrics: str | None = None) -> ProxySpec:
    found: dict[str, Mapping[str, Any]] = {}
    for upstream in routes:
        found.update(_route(upstream, ("v1", "v2") if upstream == "api" else ("v1",)))
    return ProxySpec(name=name, service=service, proxy_dir=f"/etc/mesh/proxies/{name}", bootstrap_sha256="0" * 64,
                     files=(), endpoints={f"/etc/mesh/proxies/{name}/xds/eds.{up}.yaml": EndpointSource(up)
                                          for up in upstreams},
                     routes=found, inbound=_inbound(service, version, protocol, callers), version=version,
                     kind="container" if kind == "container" else "vm", container=container, metrics=metrics)


def lab_spec(policies: Mapping[str, Mapping[str, Any]] | None = None) -> ControllerSpec:
    web = proxy("web-8080", "web", "v1", upstreams=("api",), routes=("api",), metrics="10.77.0.11:20000")
    api1 = proxy("api-9090", "api", "v1", upstreams=("db",), callers=("web",), metrics="10.77.0.12:20000")
    db = proxy("db-5432", "db", "v1", protocol="tcp", callers=("api",), metrics="10.77.0.12:20001")
    api2 = proxy("api-api-v2-1", "api", "v2", upstreams=("db",), callers=("web",), kind="container",
                 container="api-v2-1", metrics="10.77.0.20:20000")

    def host(name: str, address: str, *proxies: ProxySpec) -> HostSpec:
        return HostSpec(name, address, 22, (), tuple(IdentitySpec(p.name, p.kind, f"spiffe://{TRUST}/{p.service}")
                                                     for p in proxies), proxies)

    return ControllerSpec(mesh_id=MESH_ID, trust_domain=TRUST, plan_digest="abcdef0123456789" * 4,
                          consul_url="http://10.77.0.2:8500", consul_token_file=None, consul_ca_file=None,
                          cert_ttl_s=3600, hosts=(host("vm1", "10.77.0.11", web),
                                                  host("vm2", "10.77.0.12", api1, db),
                                                  host("dock1", "10.77.0.20", api2)),
                          policies=dict(policies or {}))


def lab_instances(drained: str | None = None) -> tuple[Instance, ...]:
    """Consul's instances of the lab, every one passing; `drained` (a service ID) drained."""
    found = [("web-vm1-8080", "web", "vm1", "10.77.0.11", 21000, "v1"),
             ("api-vm2-9090", "api", "vm2", "10.77.0.12", 21000, "v1"),
             ("db-vm2-5432", "db", "vm2", "10.77.0.12", 21001, "v1"),
             ("api-dock1-api-v2-1", "api", "dock1", "10.77.0.20", 21000, "v2")]
    return tuple(Instance(sid, service, node, address, port, "critical" if sid == drained else "passing",
                          "drained by me@laptop (mesh drain)" if sid == drained else "HTTP 200",
                          sid == drained, version)
                 for sid, service, node, address, port, version in found)


def reading(spec: ControllerSpec | None = None, leading: bool = True, **fields: Any) -> ControllerReading:
    return ControllerReading(spec=spec or lab_spec(), holder="ctl1:4242", leading=leading, **fields)


def target(proxy_name: str, service: str, host: str, protocol: str = "http", version: str = "v1") -> ProxyTarget:
    return ProxyTarget(proxy=proxy_name, service=service, version=version, host=host, kind="vm",
                       address="10.77.0.12", port=20000, protocol="tcp" if protocol == "tcp" else "http")


def scrape_of(target_: ProxyTarget, text: str, at: float) -> ProxyScrape:
    from mesh.telemetry.fleet import parse_metrics

    return ProxyScrape(target_, at, parse_metrics(text))


def no_numbers() -> FleetNumbers:
    return FleetNumbers(interval=0.0, services=(), edges=(), failures=())


def snapshot(*scrapes: ProxyScrape) -> FleetSnapshot:
    return FleetSnapshot(tuple(scrapes))
