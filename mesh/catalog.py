"""Consul's catalog as mesh sees it: the registrations an inventory implies, syncing them, health in and out.

It owns the Consul shapes (external nodes, service IDs, Meta with the mesh id, checks) and how mesh reaches
Consul (token, CA, the token check first); it must not probe or render, and reads no file but the token's.
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
MESH_ID = "mesh-id"
DEFAULT_MESH_ID = "mesh.local"  # the default trust domain, as MeshSettings has it
CHECK_PREFIX = "mesh-health:"
CHECK_NAME = "mesh health (through Envoy)"
# `mesh drain`'s own check: critical while an instance is drained; nothing else in mesh writes or removes it
# (the checker writes only CHECK_PREFIX checks, a sync never sends it), so a re-deploy keeps the drain.
DRAIN_PREFIX = "mesh-drain:"
DRAIN_NAME = "mesh drain (no traffic until `mesh drain --undo`)"
NOT_CHECKED_YET = "not checked yet by mesh's health checker"
NODE_META: Mapping[str, str] = MappingProxyType(
    {"external-node": "true", "external-probe": "false", MANAGED_BY: MESH}
)
REQUEST_TIMEOUT = 10.0
_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}


class CatalogError(MeshError):
    """Consul could not be reached or refused a request (exit 1); the message names the URL."""


class TokenRefused(CatalogError):
    """Consul refused mesh's ACL token (or wants one and none was given); the message never holds the token."""


@dataclass(frozen=True)
class ConsulAccess:
    """How mesh reaches Consul: the URL, the ACL token (never shown, not even in repr) and the CA bundle that
    verifies an https:// URL (None: the system's CAs).

    >>> access = ConsulAccess("https://consul:8501", token=read_token("/etc/mesh/checker/consul-token"),
    ...                       ca_file="/etc/mesh/checker/consul-ca.pem")
    """

    url: str
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None


Consul = str | ConsulAccess  # a bare URL is a ConsulAccess with no token and the system's CAs


def as_access(consul_: Consul) -> ConsulAccess:
    return consul_ if isinstance(consul_, ConsulAccess) else ConsulAccess(consul_)


def read_token(path: str) -> str:
    """The ACL token held in a file (surrounding whitespace dropped); the error names the file, never its
    content."""
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise CatalogError(f"cannot read the Consul token file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"the Consul token file {path} is not text") from exc
    if not token or any(char.isspace() or not char.isprintable() for char in token):
        raise CatalogError(f"the Consul token file {path} must hold one token on one line")
    return token


def access_for(mesh: Mesh) -> ConsulAccess:
    """The mesh's Consul access: mesh_consul_url, the token read from mesh_consul_token_file (on this
    machine), mesh_consul_ca_file."""
    settings = mesh.settings
    if not settings.consul_url:
        raise CatalogError("mesh_consul_url is not set")
    token = read_token(settings.consul_token_file) if settings.consul_token_file else None
    return ConsulAccess(settings.consul_url, token, settings.consul_ca_file)


@dataclass(frozen=True)
class InstanceRef:
    """Enough to address one instance's check in the catalog: its node and service ID."""

    node: str
    service_id: str

    @property
    def check_id(self) -> str:
        return CHECK_PREFIX + self.service_id

    @property
    def drain_check_id(self) -> str:
        return DRAIN_PREFIX + self.service_id


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
    drained: bool = False  # `mesh drain` holds it out (its DRAIN_PREFIX check), whatever its other checks say


@dataclass(frozen=True)
class SyncResult:
    """Service IDs registered (new or changed), unchanged and deregistered; external nodes removed; and what
    was left alone because another mesh id owns it (each a sentence naming the node or service)."""

    registered: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deregistered: tuple[str, ...] = ()
    removed_nodes: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()

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
    """The part of the catalog a sync compares with: every service instance, the nodes mesh created, and which
    mesh id owns each of those nodes (NodeMeta mesh-id; empty for nodes mesh made before mesh ids)."""

    instances: tuple[ObservedInstance, ...] = ()
    mesh_nodes: tuple[str, ...] = ()
    node_owners: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SyncPlan:
    """What a sync must do: register bodies (by service ID), deregister refs, remove nodes; and the wanted
    instances it must not register because another mesh id owns their node or service ID."""

    register: tuple[tuple[str, Mapping[str, Any]], ...]
    unchanged: tuple[str, ...]
    deregister: tuple[InstanceRef, ...]
    remove_nodes: tuple[str, ...]
    conflicts: tuple[str, ...] = ()


def registrations(mesh: Mesh) -> list[Registration]:
    """Every workload instance of every managed host, in inventory order. Pure."""
    result = []
    mesh_id = mesh.settings.id
    for host in mesh.hosts:
        for workload in host.workloads:
            meta = {"version": workload.version, "host": host.name, "kind": host.consul_kind,
                    MANAGED_BY: MESH, MESH_ID: mesh_id}
            # Where the host is (mesh_zone, mesh_region), when set: callers prefer their own zone, then region.
            meta.update({key: value for key, value in (("zone", host.zone), ("region", host.region)) if value})
            result.append(Registration(
                node=host.name, address=host.connection.address, service_id=workload.consul_id,
                service=workload.service, port=workload.proxy_port, meta=MappingProxyType(meta)))
    return result


def node_meta(mesh_id: str) -> dict[str, str]:
    """The NodeMeta of an external node mesh registers for one mesh."""
    return {**NODE_META, MESH_ID: mesh_id}


def owner(meta: Mapping[str, Any] | None) -> str | None:
    """The mesh id owning a node or service by its Meta: None when mesh did not register it; a registration of
    mesh before mesh ids (managed-by=mesh, no mesh-id) belongs to any mesh that still lists it."""
    meta = meta or {}
    if meta.get(MANAGED_BY) != MESH:
        return None
    return str(meta.get(MESH_ID) or "")


def check_body(ref: InstanceRef, status: Status, output: str) -> dict[str, Any]:
    """The Check of /v1/catalog/register for an instance, with the given status (as consul-esm writes it)."""
    return {"Node": ref.node, "CheckID": ref.check_id, "Name": CHECK_NAME, "ServiceID": ref.service_id,
            "Status": status, "Output": output}


def register_body(registration: Registration, check: Mapping[str, Any] | None) -> dict[str, Any]:
    """A full /v1/catalog/register body: the external node, its service and (when given) the check."""
    mesh_id = registration.meta.get(MESH_ID, DEFAULT_MESH_ID)
    body: dict[str, Any] = {"Node": registration.node, "Address": registration.address,
                            "NodeMeta": node_meta(mesh_id), "Service": registration.service_body()}
    if check is not None:
        body["Check"] = dict(check)
    return body


def plan_sync(wanted: Sequence[Registration], state: CatalogState, mesh_id: str = DEFAULT_MESH_ID) -> SyncPlan:
    """Compare the wanted registrations with the catalog. Pure.

    A changed or new instance is re-registered; an existing check keeps its status and output, so a re-deploy
    never flaps an instance the checker found healthy (the checker corrects a stale status within one round).
    Only services with Meta managed-by=mesh and this mesh id are ever deregistered, and only nodes this mesh
    id created are removed. A wanted instance whose node or service ID another mesh id owns is not
    registered: it is a conflict, reported.
    """
    observed = {(item.node, str(item.service.get("ID"))): item for item in state.instances}
    wanted_keys = {(reg.node, reg.service_id) for reg in wanted}
    register: list[tuple[str, Mapping[str, Any]]] = []
    unchanged: list[str] = []
    conflicts: list[str] = []
    for reg in wanted:
        seen = observed.get((reg.node, reg.service_id))
        conflict = _foreign(reg, seen, state, mesh_id)
        if conflict:
            conflicts.append(conflict)
            continue
        body = _needed_registration(reg, seen)
        if body is None:
            unchanged.append(reg.service_id)
        else:
            register.append((reg.service_id, body))
    deregister = tuple(
        InstanceRef(node, service_id) for (node, service_id), item in observed.items()
        if (node, service_id) not in wanted_keys and owner(item.service.get("Meta")) == mesh_id)
    dropped = {(ref.node, ref.service_id) for ref in deregister}
    nodes_in_use = {node for node, service_id in observed if (node, service_id) not in dropped}
    nodes_in_use |= {reg.node for reg in wanted}
    remove_nodes = tuple(node for node in state.mesh_nodes
                         if node not in nodes_in_use and state.node_owners.get(node) == mesh_id)
    return SyncPlan(tuple(register), tuple(unchanged), deregister, remove_nodes, tuple(conflicts))


def _foreign(reg: Registration, seen: ObservedInstance | None, state: CatalogState, mesh_id: str) -> str | None:
    """Why another mesh id owns what this registration would write, or None."""
    node_owner = state.node_owners.get(reg.node)
    if node_owner and node_owner != mesh_id:
        return (f"{reg.service_id}: not registered, its node {reg.node} belongs to the mesh id {node_owner!r} "
                f"(this is {mesh_id!r}): rename the host or use another Consul")
    service_owner = owner(seen.service.get("Meta")) if seen is not None else None
    if service_owner and service_owner != mesh_id:
        return (f"{reg.service_id}: not registered, the service ID on node {reg.node} belongs to the mesh id "
                f"{service_owner!r} (this is {mesh_id!r})")
    return None


def _needed_registration(reg: Registration, seen: ObservedInstance | None) -> dict[str, Any] | None:
    if seen is None:
        return register_body(reg, check_body(reg.ref, "critical", NOT_CHECKED_YET))
    same_node = seen.node_address == reg.address and all(
        seen.node_meta.get(key) == value
        for key, value in node_meta(reg.meta.get(MESH_ID, DEFAULT_MESH_ID)).items())
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


def sync(consul_: Consul, mesh: Mesh, wanted: Sequence[Registration] | None = None) -> SyncResult:
    """Make the catalog hold exactly mesh's registrations (`wanted`: the deploy plan's, by default computed
    from mesh); a second sync of the same mesh changes nothing. Checks the token first (TokenRefused); never
    touches what another mesh id owns."""
    log = structlog.get_logger()
    with _client(consul_) as client:
        plan = plan_sync(registrations(mesh) if wanted is None else list(wanted), read_state(client),
                         mesh.settings.id)
        for service_id, body in plan.register:
            _register(client, body)
            log.info("catalog_registered", service_id=service_id)
        for ref in plan.deregister:
            _deregister(client, {"Node": ref.node, "ServiceID": ref.service_id})
            log.info("catalog_deregistered", service_id=ref.service_id, node=ref.node)
        for node in plan.remove_nodes:
            _deregister(client, {"Node": node})
            log.info("catalog_node_removed", node=node)
    return SyncResult(registered=tuple(service_id for service_id, _ in plan.register),
                      unchanged=plan.unchanged,
                      deregistered=tuple(ref.service_id for ref in plan.deregister),
                      removed_nodes=plan.remove_nodes, conflicts=plan.conflicts)


def plan(consul_: Consul, mesh: Mesh) -> SyncPlan:
    """What sync would do, changing nothing (deploy's check mode). Checks the token first."""
    with _client(consul_) as client:
        return plan_sync(registrations(mesh), read_state(client), mesh.settings.id)


def read_state(client: consul.Consul) -> CatalogState:
    """Every service instance with its node and mesh's check, and the nodes with NodeMeta managed-by=mesh
    with their mesh ids."""
    _, names = client.catalog.services()
    instances: list[ObservedInstance] = []
    for name in sorted(names or {}):
        _, entries = client.health.service(name)
        instances.extend(_observed(entry) for entry in entries or [])
    _, nodes = client.catalog.nodes(node_meta={MANAGED_BY: MESH})
    owners = {str(node["Node"]): owner(node.get("Meta")) or "" for node in nodes or []}
    return CatalogState(tuple(instances), tuple(owners), MappingProxyType(owners))


def _observed(entry: Mapping[str, Any]) -> ObservedInstance:
    node, service = entry["Node"], entry["Service"]
    check_id = CHECK_PREFIX + str(service.get("ID"))
    check = next((c for c in entry.get("Checks") or [] if c.get("CheckID") == check_id), None)
    return ObservedInstance(node=str(node["Node"]), node_address=str(node.get("Address", "")),
                            node_meta=MappingProxyType(dict(node.get("Meta") or {})),
                            service=MappingProxyType(dict(service)), check=check)


def set_health(consul_: Consul, target: Registration | InstanceRef, status: Status, output: str) -> None:
    """Write an instance's check status by re-registering the check, as consul-esm does for external nodes.

    The node is not touched (SkipNodeUpdate); Consul refuses the write when the service is no longer
    registered, so a late write never brings back an instance a deploy removed.
    """
    ref = target.ref if isinstance(target, Registration) else target
    body = {"Node": ref.node, "SkipNodeUpdate": True, "Check": check_body(ref, status, output)}
    with _client(consul_, check=False) as client:  # the checker checks its token when it takes the lock
        _register(client, body)


@dataclass(frozen=True)
class DrainState:
    """One registered instance of a service as `mesh drain` sees it: who owns it, and its drain check if any."""

    ref: InstanceRef
    owner: str | None  # the mesh id of its Meta (None: not registered by mesh)
    drain: Mapping[str, Any] | None  # the instance's DRAIN_PREFIX check while it is drained


def drain_check_body(ref: InstanceRef, output: str) -> dict[str, Any]:
    """The critical Check that keeps an instance out of every caller's endpoints while it is drained."""
    return {"Node": ref.node, "CheckID": ref.drain_check_id, "Name": DRAIN_NAME, "ServiceID": ref.service_id,
            "Status": "critical", "Output": output}


def drain_states(consul_: Consul, service: str) -> dict[str, DrainState]:
    """Every registered instance of `service` by service ID, with its drain check. Checks the token first."""
    with _client(consul_) as client:
        _, entries = client.health.service(service)
    states = {}
    for entry in entries or []:
        svc = entry["Service"]
        ref = InstanceRef(str(entry["Node"]["Node"]), str(svc["ID"]))
        check = next((c for c in entry.get("Checks") or [] if c.get("CheckID") == ref.drain_check_id), None)
        states[ref.service_id] = DrainState(ref, owner(svc.get("Meta")), check)
    return states


def set_drain(consul_: Consul, ref: InstanceRef, output: str) -> None:
    """Register (or rewrite) the instance's drain check, critical; the node and service are not touched."""
    with _client(consul_, check=False) as client:
        _register(client, {"Node": ref.node, "SkipNodeUpdate": True, "Check": drain_check_body(ref, output)})


def clear_drain(consul_: Consul, ref: InstanceRef) -> None:
    """Remove the instance's drain check, and only it (its service and mesh's health check stay)."""
    with _client(consul_, check=False) as client:
        _deregister(client, {"Node": ref.node, "CheckID": ref.drain_check_id})


def service_health(consul_: Consul, service: str, mesh_id: str | None = None) -> list[InstanceHealth]:
    """Every registered instance of a service with the worst status of its checks, sorted by service ID;
    with a mesh_id, only the instances that mesh id owns. Checks the token first."""
    return services_health(consul_, [service], mesh_id)[service]


def services_health(consul_: Consul, services: Sequence[str],
                    mesh_id: str | None = None) -> dict[str, list[InstanceHealth]]:
    """service_health of several services over one connection (one token check)."""
    found: dict[str, list[InstanceHealth]] = {}
    with _client(consul_) as client:
        for service in services:
            _, entries = client.health.service(service)
            healths = (_instance_health(entry) for entry in entries or [])
            found[service] = sorted((item for item in healths if mesh_id is None or owner(item.meta) == mesh_id),
                                    key=lambda item: item.service_id)
    return found


def _instance_health(entry: Mapping[str, Any]) -> InstanceHealth:
    node, svc = entry["Node"], entry["Service"]
    checks = list(entry.get("Checks") or [])
    worst = max(checks, key=lambda c: _SEVERITY.get(c.get("Status", "critical"), 2), default=None)
    status: Status = "passing" if worst is None else worst.get("Status", "critical")
    output = "" if worst is None else str(worst.get("Output", ""))
    drained = any(str(check.get("CheckID", "")).startswith(DRAIN_PREFIX) for check in checks)
    return InstanceHealth(service_id=str(svc["ID"]), service=str(svc["Service"]), node=str(node["Node"]),
                          address=str(svc.get("Address") or node.get("Address", "")), port=int(svc["Port"]),
                          status=status, output=output, meta=MappingProxyType(dict(svc.get("Meta") or {})),
                          drained=drained)


def _register(client: consul.Consul, body: Mapping[str, Any]) -> None:
    # py-consul's catalog.register sends NodeMeta (and the token) as query parameters, and /v1/catalog/register
    # ignores NodeMeta there; the body carries it here, the token a header, through py-consul's own HTTP client.
    client.http.put(CB.boolean(), "/v1/catalog/register", data=json.dumps(body),
                    headers=client.prepare_headers())


def _deregister(client: consul.Consul, body: Mapping[str, Any]) -> None:
    # py-consul's catalog.deregister adds a body field Consul 1.8 refuses ("WriteRequest") once a token is set.
    client.http.put(CB.boolean(), "/v1/catalog/deregister", data=json.dumps(body),
                    headers=client.prepare_headers())


def connect(consul_: Consul, timeout: float = REQUEST_TIMEOUT) -> consul.Consul:
    """A py-consul client for `http(s)://host:port` sending the token (X-Consul-Token) and verifying https
    against the access's CA file; refuses any other shape of URL."""
    access = as_access(consul_)
    parts = urlsplit(access.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CatalogError(f"mesh_consul_url {access.url!r} is not http(s)://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 8500)
    verify: bool | str = access.ca_file or True
    client = consul.Consul(host=parts.hostname, port=port, scheme=parts.scheme, verify=verify,
                           connections_timeout=timeout)
    client.token = access.token  # py-consul would let CONSUL_HTTP_TOKEN win over the inventory's token
    return client


def check_token(client: consul.Consul, consul_: Consul) -> None:
    """Ask Consul whom the token belongs to (`GET /v1/acl/token/self`), since with a default-deny policy a
    refused token only filters reads silently. ACLs disabled is fine; a refusal raises TokenRefused."""
    access = as_access(consul_)
    try:
        client.acl.token.read_self()
    except consul.ACLDisabled:
        return
    except consul.ACLPermissionDenied as exc:
        given = ("the token of mesh_consul_token_file" if access.token
                 else "no token (mesh_consul_token_file is not set) and Consul enforces ACLs")
        raise TokenRefused(f"Consul refused the token at {access.url}: {_first_line(exc) or 'permission denied'} "
                           f"({given})",
                           hint="check that mesh_consul_token_file holds a token Consul knows, with the policy "
                                "the README gives") from exc


@contextmanager
def consul_errors(consul_: Consul) -> Iterator[None]:
    """Turn connection failures and Consul's refusals into a CatalogError naming the URL."""
    url = as_access(consul_).url
    try:
        yield
    except consul.ACLPermissionDenied as exc:
        raise CatalogError(f"Consul at {url} denied the request (the token's policy does not allow it): "
                           f"{_first_line(exc)}") from exc
    except consul.ConsulException as exc:
        raise CatalogError(f"Consul at {url} refused the request: {exc}") from exc
    except OSError as exc:  # requests' exceptions are OSErrors
        raise CatalogError(f"Consul is unreachable at {url}: {_reason(exc)}") from exc


@contextmanager
def _client(consul_: Consul, check: bool = True) -> Iterator[consul.Consul]:
    client = connect(consul_)
    try:
        with consul_errors(consul_):
            if check:
                check_token(client, consul_)
            yield client
    finally:
        client.http.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _reason(exc: OSError) -> str:
    inner = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", inner)
    return str(reason).splitlines()[0] if str(reason) else type(exc).__name__


@contextmanager
def client_for(consul_: Consul) -> Iterator[consul.Consul]:
    """A client for mesh's own keys (`mesh/<mesh_id>/...`); errors come as CatalogError naming the URL."""
    with _client(consul_, check=False) as client:
        yield client
