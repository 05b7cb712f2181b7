"""The desired config of one proxy as typed, frozen data: listeners, routes, clusters, endpoints, secrets, admin.

It owns the shapes only; computing them (compute.py) and writing them out (mesh/render.py) live elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from mesh.config.authz import AuthzConfig, InboundInputs
from mesh.config.xds import XdsBootstrap
from mesh.inventory.model import Protocol
from mesh.inventory.policy import MtlsMode

HealthCheckKind = Literal["http", "grpc", "tcp"]
Discovery = Literal["STATIC", "STRICT_DNS"]
LbKind = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "MAGLEV", "RANDOM"]  # Envoy's cluster lb_policy
Denominator = Literal["HUNDRED", "MILLION"]
PathMatchKind = Literal["prefix", "path", "safe_regex"]  # Envoy's RouteMatch path specifier
HashPolicyKind = Literal["header", "cookie", "source_ip"]
PROTOCOLS: tuple[Protocol, ...] = ("http", "http2", "grpc", "tcp")


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
    """One address a cluster sends to; with its locality (the instance's host's zone and region) and the priority
    this proxy gives it (0 first: traffic leaves a priority only while it is unhealthy)."""

    address: str
    port: int
    metadata: EndpointMetadata | None = None
    zone: str | None = None
    region: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class Locality:
    """The endpoints of one priority in one zone of one region: a LocalityLbEndpoints of an assignment."""

    priority: int
    region: str | None
    zone: str | None
    endpoints: tuple[Endpoint, ...]


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
class CircuitBreakerThresholds:
    """A cluster's circuit_breakers thresholds (default priority); None leaves Envoy's default."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    retry_budget_percent: float | None = None


@dataclass(frozen=True)
class Cluster:
    """A fixed list of endpoints: the local app, every instance of an upstream service, or those of one version."""

    name: str
    protocol: Protocol
    discovery: Discovery  # STRICT_DNS when an ansible_host is a name rather than an IP address
    endpoints: tuple[Endpoint, ...]
    health_check: HealthCheck
    connect_timeout_ms: int
    tls: UpstreamTls | None = None
    outlier_detection: OutlierDetection | None = None
    stat_name: str | None = None  # alt_stat_name: the name its stats carry (telemetry.py), else its name
    lb_policy: LbKind = "ROUND_ROBIN"
    circuit_breaker: CircuitBreakerThresholds | None = None
    overprovisioning_factor: int | None = None  # of its ClusterLoadAssignment (Envoy's default 140 when None)
    service: str | None = None  # an upstream cluster: the service whose instances fill it
    version: str | None = None  # a version cluster: only the instances of this version

    @property
    def http2(self) -> bool:
        return self.protocol in ("http2", "grpc")

    @property
    def localities(self) -> tuple[Locality, ...]:
        """Its endpoints grouped by (priority, region, zone), by priority then in the order first seen."""
        groups: dict[tuple[int, str | None, str | None], list[Endpoint]] = {}
        for endpoint in self.endpoints:
            groups.setdefault((endpoint.priority, endpoint.region, endpoint.zone), []).append(endpoint)
        ordered = sorted(groups.items(), key=lambda item: item[0][0])  # stable: first seen within a priority
        return tuple(Locality(priority, region, zone, tuple(found)) for (priority, region, zone), found in ordered)


TracerKind = Literal["zipkin", "opentelemetry"]


@dataclass(frozen=True)
class CollectorTls:
    """An outside https collector: its certificate is checked against the host's CA bundle and must name `san`."""

    server_name: str  # SNI
    trusted_ca: str  # a file on the host
    san_type: Literal["DNS", "IP_ADDRESS"]
    san: str


@dataclass(frozen=True)
class Tracer:
    """The tracer of every app-traffic HTTP connection manager (`mesh_tracing`), and the cluster its spans go to:
    mesh's collector (every controller's span receiver, mTLS with the proxy's own certificate, the peer's SAN the
    controllers' SPIFFE id) or an outside collector's host (plain, or https checked against the host's CAs)."""

    kind: TracerKind  # zipkin: Zipkin JSON v2 over HTTP (mesh's collector too); opentelemetry: OTLP/HTTP
    sampling: float  # percent of requests that start a trace here (a propagated sampled decision is kept)
    cluster: str
    endpoint: str  # the collector's path
    hostname: str  # Host of the collector requests
    service_name: str  # OTLP's resource service.name (Zipkin's is the node's cluster: the service)
    discovery: Discovery
    endpoints: tuple[Endpoint, ...]
    connect_timeout_ms: int
    mesh_tls: UpstreamTls | None = None  # mesh's collector
    outside_tls: CollectorTls | None = None  # an https outside collector
    uri: str = ""  # opentelemetry: the collector's URL (http_service.http_uri)


TraceTags = tuple[tuple[str, str], ...]  # literal custom tags of a traced connection manager's spans


@dataclass(frozen=True)
class DownstreamTls:
    """What the inbound listener requires of a client: a cert from the mesh CA with a SPIFFE id in the domain."""

    certificate_secret: str
    trust_bundle_secret: str
    spiffe_id_prefix: str


@dataclass(frozen=True)
class RetryPolicy:
    """A route's retry_policy: a retry goes to a host not tried yet when the cluster has one (previous_hosts)."""

    retry_on: str  # Envoy's HTTP and gRPC conditions, comma-joined
    num_retries: int
    host_selection_retry_max_attempts: int
    per_try_timeout_ms: int | None = None
    backoff_base_ms: int | None = None
    backoff_max_ms: int | None = None


@dataclass(frozen=True)
class Percent:
    """Envoy's FractionalPercent: numerator / denominator."""

    numerator: int
    denominator: Denominator = "HUNDRED"


@dataclass(frozen=True)
class HeaderMatch:
    """A route's header matcher: the header's value equals `exact`, or matches the RE2 `regex` whole."""

    name: str
    exact: str | None = None
    regex: str | None = None


@dataclass(frozen=True)
class RequestMatch:
    """A route's match: a path specifier and headers that must all match (`:method` is a header too)."""

    path_kind: PathMatchKind = "prefix"
    path: str = "/"
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True)
class HashPolicy:
    """What a ring hash or maglev cluster hashes for a request: a header, a cookie (by name) or the source IP."""

    kind: HashPolicyKind
    name: str | None = None


@dataclass(frozen=True)
class RequestMirror:
    """A copy of a share of requests sent to `cluster` (answers ignored; Envoy adds `-shadow` to the authority)."""

    cluster: str
    percent: Percent


@dataclass(frozen=True)
class FaultInjection:
    """A route's HTTPFault (the fault filter's per-route config): abort and/or delay a share of requests; with
    headers only requests carrying all of them."""

    abort_status: int | None = None
    abort_percent: Percent | None = None
    delay_ms: int | None = None
    delay_percent: Percent | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class OutboundRouteEntry:
    """One route of an outbound RouteConfiguration, first match wins: where matching requests go and how."""

    match: RequestMatch
    clusters: tuple[WeightedCluster, ...]  # one: a plain `cluster`; more: weighted_clusters
    retry_policy: RetryPolicy
    timeout_ms: int | None = None  # None: Envoy's default (15 s)
    hash_policies: tuple[HashPolicy, ...] = ()
    mirrors: tuple[RequestMirror, ...] = ()
    fault: FaultInjection | None = None
    request_headers: tuple[tuple[str, str], ...] = ()  # set on every request, overwriting what the app sent


@dataclass(frozen=True)
class OutboundRoute:
    """The RouteConfiguration of one outbound HTTP listener: one virtual host, its routes in order."""

    name: str
    virtual_host: str
    routes: tuple[OutboundRouteEntry, ...]

    @property
    def cluster_names(self) -> tuple[str, ...]:
        """Every cluster a route sends to or mirrors to, in first-seen order."""
        found = [cluster.name for route in self.routes for cluster in route.clusters]
        found += [mirror.cluster for route in self.routes for mirror in route.mirrors]
        return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class RouteInputs:
    """Everything, besides the service's policy, that one outbound RouteConfiguration is computed from
    (mesh.config.traffic.outbound_route): the controller keeps it (spec.json) and redoes the route when an
    override changes the policy."""

    route_name: str
    service: str  # the upstream
    protocol: Protocol
    versions: tuple[str, ...]  # the upstream's versions in the inventory, sorted
    request_headers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"route_name": self.route_name, "service": self.service, "protocol": self.protocol,
                "versions": list(self.versions), "request_headers": [list(pair) for pair in self.request_headers]}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RouteInputs:
        """The inputs of to_json's output; ValueError on anything else."""
        try:
            protocol = str(data["protocol"])
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {protocol!r}")
            headers = tuple((str(name), str(value)) for name, value in data.get("request_headers") or ())
            return RouteInputs(str(data["route_name"]), str(data["service"]), cast(Protocol, protocol),
                               tuple(str(version) for version in data["versions"]), headers)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not route inputs: {error}") from error


@dataclass(frozen=True)
class LocalRateLimit:
    """Envoy's local rate limit of one instance: a token bucket refilled every fill interval; 429 when empty."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval_ms: int = 1_000


@dataclass(frozen=True)
class HealthChain:
    """The inbound filter chain chosen by SNI that answers 200 on `path` only while `cluster` is healthy."""

    server_name: str
    path: str
    cluster: str
    min_healthy_percent: int


LogValue = str | bool | tuple[tuple[str, str], ...]  # a constant, an operator, or an object of operators


@dataclass(frozen=True)
class AccessLog:
    """One JSON line per request (HTTP) or connection (TCP) on stdout: each field a constant or an Envoy command
    operator (`%...%`), in the order written."""

    fields: tuple[tuple[str, LogValue], ...]


@dataclass(frozen=True)
class Caller:
    """A service that calls this one: a virtual cluster of the inbound route (per-caller stats), matched by the
    peer's SPIFFE id as the inbound HCM writes it into x-forwarded-client-cert (a caller cannot forge it)."""

    service: str
    header: str
    suffix: str


@dataclass(frozen=True)
class RbacFilter:
    """One of the two RBAC filters of an inbound app chain (HTTP filter, or network filter read from its ECDS file):
    its name, action, and the prefix of its stats and dynamic metadata keys."""

    name: str
    action: Literal["DENY", "ALLOW"]
    prefix: str  # rules_stat_prefix and shadow_rules_stat_prefix: `<prefix>shadow_effective_policy_id`, ...
    tcp_stat_prefix: str  # the network filter's stat_prefix: `<it>rbac.denied`


@dataclass(frozen=True)
class InboundRoute:
    """The RouteConfiguration of the inbound app chain(s): one route to the local app carrying the callee's own
    rate limit and authorization (the RBAC filters' per-route config), with per-caller virtual clusters. Computed
    from InboundInputs, the service's policy and its run-time deny alone (mesh.config.inbound), so a controller
    redoes it without the rest of the proxy."""

    name: str
    virtual_host: str  # the inbound stat name: its vhost stats carry it
    cluster: str
    protocol: Protocol
    authz: AuthzConfig
    authz_filters: tuple[RbacFilter, ...]  # DENY then ALLOW: the names its per-route config is under
    callers: tuple[Caller, ...] = ()
    rate_limit: LocalRateLimit | None = None  # the filter is always there, disabled without it
    rate_limit_stat_prefix: str = "inbound_rate_limit"  # <prefix>.http_local_rate_limit.rate_limited counts 429s


@dataclass(frozen=True)
class InboundListener:
    """mTLS on proxy_port: the app chain forwards to the local app through the DENY then ALLOW RBAC filters, the
    health chain reports on it; with mtls `permissive` a plaintext chain (the same filters and route) too."""

    name: str
    address: str
    port: int
    protocol: Protocol
    cluster: str
    tls: DownstreamTls
    health: HealthChain
    authz_inputs: InboundInputs  # with the policy and run-time deny: what `authz` and `route` are computed from
    authz: AuthzConfig
    authz_filters: tuple[RbacFilter, ...]  # DENY then ALLOW, before the rate limit (HTTP) or tcp_proxy (TCP)
    mtls: MtlsMode = "strict"
    stat_prefix: str = "inbound"  # also the name of the app route's virtual host
    access_log: AccessLog = AccessLog(())
    plaintext_access_log: AccessLog = AccessLog(())  # the plaintext chain's (`mtls: false`)
    internal_cidrs: tuple[str, ...] = ()  # the mesh's host addresses: their x-request-id is kept
    route: InboundRoute | None = None  # http-ish only
    rate_limit_stat_prefix: str = "inbound_rate_limit"
    trace_tags: TraceTags = ()  # with ProxyConfig.tracer: the app chains' span tags (the health chain is not traced)

    @property
    def http(self) -> bool:
        return self.protocol != "tcp"

    @property
    def permissive(self) -> bool:
        return self.mtls == "permissive"

    @property
    def callers(self) -> tuple[Caller, ...]:
        return self.route.callers if self.route is not None else ()

    @property
    def rate_limit(self) -> LocalRateLimit | None:
        return self.route.rate_limit if self.route is not None else None


@dataclass(frozen=True)
class OutboundListener:
    """Where the app reaches an upstream service: plain text on 127.0.0.1:local_port. HTTP goes by its route
    (RDS); TCP straight to `cluster`."""

    name: str
    service: str
    address: str
    port: int
    protocol: Protocol
    cluster: str  # every instance of the upstream
    stat_prefix: str = ""  # the listener's name when empty
    access_log: AccessLog = AccessLog(())
    route: OutboundRoute | None = None  # http-ish only
    route_inputs: RouteInputs | None = None  # what `route` was computed from, with the service's policy
    hash_source_ip: bool = False  # tcp with ring hash: the same calling instance to the same upstream one
    trace_tags: TraceTags = ()  # with ProxyConfig.tracer (HTTP only): its spans' tags

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
    tracer: Tracer | None = None  # mesh_tracing: None, no HTTP connection manager traces
    xds: XdsBootstrap | None = None  # mesh_delivery: xds (an ADS bootstrap beside the files one); None: files only

    def cluster(self, name: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)
