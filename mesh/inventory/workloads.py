"""Reads one host's `mesh_workloads` (workloads, health checks, upstreams) into typed Workloads, and checks
that the ports each network namespace uses are distinct. It must not look at other hosts or at connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from mesh.inventory.located import Located, Problems
from mesh.inventory.model import (
    ADMIN_PORT_BASE,
    METRICS_PORT_BASE,
    PROXY_PORT_BASE,
    Health,
    HostKind,
    Upstream,
    Workload,
)
from mesh.inventory.values import (
    check_container_name,
    check_dns_label,
    check_health_path,
    check_version,
    parse_duration,
    parse_port,
)
from mesh.suggest import did_you_mean

WORKLOAD_KEYS = ("service", "version", "port", "protocol", "container", "health", "upstreams", "proxy_port",
                 "admin_port", "metrics_port")
# Ports a container host forwards from its own address into the workload's namespace: unique on that host.
HOST_FORWARDED = ("proxy_port", "metrics_port")
UPSTREAM_KEYS = ("service", "local_port")
HEALTH_KINDS = ("http", "grpc", "tcp")
HEALTH_KEYS = (*HEALTH_KINDS, "interval", "timeout")
PROTOCOLS = ("http", "http2", "grpc", "tcp")


@dataclass(frozen=True)
class PortUse:
    """One port a workload uses, where it is written (or defaulted) and in which network namespace."""

    port: int
    where: Located
    namespace: str  # "host" on a VM; "container:<name>" on a container host
    defaulted: bool = False


@dataclass(frozen=True)
class ParsedWorkload:
    """A workload (trust domain not yet set), the ports it uses, and where its upstreams are written."""

    workload: Workload
    where: Located
    ports: tuple[PortUse, ...]
    upstreams: tuple[tuple[str, Located], ...]


def read_workloads(host: str, kind: HostKind, where: Located, problems: Problems) -> list[ParsedWorkload]:
    """The workloads of a host's `mesh_workloads`; every problem goes to problems."""
    if not isinstance(where.value, list):
        problems.at(where, f"expected a list of workloads (write [] for none), got {type(where.value).__name__}")
        return []
    parsed: list[ParsedWorkload] = []
    for index in range(len(where.value)):
        item = where.child(index)
        if not isinstance(item.value, dict):
            problems.at(item, f"expected a workload: a mapping with service and port, got {type(item.value).__name__}")
            continue
        workload = _read_workload(host, kind, index, item, problems)
        if workload is not None:
            parsed.append(workload)
    return parsed


def _unknown_keys(where: Located, known: tuple[str, ...], what: str, problems: Problems) -> None:
    for name in where.value:
        if name not in known:
            problems.add_error(where, name, f"unknown {what} key; known keys: {', '.join(known)}",
                               did_you_mean(str(name), known))


def _read_workload(host: str, kind: HostKind, index: int, where: Located, problems: Problems) -> ParsedWorkload | None:
    _unknown_keys(where, WORKLOAD_KEYS, "workload", problems)
    values = where.value
    service = _required(where, "service", check_dns_label, problems)
    port = _required(where, "port", parse_port, problems)
    version = problems.read(where.child("version"), check_version) if "version" in values else "v1"
    protocol = _protocol(where, problems)
    container = _container(kind, where, problems)
    health = _health(where, problems)
    upstreams = _upstreams(where, problems)
    proxy_port = _optional_port(where, "proxy_port", PROXY_PORT_BASE + index, problems)
    admin_port = _optional_port(where, "admin_port", ADMIN_PORT_BASE + index, problems)
    metrics_port = _optional_port(where, "metrics_port", METRICS_PORT_BASE + index, problems)
    if None in (service, port, version, protocol, health, upstreams, proxy_port, admin_port, metrics_port):
        return None
    if kind == "container_host" and container is None:
        return None
    assert service is not None and port is not None and version is not None and health is not None
    assert upstreams is not None and proxy_port is not None and admin_port is not None and metrics_port is not None
    workload = Workload(
        host=host, index=index, service=service, port=port, trust_domain="", version=version,
        protocol=cast(Any, protocol), container=container, health=health,
        upstreams=tuple(Upstream(name, local_port) for name, local_port, _ in upstreams),
        proxy_port=proxy_port, admin_port=admin_port, metrics_port=metrics_port,
    )
    namespace = "host" if kind == "vm" else f"container:{container}"
    ports = [
        PortUse(port, where.child("port"), namespace),
        _port_use(where, "proxy_port", proxy_port, namespace),
        _port_use(where, "admin_port", admin_port, namespace),
        _port_use(where, "metrics_port", metrics_port, namespace),
        *(PortUse(local_port, spot.child("local_port"), namespace) for _, local_port, spot in upstreams),
    ]
    return ParsedWorkload(workload, where, tuple(ports), tuple((name, spot) for name, _, spot in upstreams))


def _port_use(where: Located, name: str, port: int, namespace: str) -> PortUse:
    if name in where.value:
        return PortUse(port, where.child(name), namespace)
    return PortUse(port, Located(port, where.origin, f"{where.key}.{name}"), namespace, defaulted=True)


def _required(where: Located, name: str, reader: Any, problems: Problems) -> Any:
    if name not in where.value:
        problems.at(where, f"the {'upstream' if 'upstreams[' in where.key else 'workload'} has no `{name}`, "
                           "which is required")
        return None
    return _read_port(where.child(name), problems) if reader is parse_port else problems.read(where.child(name), reader)


def _optional_port(where: Located, name: str, default: int, problems: Problems) -> int | None:
    return _read_port(where.child(name), problems) if name in where.value else default


def _read_port(where: Located, problems: Problems) -> int | None:
    """A port; YAML 1.1 integers written otherwise than in plain decimal (`022` is 18) are refused."""
    raw = getattr(where.marks, "raw", None)
    value = where.value
    if isinstance(value, int) and not isinstance(value, bool) and raw and raw.strip() != str(value):
        problems.at(where, f"YAML 1.1 reads {raw.strip()!r} as {value}; expected a port written in plain decimal "
                           "(1-65535, no leading zero)")
        return None
    return problems.read(where, parse_port)


def _protocol(where: Located, problems: Problems) -> str | None:
    if "protocol" not in where.value:
        return "http"
    spot = where.child("protocol")
    if spot.value not in PROTOCOLS:
        problems.at(spot, f"expected one of {', '.join(PROTOCOLS)}, got {spot.value!r}",
                    did_you_mean(str(spot.value), PROTOCOLS))
        return None
    return str(spot.value)


def _container(kind: HostKind, where: Located, problems: Problems) -> str | None:
    if kind == "vm":
        if "container" in where.value:
            problems.at(where.child("container"),
                        "`container` is for container hosts only; this host is a vm "
                        "(set mesh_host_kind: container_host, or remove container)")
        return None
    if "container" not in where.value:
        problems.at(where, "a workload on a container host needs `container`: the name of the app's container")
        return None
    return problems.read(where.child("container"), check_container_name)


def _health(where: Located, problems: Problems) -> Health | None:
    if "health" not in where.value:
        return Health()
    spot = where.child("health")
    expected = "{http: /path}, {grpc: true} or {tcp: true}, with optional interval and timeout"
    if not isinstance(spot.value, dict):
        problems.at(spot, f"expected {expected}, got {spot.value!r}")
        return None
    _unknown_keys(spot, HEALTH_KEYS, "health", problems)
    kinds = [name for name in HEALTH_KINDS if name in spot.value]
    if len(kinds) != 1:
        problems.at(spot, f"expected exactly one of http, grpc, tcp: {expected}")
        return None
    kind = kinds[0]
    check = spot.child(kind)
    path = None
    if kind == "http":
        path = problems.read(check, check_health_path)
        if path is None:
            return None
    elif check.value is not True:
        problems.at(check, f"expected `{kind}: true`, got {check.value!r}")
        return None
    interval = problems.read(spot.child("interval"), parse_duration) if "interval" in spot.value else Health.interval
    timeout = problems.read(spot.child("timeout"), parse_duration) if "timeout" in spot.value else Health.timeout
    if interval is None or timeout is None:
        return None
    return Health(kind=cast(Any, kind), http_path=path, interval=interval, timeout=timeout)


def _upstreams(where: Located, problems: Problems) -> list[tuple[str, int, Located]] | None:
    if "upstreams" not in where.value:
        return []
    spot = where.child("upstreams")
    if not isinstance(spot.value, list):
        problems.at(spot, f"expected a list of {{service: NAME, local_port: PORT}}, got {spot.value!r}")
        return None
    found: list[tuple[str, int, Located]] = []
    ok = True
    for index in range(len(spot.value)):
        item = spot.child(index)
        if not isinstance(item.value, dict):
            problems.at(item, f"expected {{service: NAME, local_port: PORT}}, got {item.value!r}")
            ok = False
            continue
        _unknown_keys(item, UPSTREAM_KEYS, "upstream", problems)
        service = _required(item, "service", check_dns_label, problems)
        local_port = _required(item, "local_port", parse_port, problems)
        if service is None or local_port is None:
            ok = False
            continue
        found.append((service, local_port, item))
    return found if ok else None


def check_ports(host: str, kind: HostKind, ssh_port: int | None, parsed: list[ParsedWorkload],
                problems: Problems) -> None:
    """Every port distinct within its network namespace, none the SSH port; on a container host, every proxy_port
    and metrics_port also distinct on the host (both are forwarded from its own address)."""
    seen: dict[tuple[str, int], PortUse] = {}
    forwarded: dict[int, PortUse] = {}
    proxy_keys: dict[str, ParsedWorkload] = {}
    for item in parsed:
        _distinct_proxy(host, item, proxy_keys, problems)
        for use in item.ports:
            unique = _distinct(seen, (use.namespace, use.port), use, _namespace_text(host, use.namespace), problems)
            if unique and kind == "container_host" and _key_name(use) in HOST_FORWARDED:
                _distinct(forwarded, use.port, use, f"on container host {host}", problems,
                          "every proxy_port and metrics_port of a container host must differ: both are forwarded "
                          "from the host's own address")
            if ssh_port is not None and use.port == ssh_port:
                problems.at(use.where, f"port {use.port} is the SSH port of {host} (ansible_port); "
                                       "no mesh port may be the host's SSH port")


def _distinct_proxy(host: str, item: ParsedWorkload, seen: dict[str, ParsedWorkload], problems: Problems) -> None:
    """One proxy per service and key (Workload.key: its container, or on a VM its app port): the proxy's name."""
    workload = item.workload
    first = seen.setdefault(f"{workload.service}-{workload.key}", item)
    if first is not item:
        what = f"container {workload.container}" if workload.container else f"port {workload.port}"
        problems.at(item.where, f"service {workload.service} with {what} is already a workload of {host} at "
                                f"{first.where.origin}; a service runs once per "
                                f"{'container' if workload.container else 'app port'} of a host")


def _key_name(use: PortUse) -> str:
    """The workload key a port is written (or defaulted) under: `port`, `proxy_port`, `local_port`..."""
    return use.where.key.rsplit(".", 1)[-1]


def _distinct(seen: dict[Any, PortUse], slot: Any, use: PortUse, scope: str, problems: Problems,
              rule: str = "every port in one network namespace must differ") -> bool:
    """True when slot is new; otherwise the error names the first use of the port."""
    first = seen.get(slot)
    if first is None:
        seen[slot] = use
        return True
    default = " (its default)" if use.defaulted else ""
    first_default = " (its default)" if first.defaulted else ""
    problems.at(use.where, f"port {use.port}{default} is already used by {first.where.key}{first_default} "
                           f"at {first.where.origin} {scope}; {rule}")
    return False


def _namespace_text(host: str, namespace: str) -> str:
    if namespace == "host":
        return f"on vm {host}"
    return f"in container {namespace.split(':', 1)[1]} on {host}"
