"""What the dashboard shows, as the JSON of `GET /api/dashboard`: `dashboard_view(inputs)`. Pure.

The inputs are frozen copies of what the controller knows (its spec, its per-host push state, the certificates it
saw, the traffic overrides and authorization denies it applies: `ControllerReading`, made under its lock) and of
what it read for the page (Consul's instances with their health and drain check, the fleet's numbers between its
last two scrapes of every proxy's metrics). It owns the JSON's shape (README: the dashboard); it must not read
Consul, hosts or clocks.

    {"generated_at": 1765000000.0, "controller": {"host": "ctl1", "leader": true, ...},
     "services": [{"name": "api", "protocol": "http", "rps": 9.5, "error_rate": 0.0, "p99_ms": 12.0, ...}],
     "edges": [{"source": "web", "destination": "api", "protocol": "http", "rps": 9.5, ...}],
     "instances": [{"service": "api", "version": "v1", "kind": "vm", "host": "vm2", "health": "passing",
                    "drained": false, "sync": "in sync", "cert_expires_in_s": 3000, ...}],
     "splits": [...], "denials": {"denies": [...], "rbac": [...]}, "numbers": {...}, "consul": {...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mesh.config.authz import InboundInputs
from mesh.config.model import RouteInputs
from mesh.controller.routes import inventory_policy
from mesh.controller.spec import ControllerSpec, HostSpec, ProxySpec
from mesh.inventory.policy import AuthzOverride, Fault, RouteMatch, TrafficOverride, apply_override
from mesh.telemetry.fleet import FleetNumbers, FleetSnapshot, Numbers

ProxyKey = tuple[str, str]  # (host, proxy)
RBAC_DENIED = "rbac"  # a stat of Envoy's RBAC filters: ...rbac...denied (HTTP and TCP, not the shadow ones)


@dataclass(frozen=True)
class Instance:
    """One Consul instance as the dashboard needs it (mesh.catalog.InstanceHealth's fields)."""

    service_id: str
    service: str
    node: str
    address: str
    port: int
    status: str  # passing | warning | critical
    output: str = ""
    drained: bool = False
    version: str = ""


@dataclass(frozen=True)
class ControllerReading:
    """What one controller knows, copied under its lock (Controller.dashboard_reading)."""

    spec: ControllerSpec
    holder: str  # HOST:PID
    leading: bool
    consul_stale_s: float = 0.0
    wanted: Mapping[ProxyKey, str] = field(default_factory=lambda: MappingProxyType({}))  # resource versions
    on_hosts: Mapping[ProxyKey, str | None] = field(default_factory=lambda: MappingProxyType({}))  # None: unreached
    pushed_at: Mapping[ProxyKey, float] = field(default_factory=lambda: MappingProxyType({}))
    refused: frozenset[ProxyKey] = frozenset()
    behind: tuple[str, ...] = ()
    certificates: Mapping[ProxyKey, float] = field(default_factory=lambda: MappingProxyType({}))  # not_after, epoch
    overrides: Mapping[str, TrafficOverride] = field(default_factory=lambda: MappingProxyType({}))
    denies: Mapping[str, AuthzOverride] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class DashboardInputs:
    """Everything one answer of /api/dashboard is made of. `instances` None: Consul not read (yet, or it failed:
    `consul_error`); `numbers` None: fewer than two scrapes yet; `latest` the last scrape (RBAC counters)."""

    reading: ControllerReading
    now: float  # epoch seconds
    instances: tuple[Instance, ...] | None = None
    consul_error: str | None = None
    consul_read_at: float | None = None
    numbers: FleetNumbers | None = None
    latest: FleetSnapshot | None = None
    scraping: bool = False  # a viewer polled lately, so the controller scrapes


def dashboard_view(inputs: DashboardInputs) -> dict[str, Any]:
    """The JSON of /api/dashboard (the module docstring shows its shape)."""
    reading = inputs.reading
    spec = reading.spec
    protocols = service_protocols(spec)
    instances = _instances(inputs, protocols)
    return {
        "generated_at": round(inputs.now, 3),
        "controller": {"host": reading.holder.rsplit(":", 1)[0], "holder": reading.holder,
                       "leader": reading.leading, "consul_stale_s": round(reading.consul_stale_s, 1),
                       "plan_digest": spec.plan_digest[:12], "hosts_behind": list(reading.behind)},
        "services": _services(spec, protocols, instances, inputs.numbers, _denied(inputs.latest)),
        "edges": _edges(spec, protocols, inputs.numbers),
        "instances": instances,
        "splits": _splits(spec, reading.overrides),
        "denials": {"denies": [{"service": service, "deny_from": list(deny.deny_from), "revision": deny.revision}
                               for service, deny in sorted(reading.denies.items()) if deny.deny_from],
                    "rbac": [{"service": service, "denied": int(count)}
                             for service, count in sorted(_denied(inputs.latest).items())]},
        "numbers": {"interval_s": round(inputs.numbers.interval, 1) if inputs.numbers else None,
                    "scraping": inputs.scraping,
                    "failures": [{"host": item.target.host, "proxy": item.target.proxy, "error": item.error}
                                 for item in (inputs.numbers.failures if inputs.numbers else ())]},
        "consul": {"error": inputs.consul_error,
                   "read_at": round(inputs.consul_read_at, 3) if inputs.consul_read_at is not None else None},
    }


# ---- the spec's picture: services, their protocols, the declared calls ------------------------------------

def service_protocols(spec: ControllerSpec) -> dict[str, str]:
    """service -> http | tcp, from what the spec says of it: an inbound file's inputs (its own protocol), a
    caller's route file (HTTP only: one per HTTP upstream); an upstream no route file names is TCP."""
    found: dict[str, str] = {}
    for proxy in _proxies(spec):
        for entry in proxy.inbound.values():
            inputs = InboundInputs.from_json(entry["inputs"])
            found[inputs.service] = inputs.protocol
    for proxy in _proxies(spec):
        routed = {RouteInputs.from_json(data).service for data in proxy.routes.values()}
        for source in proxy.endpoints.values():
            found.setdefault(source.service, "http" if source.service in routed else "tcp")
        found.setdefault(proxy.service, "http")
    return found


def declared_edges(spec: ControllerSpec) -> list[tuple[str, str]]:
    """(caller, upstream) for every upstream some proxy of the caller fills endpoints for, sorted."""
    return sorted({(proxy.service, source.service) for proxy in _proxies(spec)
                   for source in proxy.endpoints.values()})


def _proxies(spec: ControllerSpec) -> list[ProxySpec]:
    return [proxy for host in spec.hosts for proxy in host.proxies]


def instance_id(host: HostSpec, proxy: ProxySpec) -> str:
    """The Consul service ID of a proxy's workload (mesh.inventory.model.Workload.consul_id:
    `<service>-<host>-<key>`, the proxy being `<service>-<key>`)."""
    key = proxy.name.removeprefix(f"{proxy.service}-")
    return f"{proxy.service}-{host.name}-{key}"


# ---- numbers --------------------------------------------------------------------------------------------

def _numbers(numbers: Numbers | None) -> dict[str, float | None]:
    if numbers is None:
        return {"rps": None, "error_rate": None, "p99_ms": None}
    return {"rps": round(numbers.rate, 2),
            "error_rate": round(numbers.error_rate, 4) if numbers.error_rate is not None else None,
            "p99_ms": round(numbers.p99_ms, 1) if numbers.p99_ms is not None else None}


def _services(spec: ControllerSpec, protocols: Mapping[str, str], instances: list[dict[str, Any]],
              numbers: FleetNumbers | None, denied: Mapping[str, float]) -> list[dict[str, Any]]:
    measured = {item.service: item for item in numbers.services} if numbers else {}
    names = sorted(set(protocols) | set(measured))
    found = []
    for name in names:
        mine = [item for item in instances if item["service"] == name]
        versions = sorted({proxy.version for proxy in _proxies(spec) if proxy.service == name and proxy.version}
                          | {item["version"] for item in mine if item["version"]})
        service = measured.get(name)
        found.append({"name": name, "protocol": protocols.get(name, service.protocol if service else "http"),
                      "versions": versions, "instances": len(mine),
                      "up": sum(1 for item in mine if item["health"] != "critical" and not item["drained"]),
                      **_numbers(service.numbers if service else None),
                      "denied": int(denied[name]) if name in denied else None})
    return found


def _edges(spec: ControllerSpec, protocols: Mapping[str, str], numbers: FleetNumbers | None) -> list[dict[str, Any]]:
    measured = {(edge.source, edge.destination): edge for edge in numbers.edges} if numbers else {}
    declared = set(declared_edges(spec))
    found = []
    for source, destination in sorted(declared | set(measured)):
        edge = measured.get((source, destination))
        found.append({"source": source, "destination": destination,
                      "protocol": protocols.get(destination, edge.protocol if edge else "http"),
                      "declared": (source, destination) in declared,
                      **_numbers(edge.numbers if edge else None)})
    return found


def _denied(latest: FleetSnapshot | None) -> dict[str, float]:
    """service -> requests (HTTP) or connections (TCP) its instances' RBAC filters denied since they started: the
    sum of the `...rbac...denied` counters (not shadow ones) of the last scrape of each of its proxies."""
    found: dict[str, float] = {}
    for scrape in latest.proxies if latest else ():
        if scrape.error is not None:
            continue
        total = sum(sample.value for sample in scrape.samples if _is_rbac_denied(sample.name))
        found[scrape.target.service] = found.get(scrape.target.service, 0.0) + total
    return found


def _is_rbac_denied(name: str) -> bool:
    return RBAC_DENIED in name and "shadow" not in name and name.removesuffix("_total").endswith("denied")


# ---- instances ------------------------------------------------------------------------------------------

def _instances(inputs: DashboardInputs, protocols: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every proxy of the spec with its Consul instance (health, drain), then Consul's instances the spec does
    not know; each with its push state and certificate."""
    reading = inputs.reading
    consul = {(item.node, item.service_id): item for item in inputs.instances or ()}
    found = []
    seen = set()
    for host in reading.spec.hosts:
        for proxy in host.proxies:
            key = (host.name, instance_id(host, proxy))
            seen.add(key)
            found.append(_instance(inputs, host.name, proxy, consul.get(key), key[1]))
    for key, item in sorted(consul.items()):
        if key not in seen:
            found.append(_instance(inputs, item.node, None, item, item.service_id))
    return found


def _instance(inputs: DashboardInputs, host: str, proxy: ProxySpec | None, consul: Instance | None,
              service_id: str) -> dict[str, Any]:
    reading = inputs.reading
    if consul is not None:
        health, output, drained = consul.status, consul.output, consul.drained
    else:
        health = "unknown" if inputs.instances is None else "not registered"
        output, drained = "", False
    sync, detail = _sync(reading, host, proxy)
    not_after = reading.certificates.get((host, proxy.name)) if proxy is not None else None
    return {"id": service_id, "service": proxy.service if proxy else consul.service if consul else "",
            "version": (proxy.version if proxy else "") or (consul.version if consul else ""),
            "kind": proxy.kind if proxy else "", "host": host, "container": proxy.container if proxy else None,
            "proxy": proxy.name if proxy else None,
            "address": f"{consul.address}:{consul.port}" if consul else None,
            "health": health, "health_output": output[:300], "drained": drained, "sync": sync,
            "sync_detail": detail,
            "cert_expires_in_s": int(not_after - inputs.now) if not_after is not None else None}


def _sync(reading: ControllerReading, host: str, proxy: ProxySpec | None) -> tuple[str, str]:
    """The proxy's files against the controller's: in sync, pending, refused, unreachable; `standby` on a
    controller that does not hold the lock (it pushes nothing and reads no host)."""
    if proxy is None:
        return "unknown", "not in the controller's spec"
    if not reading.leading:
        return "standby", "this controller does not hold the lock: it pushes nothing"
    key = (host, proxy.name)
    if key not in reading.on_hosts or reading.on_hosts[key] is None:
        return "unreachable", f"the controller has not read {host}'s state"
    wanted, on_host = reading.wanted.get(key), reading.on_hosts[key]
    pushed = reading.pushed_at.get(key)
    when = f" (last push at {pushed:.0f})" if pushed is not None else ""
    if key in reading.refused:
        return "refused", f"the controller's files were refused; the host runs {str(on_host)[:12]}{when}"
    if wanted is not None and wanted == on_host:
        return "in sync", f"resource version {wanted[:12]}{when}"
    return "pending", f"the host runs {str(on_host)[:12]}, the controller wants {str(wanted)[:12]}{when}"


# ---- traffic splits -------------------------------------------------------------------------------------

def _splits(spec: ControllerSpec, overrides: Mapping[str, TrafficOverride]) -> list[dict[str, Any]]:
    """Per HTTP service some caller routes to: its versions and the routes callers apply (the inventory's
    policy with the run-time override), the override's revision and fault. Services that run one version and
    have no route, override or fault are left out."""
    versions: dict[str, tuple[str, ...]] = {}
    for proxy in _proxies(spec):
        for data in proxy.routes.values():
            inputs = RouteInputs.from_json(data)
            versions.setdefault(inputs.service, inputs.versions)
    found = []
    for service, known in sorted(versions.items()):
        override = overrides.get(service)
        policy = apply_override(inventory_policy(spec, service), override)
        routes, fault = policy.routes, policy.fault
        if len(known) < 2 and not routes and override is None and fault is None:
            continue
        found.append({"service": service, "versions": list(known),
                      "source": "override" if override is not None else "inventory" if routes else "none",
                      "revision": override.revision if override is not None else None,
                      "routes": [{"match": match_text(rule.match), "to": [{"version": version, "weight": weight}
                                                                         for version, weight in rule.to]}
                                 for rule in routes],
                      "fault": fault_text(fault) if fault is not None else None})
    return found


def match_text(match: RouteMatch | None) -> str | None:
    """A route's match in words (`header x-canary=1, path prefix /v2`); None for every request. Like
    mesh.traffic.view's, which the controller cannot import (it reaches mesh.status and rich, not in its venv)."""
    if match is None:
        return None
    parts = [f"header {name}={value}" for name, value in match.headers]
    parts += [f"cookie {name}={value}" for name, value in match.cookies]
    if match.path is not None:
        parts.append(f"path {match.path.kind} {match.path.value}")
    if match.method is not None:
        parts.append(f"method {match.method}")
    return ", ".join(parts) or None


def fault_text(fault: Fault) -> str:
    parts = []
    if fault.abort is not None:
        parts.append(f"abort {fault.abort.status} for {fault.abort.percent:g}%")
    if fault.delay is not None:
        parts.append(f"delay {fault.delay.duration_ms} ms for {fault.delay.percent:g}%")
    if fault.when_headers:
        parts.append("when " + ", ".join(f"{name}={value}" for name, value in fault.when_headers))
    return ", ".join(parts)
