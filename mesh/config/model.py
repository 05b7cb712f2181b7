"""The desired config of one proxy as typed, frozen data: listeners, clusters, endpoints, secrets, admin.

It owns the shapes only; computing them (compute.py) and writing them out (mesh/render.py) live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mesh.inventory.model import Protocol

HealthCheckKind = Literal["http", "grpc", "tcp"]
Discovery = Literal["STATIC", "STRICT_DNS"]


@dataclass(frozen=True)
class EndpointMetadata:
    """Who answers at an endpoint (its lb_endpoint's filter_metadata `mesh`): the caller's access log reads the
    chosen endpoint's version and instance from it."""

    service: str
    version: str
    instance: str  # the Consul service id (the callee proxy's node id)
    host: str  # the inventory host name


@dataclass(frozen=True)
class Endpoint:
    """One address a cluster sends to."""

    address: str
    port: int
    metadata: EndpointMetadata | None = None


@dataclass(frozen=True)
class CertificateSecret:
    """The proxy's own certificate chain and private key, as files on its host."""

    name: str
    certificate_chain: str
    private_key: str


@dataclass(frozen=True)
class TrustBundleSecret:
    """The mesh CA a peer's certificate must chain to, as a file on the host."""

    name: str
    trusted_ca: str


@dataclass(frozen=True)
class Secrets:
    certificate: CertificateSecret
    trust_bundle: TrustBundleSecret


@dataclass(frozen=True)
class HealthCheck:
    """An active health check Envoy runs against every endpoint of a cluster."""

    kind: HealthCheckKind
    interval_ms: int
    timeout_ms: int
    healthy_threshold: int
    unhealthy_threshold: int
    http_path: str | None = None  # kind "http"
    http_host: str | None = None  # the Host/:authority of an http check
    http2: bool = False  # kind "http": speak HTTP/2 to the endpoint
    tls_server_name: str | None = None  # check over the cluster's second transport socket, with this SNI


@dataclass(frozen=True)
class UpstreamTls:
    """How a cluster's Envoy presents itself to, and verifies, a peer Envoy."""

    certificate_secret: str
    trust_bundle_secret: str
    server_name: str  # SNI of ordinary traffic
    peer_spiffe_id: str  # exact URI SAN the peer must present


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int
    consecutive_gateway_failure: int
    interval_ms: int
    base_ejection_time_ms: int
    max_ejection_percent: int


@dataclass(frozen=True)
class Cluster:
    """A fixed list of endpoints: the local app, or every instance of an upstream service."""

    name: str
    protocol: Protocol
    discovery: Discovery  # STRICT_DNS when an ansible_host is a name rather than an IP address
    endpoints: tuple[Endpoint, ...]
    health_check: HealthCheck
    connect_timeout_ms: int
    tls: UpstreamTls | None = None
    outlier_detection: OutlierDetection | None = None
    stat_name: str | None = None  # alt_stat_name: the name its stats carry (telemetry.py), else its name

    @property
    def http2(self) -> bool:
        return self.protocol in ("http2", "grpc")


@dataclass(frozen=True)
class DownstreamTls:
    """What the inbound listener requires of a client: a cert from the mesh CA with a SPIFFE id in the domain."""

    certificate_secret: str
    trust_bundle_secret: str
    spiffe_id_prefix: str


@dataclass(frozen=True)
class RetryPolicy:
    retry_on: str
    num_retries: int
    host_selection_retry_max_attempts: int


@dataclass(frozen=True)
class HealthChain:
    """The inbound filter chain chosen by SNI that answers 200 on `path` only while `cluster` is healthy."""

    server_name: str
    path: str
    cluster: str
    min_healthy_percent: int


@dataclass(frozen=True)
class AccessLog:
    """One JSON line per request (HTTP) or connection (TCP) on stdout: each field a constant or an Envoy command
    operator (`%...%`), in the order written."""

    fields: tuple[tuple[str, str | bool], ...]


@dataclass(frozen=True)
class Caller:
    """A service that calls this one: a virtual cluster of the inbound route (per-caller stats), matched by the
    peer's SPIFFE id as the inbound HCM writes it into x-forwarded-client-cert (a caller cannot forge it)."""

    service: str
    header: str
    suffix: str


@dataclass(frozen=True)
class InboundListener:
    """mTLS on proxy_port: the default chain forwards to the local app, the health chain reports on it."""

    name: str
    address: str
    port: int
    protocol: Protocol
    cluster: str
    tls: DownstreamTls
    health: HealthChain
    stat_prefix: str = "inbound"  # also the name of the app route's virtual host
    access_log: AccessLog = AccessLog(())
    internal_cidrs: tuple[str, ...] = ()  # the mesh's host addresses: their x-request-id is kept
    callers: tuple[Caller, ...] = ()

    @property
    def http(self) -> bool:
        return self.protocol != "tcp"


@dataclass(frozen=True)
class OutboundListener:
    """Where the app reaches an upstream service: plain text on 127.0.0.1:local_port."""

    name: str
    service: str
    address: str
    port: int
    protocol: Protocol
    cluster: str
    retry_policy: RetryPolicy | None  # http-ish only
    stat_prefix: str = ""  # the listener's name when empty
    access_log: AccessLog = AccessLog(())
    request_headers: tuple[tuple[str, str], ...] = ()  # set on every request, overwriting what the app sent

    @property
    def http(self) -> bool:
        return self.protocol != "tcp"


@dataclass(frozen=True)
class Admin:
    """Envoy's admin API on a unix socket (a filesystem path, never abstract: an abstract socket is reachable
    from anything sharing the network namespace, a sidecar's app container included)."""

    socket_path: str
    mode: int  # of the socket Envoy creates


@dataclass(frozen=True)
class MetricsListener:
    """Plain HTTP on metrics_port: `GET <path>` goes to Envoy's admin socket (cluster `admin_cluster`), every other
    request is answered 404. No access log (scrapers would flood it)."""

    name: str
    address: str
    port: int
    stat_prefix: str
    path: str
    admin_cluster: str  # a STATIC cluster whose one endpoint is the admin socket (a pipe)


@dataclass(frozen=True)
class StatsTag:
    """A custom tag extractor (stats_config.stats_tags): `regex`'s first group is cut from the stat name, its
    second (or the first) is the value of tag `name` (a Prometheus label)."""

    name: str
    regex: str


@dataclass(frozen=True)
class ProxyConfig:
    """Everything one proxy needs, for one workload: rendered to files now, served over xDS later."""

    proxy: str  # `<service>-<index>`, unique on its host
    node_id: str  # `<service>-<host>-<index>`, unique in the mesh (the Consul service ID)
    service: str
    host: str
    trust_domain: str
    base_id: int
    admin: Admin
    secrets: Secrets
    inbound: InboundListener
    outbound: tuple[OutboundListener, ...]
    clusters: tuple[Cluster, ...]
    max_downstream_connections: int
    config_path: str
    metrics: MetricsListener | None = None
    stats_tags: tuple[StatsTag, ...] = ()

    def cluster(self, name: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)
