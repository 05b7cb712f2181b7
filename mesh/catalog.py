"""Consul's catalog as mesh sees it: the registrations an inventory implies, syncing them, health in and out.

It owns the Consul shapes (external nodes, service IDs, Meta, checks); it must not probe, render or read
files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import consul
import structlog
from consul.callback import CB

from mesh.errors import MeshError

if TYPE_CHECKING:  # the checker imports this module on controllers, where the inventory code is not installed
    from mesh.inventory.model import Mesh

Status = Literal["passing", "warning", "critical"]

MANAGED_BY = "managed-by"
MESH = "mesh"
CHECK_PREFIX = "mesh-health:"
CHECK_NAME = "mesh health (through Envoy)"
NOT_CHECKED_YET = "not checked yet by mesh's health checker"
NODE_META: Mapping[str, str] = MappingProxyType(
    {"external-node": "true", "external-probe": "false", MANAGED_BY: MESH}
)
REQUEST_TIMEOUT = 10.0
_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}


class CatalogError(MeshError):
    """Consul could not be reached or refused a request (exit 1); the message names the URL."""


@dataclass(frozen=True)
class InstanceRef:
    """Enough to address one instance's check in the catalog: its node and service ID."""

    node: str
    service_id: str

    @property
    def check_id(self) -> str:
        return CHECK_PREFIX + self.service_id


@dataclass(frozen=True)
class Registration:
    """One workload instance as mesh registers it: an external node, a service and its mesh-health check."""

    node: str
    address: str
    service_id: str
    service: str
    port: int
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def ref(self) -> InstanceRef:
        return InstanceRef(self.node, self.service_id)

    @property
    def check_id(self) -> str:
        return self.ref.check_id

    def service_body(self) -> dict[str, Any]:
        return {"ID": self.service_id, "Service": self.service, "Address": self.address,
                "Port": self.port, "Meta": dict(self.meta)}


@dataclass(frozen=True)
class InstanceHealth:
    """One instance of a service with the worst status of its checks (node and service checks)."""

    service_id: str
    service: str
    node: str
    address: str
    port: int
    status: Status
    output: str
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SyncResult:
    """Service IDs registered (new or changed), unchanged and deregistered; external nodes removed."""

    registered: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deregistered: tuple[str, ...] = ()
    removed_nodes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.registered or self.deregistered or self.removed_nodes)


@dataclass(frozen=True)
class ObservedInstance:
    """What the catalog holds for one service instance, as read from /v1/health/service/NAME."""

    node: str
    node_address: str
    node_meta: Mapping[str, str]
    service: Mapping[str, Any]
    check: Mapping[str, Any] | None  # mesh's check of this instance, when present


@dataclass(frozen=True)
class CatalogState:
    """The part of the catalog a sync compares with: every service instance, and the nodes mesh created."""

    instances: tuple[ObservedInstance, ...] = ()
    mesh_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncPlan:
    """What a sync must do: register bodies (by service ID), deregister refs, remove nodes."""

    register: tuple[tuple[str, Mapping[str, Any]], ...]
    unchanged: tuple[str, ...]
    deregister: tuple[InstanceRef, ...]
    remove_nodes: tuple[str, ...]


def registrations(mesh: Mesh) -> list[Registration]:
    """Every workload instance of every managed host, in inventory order. Pure."""
    result = []
    for host in mesh.hosts:
        for workload in host.workloads:
            meta = {"version": workload.version, "host": host.name, "kind": host.consul_kind,
                    MANAGED_BY: MESH}
            result.append(Registration(
                node=host.name, address=host.connection.address, service_id=workload.consul_id,
                service=workload.service, port=workload.proxy_port, meta=MappingProxyType(meta)))
    return result


def check_body(ref: InstanceRef, status: Status, output: str) -> dict[str, Any]:
    """The Check of /v1/catalog/register for an instance, with the given status (as consul-esm writes it)."""
    return {"Node": ref.node, "CheckID": ref.check_id, "Name": CHECK_NAME, "ServiceID": ref.service_id,
            "Status": status, "Output": output}


def register_body(registration: Registration, check: Mapping[str, Any] | None) -> dict[str, Any]:
    """A full /v1/catalog/register body: the external node, its service and (when given) the check."""
    body: dict[str, Any] = {"Node": registration.node, "Address": registration.address,
                            "NodeMeta": dict(NODE_META), "Service": registration.service_body()}
    if check is not None:
        body["Check"] = dict(check)
    return body


def plan_sync(wanted: Sequence[Registration], state: CatalogState) -> SyncPlan:
    """Compare the wanted registrations with the catalog. Pure.

    A changed or new instance is re-registered; an existing check keeps its status and output, so a re-deploy
    never flaps an instance the checker found healthy (the checker corrects a stale status within one round).
    Only services with Meta managed-by=mesh are ever deregistered, and only nodes mesh created are removed.
    """
    observed = {(item.node, str(item.service.get("ID"))): item for item in state.instances}
    wanted_keys = {(reg.node, reg.service_id) for reg in wanted}
    register: list[tuple[str, Mapping[str, Any]]] = []
    unchanged: list[str] = []
    for reg in wanted:
        body = _needed_registration(reg, observed.get((reg.node, reg.service_id)))
        if body is None:
            unchanged.append(reg.service_id)
        else:
            register.append((reg.service_id, body))
    deregister = tuple(
        InstanceRef(node, service_id) for (node, service_id), item in observed.items()
        if (node, service_id) not in wanted_keys and (item.service.get("Meta") or {}).get(MANAGED_BY) == MESH)
    dropped = {(ref.node, ref.service_id) for ref in deregister}
    nodes_in_use = {node for node, service_id in observed if (node, service_id) not in dropped}
    nodes_in_use |= {reg.node for reg in wanted}
    remove_nodes = tuple(node for node in state.mesh_nodes if node not in nodes_in_use)
    return SyncPlan(tuple(register), tuple(unchanged), deregister, remove_nodes)


def _needed_registration(reg: Registration, seen: ObservedInstance | None) -> dict[str, Any] | None:
    if seen is None:
        return register_body(reg, check_body(reg.ref, "critical", NOT_CHECKED_YET))
    same_node = seen.node_address == reg.address and all(
        seen.node_meta.get(key) == value for key, value in NODE_META.items())
    service = seen.service
    same_service = (service.get("Service") == reg.service and service.get("Address") == reg.address
                    and service.get("Port") == reg.port and dict(service.get("Meta") or {}) == dict(reg.meta))
    check = seen.check
    same_check = check is not None and check.get("Name") == CHECK_NAME
    if same_node and same_service and same_check:
        return None
    if same_check:  # leave the check alone: no race with the checker's writes
        return register_body(reg, None)
    kept = check_body(reg.ref, "critical", NOT_CHECKED_YET)
    if check is not None:
        kept.update(Status=check.get("Status", "critical"), Output=check.get("Output", ""))
    return register_body(reg, kept)


def sync(consul_url: str, mesh: Mesh) -> SyncResult:
    """Make the catalog hold exactly mesh's registrations; a second sync of the same mesh changes nothing."""
    log = structlog.get_logger()
    with _client(consul_url) as client:
        plan = plan_sync(registrations(mesh), read_state(client))
        for service_id, body in plan.register:
            _register(client, body)
            log.info("catalog_registered", service_id=service_id)
        for ref in plan.deregister:
            client.catalog.deregister(ref.node, service_id=ref.service_id)
            log.info("catalog_deregistered", service_id=ref.service_id, node=ref.node)
        for node in plan.remove_nodes:
            client.catalog.deregister(node)
            log.info("catalog_node_removed", node=node)
    return SyncResult(registered=tuple(service_id for service_id, _ in plan.register),
                      unchanged=plan.unchanged,
                      deregistered=tuple(ref.service_id for ref in plan.deregister),
                      removed_nodes=plan.remove_nodes)


def read_state(client: consul.Consul) -> CatalogState:
    """Every service instance with its node and mesh's check, and the nodes with NodeMeta managed-by=mesh."""
    _, names = client.catalog.services()
    instances: list[ObservedInstance] = []
    for name in sorted(names or {}):
        _, entries = client.health.service(name)
        instances.extend(_observed(entry) for entry in entries or [])
    _, nodes = client.catalog.nodes(node_meta={MANAGED_BY: MESH})
    return CatalogState(tuple(instances), tuple(str(node["Node"]) for node in nodes or []))


def _observed(entry: Mapping[str, Any]) -> ObservedInstance:
    node, service = entry["Node"], entry["Service"]
    check_id = CHECK_PREFIX + str(service.get("ID"))
    check = next((c for c in entry.get("Checks") or [] if c.get("CheckID") == check_id), None)
    return ObservedInstance(node=str(node["Node"]), node_address=str(node.get("Address", "")),
                            node_meta=MappingProxyType(dict(node.get("Meta") or {})),
                            service=MappingProxyType(dict(service)), check=check)


def set_health(consul_url: str, target: Registration | InstanceRef, status: Status, output: str) -> None:
    """Write an instance's check status by re-registering the check, as consul-esm does for external nodes.

    The node is not touched (SkipNodeUpdate); Consul refuses the write when the service is no longer
    registered, so a late write never brings back an instance a deploy removed.
    """
    ref = target.ref if isinstance(target, Registration) else target
    body = {"Node": ref.node, "SkipNodeUpdate": True, "Check": check_body(ref, status, output)}
    with _client(consul_url) as client:
        _register(client, body)


def service_health(consul_url: str, service: str) -> list[InstanceHealth]:
    """Every registered instance of a service with the worst status of its checks, sorted by service ID."""
    with _client(consul_url) as client:
        _, entries = client.health.service(service)
    return sorted((_instance_health(entry) for entry in entries or []), key=lambda item: item.service_id)


def _instance_health(entry: Mapping[str, Any]) -> InstanceHealth:
    node, svc = entry["Node"], entry["Service"]
    checks = list(entry.get("Checks") or [])
    worst = max(checks, key=lambda c: _SEVERITY.get(c.get("Status", "critical"), 2), default=None)
    status: Status = "passing" if worst is None else worst.get("Status", "critical")
    output = "" if worst is None else str(worst.get("Output", ""))
    return InstanceHealth(service_id=str(svc["ID"]), service=str(svc["Service"]), node=str(node["Node"]),
                          address=str(svc.get("Address") or node.get("Address", "")), port=int(svc["Port"]),
                          status=status, output=output, meta=MappingProxyType(dict(svc.get("Meta") or {})))


def _register(client: consul.Consul, body: Mapping[str, Any]) -> None:
    # py-consul's catalog.register sends NodeMeta as a query parameter, which /v1/catalog/register ignores;
    # the body carries it here, through py-consul's own HTTP client and error mapping.
    client.http.put(CB.boolean(), "/v1/catalog/register", data=json.dumps(body))


def connect(consul_url: str, timeout: float = REQUEST_TIMEOUT) -> consul.Consul:
    """A py-consul client for `http(s)://host:port`; refuses any other shape of URL."""
    parts = urlsplit(consul_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CatalogError(f"mesh_consul_url {consul_url!r} is not http(s)://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 8500)
    return consul.Consul(host=parts.hostname, port=port, scheme=parts.scheme, connections_timeout=timeout)


@contextmanager
def consul_errors(consul_url: str) -> Iterator[None]:
    """Turn connection failures and Consul's refusals into a CatalogError naming the URL."""
    try:
        yield
    except consul.ConsulException as exc:
        raise CatalogError(f"Consul at {consul_url} refused the request: {exc}") from exc
    except OSError as exc:  # requests' exceptions are OSErrors
        raise CatalogError(f"Consul is unreachable at {consul_url}: {_reason(exc)}") from exc


@contextmanager
def _client(consul_url: str) -> Iterator[consul.Consul]:
    client = connect(consul_url)
    try:
        with consul_errors(consul_url):
            yield client
    finally:
        client.http.close()


def _reason(exc: OSError) -> str:
    inner = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", inner)
    return str(reason).splitlines()[0] if str(reason) else type(exc).__name__
