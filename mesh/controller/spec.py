"""The controller's input: `spec.json`, what a deploy hands to every controller (the inventory is not there).

It owns the file's shape, its names and paths, parsing and writing it; it must not talk to Consul or hosts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mesh.errors import MeshError

# 2: traffic policies, route inputs, per-version endpoint files, zones; 3: inbound authz inputs; 4: the span
# receiver's and the loopback web server's ports, each proxy's version, kind, container and metrics address
SPEC_VERSION = 4
CONTROLLER_DIR = "/etc/mesh/controller"
SPEC_PATH = f"{CONTROLLER_DIR}/spec.json"
SSH_KEY = f"{CONTROLLER_DIR}/id_ed25519"  # made on the controller itself; only its .pub leaves the host
KNOWN_HOSTS = f"{CONTROLLER_DIR}/known_hosts"
CA_DIR = f"{CONTROLLER_DIR}/ca"
ROOT_CERT = f"{CA_DIR}/root.pem"
INTERMEDIATE_CERT = f"{CA_DIR}/intermediate.pem"
INTERMEDIATE_KEY = f"{CA_DIR}/intermediate.key"  # 0600, the controller's user's: never logged, never sent on
TOKEN_FILE = f"{CONTROLLER_DIR}/consul-token"
CONSUL_CA_FILE = f"{CONTROLLER_DIR}/consul-ca.pem"
CONTROLLER_USER = "mesh-controller"
CONTROLLER_UNIT = "mesh-controller.service"
DEFAULT_METRICS_PORT = 9190  # bound to the controller's loopback only
DEFAULT_WEB_PORT = 9191  # the dashboard and the traces API, bound to the controller's loopback only

# On every managed host: the account the controllers log in as, and what it may run (through sudo).
CTL_USER = "mesh-ctl"
CTL_HOME = "/var/lib/mesh-ctl"
CTL_SCRIPT = "/usr/local/lib/mesh/mesh-ctl"
CTL_IDENTITIES = "/etc/mesh/ctl/identities"
CTL_SUDOERS = "/etc/sudoers.d/mesh-ctl"
CTL_STAGING_NAME = ".ctl-staging"  # beside xds/ in the identity's home: one rename per file


def lock_key(mesh_id: str) -> str:
    """The controllers' Consul lock: one active controller per mesh."""
    return f"mesh/{mesh_id}/controller/leader"


def state_key(mesh_id: str) -> str:
    """What the active controller publishes: plan digest, per-proxy resource versions, certificates."""
    return f"mesh/{mesh_id}/controller/state"


def issued_prefix(mesh_id: str) -> str:
    """Leaves signed by controllers: `<prefix><serial>` -> JSON (host, proxy, spiffe_id, not_before, not_after)."""
    return f"mesh/{mesh_id}/ca/issued/"


def traffic_prefix(mesh_id: str) -> str:
    """Run-time traffic overrides: `<prefix><service>` -> mesh.inventory.services.override_to_json's JSON (written
    by `mesh route set` / `mesh fault set`, deleted by their `reset`); the controller applies them."""
    return f"mesh/{mesh_id}/traffic/"


def authz_prefix(mesh_id: str) -> str:
    """Run-time authorization denies: `<prefix><service>` -> mesh.inventory.services.authz_override_to_json's JSON
    (written by `mesh authz deny`, deleted by its `--undo`); the controller applies them to the service's proxies."""
    return f"mesh/{mesh_id}/authz/"


def xds_status_prefix(mesh_id: str) -> str:
    """Each controller's ADS streams: `<prefix><holder>` -> mesh.xds.status.publication's JSON (per proxy and
    resource type: synced, stale, NACKed), rewritten every few seconds while it serves ADS."""
    return f"mesh/{mesh_id}/controller/xds/"


def deploy_lock_key(mesh_id: str) -> str:
    """Held by a running deploy (mesh.deploy.lock): the controller pushes nothing meanwhile."""
    return f"mesh/{mesh_id}/deploy/lock"


class SpecError(MeshError):
    """A spec.json the controller refuses: names the file and the key, and what was expected."""


FileKind = Literal["bootstrap", "ads-bootstrap", "resource", "secret"]
IdentityKind = Literal["vm", "container", "checker"]


@dataclass(frozen=True)
class SpecFile:
    """One of a proxy's Envoy files as the plan rendered it (absolute path on the host)."""

    path: str
    kind: FileKind
    content: str = field(repr=False)


@dataclass(frozen=True)
class EndpointSource:
    """What fills one EDS file: the Consul instances of `service`, only those of `version` when it is set (the
    file of a version cluster `upstream-<service>.<version>`)."""

    service: str
    version: str | None = None


@dataclass(frozen=True)
class ProxySpec:
    """One proxy: its files as planned, which endpoint files the controller fills from Consul, which route files it
    recomputes from the traffic policy and overrides, where its host is (endpoint priorities), and which inbound
    files it recomputes from the service's authorization rules and run-time deny."""

    name: str
    service: str
    proxy_dir: str
    bootstrap_sha256: str
    files: tuple[SpecFile, ...]  # in the plan's move order; the bootstrap last
    endpoints: Mapping[str, EndpointSource]  # eds file path -> the instances that fill it
    # rds file path -> mesh.config.traffic.RouteInputs.to_json(): what redoes the file (every outbound HTTP listener)
    routes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    zone: str | None = None  # its host's mesh_zone / mesh_region
    region: str | None = None
    # inbound file path -> {"kind": mesh.render.InboundFileKind, "inputs": mesh.config.authz.InboundInputs.to_json()}:
    # what redoes the file (the inbound route of an HTTP service, the RBAC filter files of a TCP one)
    inbound: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version: str = ""  # the workload's version (the inventory's `version`)
    kind: IdentityKind = "vm"  # "vm" or "container" (never "checker")
    container: str | None = None  # on a container host: the app's container
    metrics: str | None = None  # "ADDRESS:PORT" of its Prometheus listener (mesh.telemetry.targets), what is scraped
    node_id: str = ""  # Envoy's node.id (the Consul service ID): the DNS SAN of its leaf, its ADS stream's name
    delivery: str = "files"  # mesh_delivery of its host: "files" or "xds" (mesh.config.xds.Delivery)


@dataclass(frozen=True)
class IdentitySpec:
    """A certificate the controller renews on this host (a line of the host's /etc/mesh/ctl/identities)."""

    name: str  # the proxy's name, or `checker`
    kind: IdentityKind
    spiffe_id: str
    node_id: str = ""  # a proxy's node id (its leaf's DNS SAN); empty for the checker


@dataclass(frozen=True)
class HostSpec:
    """A managed host as the controller reaches it: as CTL_USER with its own key, host key checked."""

    name: str
    address: str
    port: int
    known_hosts: tuple[str, ...]  # known_hosts lines for this host (as the deploy checked it)
    identities: tuple[IdentitySpec, ...]
    proxies: tuple[ProxySpec, ...]
    user: str = CTL_USER


@dataclass(frozen=True)
class ControllerSpec:
    mesh_id: str
    trust_domain: str
    plan_digest: str
    consul_url: str
    consul_token_file: str | None  # on the controller (TOKEN_FILE) when the inventory names a token
    consul_ca_file: str | None
    cert_ttl_s: int
    hosts: tuple[HostSpec, ...]
    renew_fraction: float = 0.5
    session_ttl_s: int = 10
    metrics_port: int = DEFAULT_METRICS_PORT
    debounce_ms: int = 50
    trace_port: int = 0  # the span receiver's port (mesh.config.tracing.TRACE_PORT) on mesh's collector; 0: none
    web_port: int = DEFAULT_WEB_PORT
    # service -> mesh.inventory.services.policy_to_json of its inventory policy (services without one: absent)
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version: int = SPEC_VERSION

    @property
    def lock_key(self) -> str:
        return lock_key(self.mesh_id)

    @property
    def state_key(self) -> str:
        return state_key(self.mesh_id)

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def to_json(self) -> str:
        """Deterministic text (sorted keys): equal specs make equal files, so a deploy rewrites it only on change."""
        return json.dumps(asdict(self), sort_keys=True, indent=1) + "\n"


def parse_spec(text: str, origin: str = SPEC_PATH) -> ControllerSpec:
    """The spec in `text`; SpecError naming `origin` and the key when it is not one this mesh wrote."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SpecError(f"{origin}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected an object")
    if data.get("version") != SPEC_VERSION:
        raise SpecError(f"{origin}: version: expected {SPEC_VERSION}, got {data.get('version')!r}",
                        "deploy again with this mesh version")
    try:
        hosts = tuple(_host(item) for item in data["hosts"])
        return ControllerSpec(
            mesh_id=str(data["mesh_id"]), trust_domain=str(data["trust_domain"]),
            plan_digest=str(data["plan_digest"]), consul_url=str(data["consul_url"]),
            consul_token_file=_optional(data["consul_token_file"]), consul_ca_file=_optional(data["consul_ca_file"]),
            cert_ttl_s=int(data["cert_ttl_s"]), hosts=hosts, renew_fraction=float(data["renew_fraction"]),
            session_ttl_s=int(data["session_ttl_s"]), metrics_port=int(data["metrics_port"]),
            debounce_ms=int(data["debounce_ms"]), trace_port=_port(data["trace_port"], "trace_port", zero=True),
            web_port=_port(data["web_port"], "web_port"), policies=_policies(data["policies"]))
    except SpecError as exc:
        raise SpecError(f"{origin}: {exc}") from None
    except KeyError as exc:
        raise SpecError(f"{origin}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"{origin}: malformed: {exc}") from None


def load_spec(path: str = SPEC_PATH) -> ControllerSpec:
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_spec(handle.read(), path)
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from None


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def _port(value: Any, key: str, zero: bool = False) -> int:
    """A TCP port (0 too when `zero`: the thing is off)."""
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if zero else 1) <= value <= 65535:
        raise SpecError(f"{key}: expected a port{' or 0' if zero else ''}, got {value!r}")
    return value


def _host(data: Mapping[str, Any]) -> HostSpec:
    return HostSpec(
        name=str(data["name"]), address=str(data["address"]), port=int(data["port"]),
        known_hosts=tuple(str(line) for line in data["known_hosts"]),
        identities=tuple(IdentitySpec(str(item["name"]), item["kind"], str(item["spiffe_id"]),
                                      str(item.get("node_id", "")))
                         for item in data["identities"]),
        proxies=tuple(_proxy(item) for item in data["proxies"]), user=str(data["user"]))


def _proxy(data: Mapping[str, Any]) -> ProxySpec:
    name = str(data["name"])
    return ProxySpec(
        name=name, service=str(data["service"]), proxy_dir=str(data["proxy_dir"]),
        bootstrap_sha256=str(data["bootstrap_sha256"]),
        files=tuple(SpecFile(str(item["path"]), item["kind"], str(item["content"])) for item in data["files"]),
        endpoints={str(path): _endpoint_source(name, str(path), source)
                   for path, source in dict(data["endpoints"]).items()},
        routes={str(path): _route_inputs(name, str(path), inputs) for path, inputs in dict(data["routes"]).items()},
        zone=_optional(data["zone"]), region=_optional(data["region"]),
        inbound={str(path): _inbound(name, str(path), entry) for path, entry in dict(data["inbound"]).items()},
        version=str(data["version"]), kind=_proxy_kind(name, data["kind"]), container=_optional(data["container"]),
        metrics=_optional(data["metrics"]), node_id=str(data.get("node_id", "")),
        delivery=_delivery(name, data.get("delivery", "files")))


def _delivery(proxy: str, value: Any) -> str:
    """A proxy's mesh_delivery; a spec written before xDS delivery has none: files."""
    if value in ("files", "xds"):
        return str(value)
    raise SpecError(f"proxies[{proxy}].delivery: expected files or xds, got {value!r}")


def _proxy_kind(proxy: str, value: Any) -> IdentityKind:
    if value == "vm" or value == "container":
        return "vm" if value == "vm" else "container"
    raise SpecError(f"proxies[{proxy}].kind: expected vm or container, got {value!r}")


def _endpoint_source(proxy: str, path: str, data: Any) -> EndpointSource:
    if not isinstance(data, dict) or not isinstance(data.get("service"), str) \
            or not isinstance(data.get("version"), str | None) or set(data) != {"service", "version"}:
        raise SpecError(f"proxies[{proxy}].endpoints[{path}]: expected {{\"service\": NAME, \"version\": NAME or "
                        f"null}}, got {data!r}")
    return EndpointSource(data["service"], data["version"])


def _route_inputs(proxy: str, path: str, data: Any) -> Mapping[str, Any]:
    """The JSON of a RouteInputs, checked by reading it (kept as JSON: the spec's text is what the deploy wrote)."""
    from mesh.config.traffic import RouteInputs

    where = f"proxies[{proxy}].routes[{path}]"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected an object, got {data!r}")
    try:
        RouteInputs.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: not route inputs this mesh wrote: {exc!r}") from None
    return data


INBOUND_KINDS = ("route", "tcp-deny", "tcp-allow")


def _inbound(proxy: str, path: str, data: Any) -> Mapping[str, Any]:
    """{"kind", "inputs"}: a kind of INBOUND_KINDS and the JSON of an InboundInputs, checked by reading it."""
    from mesh.config.authz import InboundInputs

    where = f"proxies[{proxy}].inbound[{path}]"
    if not isinstance(data, dict) or set(data) != {"kind", "inputs"} or data["kind"] not in INBOUND_KINDS \
            or not isinstance(data["inputs"], dict):
        raise SpecError(f"{where}: expected {{\"kind\": one of {', '.join(INBOUND_KINDS)}, \"inputs\": {{...}}}}, "
                        f"got {data!r}")
    try:
        InboundInputs.from_json(data["inputs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: not inbound inputs this mesh wrote: {exc!r}") from None
    return data


def _policies(data: Any) -> dict[str, Mapping[str, Any]]:
    """service -> its policy's JSON, each checked by reading it (policy_from_json)."""
    from mesh.inventory.services import policy_from_json

    if not isinstance(data, dict):
        raise SpecError(f"policies: expected an object, got {data!r}")
    for service, policy in data.items():
        if not isinstance(policy, dict):
            raise SpecError(f"policies[{service}]: expected an object, got {policy!r}")
        try:
            policy_from_json(policy)
        except (MeshError, KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"policies[{service}]: not a policy this mesh wrote: {exc}") from None
    return {str(service): policy for service, policy in data.items()}
