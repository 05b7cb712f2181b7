"""The mesh as the inventory describes it: typed, frozen, validated objects (settings, hosts, workloads).

It owns the shapes and what follows from them (SPIFFE ids, Consul ids); it must not read files or validate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Literal

from mesh.inventory.policy import NO_POLICY, AuthzDefault, ServicePolicy

HostKind = Literal["vm", "container_host"]
Protocol = Literal["http", "http2", "grpc", "tcp"]
HealthKind = Literal["http", "grpc", "tcp"]

CONTROLLERS_GROUP = "mesh_controllers"
PROXY_PORT_BASE = 21000
ADMIN_PORT_BASE = 19000
METRICS_PORT_BASE = 20000


def spiffe_id(trust_domain: str, service: str) -> str:
    """The SPIFFE id of a service's workloads: `spiffe://<trust_domain>/svc/<service>`."""
    return f"spiffe://{trust_domain}/svc/{service}"


def health_checker_spiffe_id(trust_domain: str) -> str:
    """The SPIFFE id of mesh's own health checker."""
    return f"spiffe://{trust_domain}/mesh/health"


def controller_spiffe_id(trust_domain: str) -> str:
    """The SPIFFE id of mesh's controllers as servers (their span receiver's certificate)."""
    return f"spiffe://{trust_domain}/mesh/controller"


Collector = Literal["mesh", "zipkin", "otlp"]


@dataclass(frozen=True)
class TracingSettings:
    """`mesh_tracing`: where every proxy sends its spans and what share of requests it traces.

    collector "mesh": the controllers' span receivers (no URL); "zipkin": an outside Zipkin collector (Zipkin JSON
    v2 over HTTP); "otlp": an outside OpenTelemetry collector (OTLP/HTTP). url is the outside collector's URL as
    written, split into scheme, host, port and path (the collector's endpoint; None when the URL names none: the
    collector's default, mesh.config.tracing's ZIPKIN_PATH or OTLP_PATH)."""

    collector: Collector
    sampling: float  # percent 0..100
    url: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None


@dataclass(frozen=True)
class MeshSettings:
    """Mesh-wide settings: the same on every host of the inventory."""

    trust_domain: str = "mesh.local"
    consul_url: str | None = None
    state_dir: str = ".mesh"  # absolute: resolved against the inventory's folder
    cert_ttl: timedelta = timedelta(hours=24)
    cert_renew_fraction: float = 0.5  # the controller renews a leaf this far into its lifetime
    known_hosts: str = "~/.ssh/known_hosts"
    mesh_id: str | None = None  # None: the trust domain
    consul_token_file: str | None = None  # absolute, like state_dir; read only when Consul is called
    consul_ca_file: str | None = None  # absolute; verifies an https:// consul_url
    authz_default: AuthzDefault = "declared"  # mesh_authz_default: who may call a service no rule covers
    tracing: TracingSettings | None = None  # mesh_tracing: None, no tracer in any Envoy

    @property
    def id(self) -> str:
        """`mesh_id`, or the trust domain when it is not set: the mesh's name in a shared Consul."""
        return self.mesh_id or self.trust_domain

    @property
    def cert_ttl_seconds(self) -> int:
        return int(self.cert_ttl.total_seconds())


@dataclass(frozen=True)
class Connection:
    """How mesh reaches a host over SSH (or runs locally), from Ansible's own connection variables."""

    address: str
    port: int = 22
    user: str | None = None  # None: the current user, as Ansible does
    private_key_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_common_args: str = ""
    ssh_extra_args: str = ""
    proxy_jump: str | None = None
    strict_host_key_checking: bool = True
    become: bool = False
    become_user: str = "root"
    local: bool = False


@dataclass(frozen=True)
class Upstream:
    """A service the app reaches at 127.0.0.1:local_port."""

    service: str
    local_port: int


@dataclass(frozen=True)
class Health:
    """How mesh's checker (and Envoy) decide that the app itself answers."""

    kind: HealthKind = "tcp"
    http_path: str | None = None
    interval: timedelta = timedelta(seconds=5)
    timeout: timedelta = timedelta(seconds=5)


@dataclass(frozen=True)
class Workload:
    """One item of a host's `mesh_workloads`: an app instance and its Envoy."""

    host: str
    index: int
    service: str
    port: int
    trust_domain: str
    version: str = "v1"
    protocol: Protocol = "http"
    container: str | None = None
    health: Health = field(default_factory=Health)
    upstreams: tuple[Upstream, ...] = ()
    proxy_port: int = PROXY_PORT_BASE
    admin_port: int = ADMIN_PORT_BASE
    metrics_port: int = METRICS_PORT_BASE  # Prometheus stats of its proxy (GET /stats/prometheus only)

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.trust_domain, self.service)

    @property
    def key(self) -> str:
        """What identifies this workload on its host, whatever its position in `mesh_workloads`: the app
        container on a container host (one sidecar per service and container), the app port on a VM (one
        process listens on a port). Proxy names, users and Consul IDs are built from it."""
        return self.container if self.container else str(self.port)

    @property
    def consul_id(self) -> str:
        """The Consul service ID: `<service>-<host>-<key>` (stable when the host's workloads are reordered)."""
        return f"{self.service}-{self.host}-{self.key}"


@dataclass(frozen=True)
class ManagedHost:
    """A host mesh deploys to: it has workloads or is in `mesh_controllers`."""

    name: str
    kind: HostKind
    connection: Connection
    workloads: tuple[Workload, ...] = ()
    is_controller: bool = False
    zone: str | None = None  # mesh_zone: callers prefer instances in their own zone, then region
    region: str | None = None  # mesh_region
    delivery: Literal["files", "xds"] = "files"  # mesh_delivery (mesh.config.xds.Delivery)

    @property
    def consul_kind(self) -> str:
        """The `kind` Meta of this host's Consul registrations: `vm` or `container`."""
        return "vm" if self.kind == "vm" else "container"


@dataclass(frozen=True)
class Mesh:
    """The validated mesh: settings, managed hosts in inventory order, controllers, services and instances."""

    settings: MeshSettings
    hosts: tuple[ManagedHost, ...] = ()
    unmanaged_hosts: tuple[str, ...] = ()
    services: Mapping[str, tuple[Workload, ...]] = field(default_factory=lambda: MappingProxyType({}))
    metrics_scrapers: tuple[str, ...] = ()  # addresses of `mesh_metrics_scrapers` hosts, as written, deduplicated
    policies: Mapping[str, ServicePolicy] = field(default_factory=lambda: MappingProxyType({}))  # mesh_services

    def policy(self, service: str) -> ServicePolicy:
        """The inventory's policy of `service` (mesh_services), the empty policy when it names none."""
        return self.policies.get(service, NO_POLICY)

    def versions(self, service: str) -> tuple[str, ...]:
        """The versions of `service` some host runs, sorted."""
        return tuple(sorted({workload.version for workload in self.services.get(service, ())}))

    @property
    def controllers(self) -> tuple[ManagedHost, ...]:
        return tuple(host for host in self.hosts if host.is_controller)

    @property
    def metrics_sources(self) -> tuple[str, ...]:
        """The only addresses that may reach a proxy's metrics port: the scrapers, then the controllers."""
        return tuple(dict.fromkeys((*self.metrics_scrapers, *(host.connection.address for host in self.controllers))))

    @property
    def xds_sources(self) -> tuple[str, ...]:
        """The only addresses that may reach a controller's ADS port (when some host is on `mesh_delivery: xds`):
        every host with workloads, in inventory order; empty when no host is on xds."""
        if not any(host.delivery == "xds" for host in self.hosts):
            return ()
        return tuple(dict.fromkeys(host.connection.address for host in self.hosts if host.workloads))

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(workload for host in self.hosts for workload in host.workloads)

    def host(self, name: str) -> ManagedHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)
