"""The pure computation of one proxy's desired config from the validated mesh.

It decides names, ports, TLS identities, health checks and endpoints, and applies each upstream service's traffic
policy through traffic.py; it must not render text or do I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from types import MappingProxyType

from mesh.config import paths, telemetry, tracing, traffic
from mesh.config.addresses import discovery_type, is_ip
from mesh.config.errors import ConfigError
from mesh.config.inbound import (
    AUTHZ_FILTERS,
    INBOUND_LISTENER,
    LOCAL_APP_CLUSTER,
    inbound_authz,
    inbound_inputs,
    inbound_route,
)
from mesh.config.model import (
    Admin,
    CertificateSecret,
    Cluster,
    DownstreamTls,
    Endpoint,
    EndpointMetadata,
    HealthChain,
    HealthCheck,
    InboundListener,
    MetricsListener,
    OutboundListener,
    ProxyConfig,
    RouteInputs,
    Secrets,
    TrustBundleSecret,
    UpstreamTls,
)
from mesh.config.traffic import upstream_cluster_name, version_cluster_name
from mesh.config.xds import XDS_PORT, XdsBootstrap
from mesh.inventory.model import (
    ManagedHost,
    Mesh,
    Protocol,
    Upstream,
    Workload,
    controller_spiffe_id,
    spiffe_id,
)
from mesh.inventory.policy import AuthzOverride, OutlierPolicy, ServicePolicy, TrafficOverride, apply_override

METRICS_LISTENER = "metrics"
ADMIN_CLUSTER = "mesh-admin"
METRICS_PATH = "/stats/prometheus"
METRICS_ADDRESS = "0.0.0.0"
CERTIFICATE_SECRET = "proxy-cert"
TRUST_BUNDLE_SECRET = "mesh-ca"
HEALTH_PATH = "/mesh/health"
ADMIN_SOCKET_MODE = 0o600  # Envoy's user (which creates it) and root only
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
INBOUND_ADDRESS = "0.0.0.0"
OUTBOUND_ADDRESS = "127.0.0.1"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
CONNECT_TIMEOUT_MS = 1_000
# Peer Envoys are checked every second through their health chain: two misses eject within ~2 s.
UPSTREAM_CHECK_INTERVAL_MS = 1_000
UPSTREAM_CHECK_TIMEOUT_MS = 800
HEALTHY_THRESHOLD = 1
UNHEALTHY_THRESHOLD = 2
OUTLIER = traffic.outlier_detection(OutlierPolicy())  # without a policy
RETRIES = traffic.DEFAULT_RETRIES

__all__ = ["compute_proxy_config", "endpoint_metadata", "health_server_name", "is_ip", "outbound_listener_name",
           "upstream_cluster_name", "version_cluster_name"]


def outbound_listener_name(service: str) -> str:
    return f"outbound-{service}"


def health_server_name(trust_domain: str) -> str:
    """The SNI that selects the inbound health chain (mesh's checker and peer Envoys use it)."""
    return f"health.{trust_domain}"


def compute_proxy_config(mesh: Mesh, workload: Workload,
                         overrides: Mapping[str, TrafficOverride] = MappingProxyType({}),
                         authz_overrides: Mapping[str, AuthzOverride] = MappingProxyType({})) -> ProxyConfig:
    """The desired config of `workload`'s Envoy: one inbound listener, one outbound listener per upstream, and
    per upstream the cluster of every instance, then one per version (two versions or more). Each upstream
    service's policy is the inventory's with its run-time override (`overrides`, by service) applied; the inbound
    listener's authorization is its own service's rules with its run-time deny (`authz_overrides`, by service)."""
    proxy = paths.proxy_name(workload)
    trust_domain = mesh.settings.trust_domain
    policies = {upstream.service: apply_override(mesh.policy(upstream.service), overrides.get(upstream.service))
                for upstream in workload.upstreams}
    upstream_clusters = tuple(_upstream_clusters(mesh, proxy, workload, upstream, policies[upstream.service])
                              for upstream in workload.upstreams)
    tracer = tracing.tracer(mesh, workload, CERTIFICATE_SECRET, TRUST_BUNDLE_SECRET)
    return ProxyConfig(
        proxy=proxy,
        node_id=workload.consul_id,
        service=workload.service,
        host=workload.host,
        trust_domain=trust_domain,
        base_id=paths.base_id(workload),
        admin=_admin(proxy),
        secrets=Secrets(
            CertificateSecret(CERTIFICATE_SECRET, paths.cert_path(proxy), paths.key_path(proxy)),
            TrustBundleSecret(TRUST_BUNDLE_SECRET, paths.proxy_ca_path(proxy)),
        ),
        inbound=_inbound(mesh, workload, authz_overrides.get(workload.service), traced=tracer is not None),
        outbound=tuple(_outbound(mesh, workload, upstream, clusters[0].protocol, policies[upstream.service],
                                 traced=tracer is not None)
                       for upstream, clusters in zip(workload.upstreams, upstream_clusters, strict=True)),
        clusters=(_local_app_cluster(proxy, workload), *(cluster for clusters in upstream_clusters
                                                         for cluster in clusters)),
        max_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
        config_path=paths.envoy_config_path(proxy),
        metrics=MetricsListener(METRICS_LISTENER, METRICS_ADDRESS, workload.metrics_port, METRICS_LISTENER,
                                METRICS_PATH, ADMIN_CLUSTER),
        stats_tags=telemetry.STATS_TAGS,
        tracer=tracer,
        xds=xds_bootstrap(mesh, workload),
    )


def xds_bootstrap(mesh: Mesh, workload: Workload) -> XdsBootstrap | None:
    """Where the ADS stream of `workload`'s Envoy goes when its host is on `mesh_delivery: xds`: every
    controller's address (deduplicated, inventory order, as the tracer's list) at XDS_PORT, checked by the
    controllers' SNI name and SPIFFE ID; None on a files host (or a workload placed outside the mesh's hosts)."""
    if not any(host.name == workload.host and host.delivery == "xds" for host in mesh.hosts):
        return None
    trust_domain = mesh.settings.trust_domain
    return XdsBootstrap(
        controllers=tuple(dict.fromkeys(host.connection.address for host in mesh.controllers)),
        port=XDS_PORT,
        server_name=tracing.CONTROLLER_SERVER_NAME.format(trust_domain=trust_domain),
        controller_spiffe_id=controller_spiffe_id(trust_domain),
    )


def _admin(proxy: str) -> Admin:
    """The admin socket in the proxy's folder; the inventory's admin_port opens nothing any more."""
    path = paths.admin_socket_path(proxy)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(proxy, f"Envoy's admin socket path {path} is longer than a unix socket allows "
                                 f"({MAX_SOCKET_PATH} bytes)", hint="use a shorter service name")
    return Admin(path, ADMIN_SOCKET_MODE)


def _inbound(mesh: Mesh, workload: Workload, override: AuthzOverride | None, traced: bool) -> InboundListener:
    trust_domain = mesh.settings.trust_domain
    policy = mesh.policy(workload.service)
    inputs = inbound_inputs(mesh, workload)
    identity = spiffe_id(trust_domain, workload.service)
    return InboundListener(
        name=INBOUND_LISTENER,
        address=INBOUND_ADDRESS,
        port=workload.proxy_port,
        protocol=workload.protocol,
        cluster=LOCAL_APP_CLUSTER,
        tls=DownstreamTls(CERTIFICATE_SECRET, TRUST_BUNDLE_SECRET, f"spiffe://{trust_domain}/"),
        health=HealthChain(health_server_name(trust_domain), HEALTH_PATH, LOCAL_APP_CLUSTER, 100),
        authz_inputs=inputs,
        authz=inbound_authz(inputs, policy, override),
        authz_filters=AUTHZ_FILTERS,
        mtls=policy.mtls,
        stat_prefix=telemetry.inbound_stat_name(workload.service, workload.version),
        access_log=telemetry.inbound_access_log(workload.consul_id, workload.protocol, identity, workload.service,
                                                workload.version),
        plaintext_access_log=telemetry.inbound_access_log(workload.consul_id, workload.protocol, identity,
                                                          workload.service, workload.version, mtls=False),
        internal_cidrs=_internal_cidrs(mesh),
        route=inbound_route(inputs, policy, override) if workload.protocol != "tcp" else None,
        trace_tags=tracing.inbound_tags(workload, paths.proxy_name(workload))
        if traced and workload.protocol != "tcp" else (),
    )


def _internal_cidrs(mesh: Mesh) -> tuple[str, ...]:
    """Every managed host's address that is an IP literal, as a /32 or /128: requests from them are internal, so
    the inbound listener keeps their x-request-id (a host name cannot be a CIDR range; its requests keep their id
    all the same: preserve_external_request_id)."""
    found = []
    for host in mesh.hosts:
        if is_ip(host.connection.address):
            address = ipaddress.ip_address(host.connection.address)
            found.append(f"{address}/{address.max_prefixlen}")
    return tuple(dict.fromkeys(found))


def _outbound(mesh: Mesh, workload: Workload, upstream: Upstream, protocol: Protocol,
              policy: ServicePolicy, traced: bool) -> OutboundListener:
    """An HTTP upstream goes by its route (the policy's rules); a TCP one straight to every instance."""
    name = outbound_listener_name(upstream.service)
    inputs = None
    if protocol != "tcp":
        inputs = RouteInputs(route_name=name, service=upstream.service, protocol=protocol,
                             versions=mesh.versions(upstream.service),
                             request_headers=telemetry.outbound_request_headers(workload.service, workload.version,
                                                                                workload.consul_id))
    return OutboundListener(
        name=name,
        service=upstream.service,
        address=OUTBOUND_ADDRESS,
        port=upstream.local_port,
        protocol=protocol,
        cluster=upstream_cluster_name(upstream.service),
        stat_prefix=telemetry.outbound_stat_name(workload.service, workload.version, upstream.service),
        access_log=telemetry.outbound_access_log(workload.consul_id, protocol,
                                                 spiffe_id(mesh.settings.trust_domain, workload.service),
                                                 workload.service, workload.version, upstream.service),
        route=traffic.outbound_route(inputs, policy) if inputs is not None else None,
        route_inputs=inputs,
        hash_source_ip=protocol == "tcp" and policy.lb.policy in ("ring_hash", "maglev"),
        trace_tags=tracing.outbound_tags(workload, paths.proxy_name(workload), upstream.service)
        if traced and protocol != "tcp" else (),
    )


def _local_app_cluster(proxy: str, workload: Workload) -> Cluster:
    """The app on 127.0.0.1:port, checked as the inventory says: the health chain reports this check."""
    health = workload.health
    if health.kind == "grpc" and workload.protocol not in ("http2", "grpc"):
        raise ConfigError(proxy, f"health {{grpc: true}} needs protocol grpc or http2, not {workload.protocol}",
                          hint="use {http: /path} or {tcp: true} for this workload")
    check = HealthCheck(
        kind=health.kind,
        interval_ms=_ms(health.interval),
        timeout_ms=_ms(health.timeout),
        healthy_threshold=HEALTHY_THRESHOLD,
        unhealthy_threshold=UNHEALTHY_THRESHOLD,
        http_path=health.http_path if health.kind == "http" else None,
        http2=health.kind == "http" and workload.protocol in ("http2", "grpc"),
    )
    return Cluster(LOCAL_APP_CLUSTER, workload.protocol, "STATIC", (Endpoint("127.0.0.1", workload.port),),
                   check, CONNECT_TIMEOUT_MS, stat_name=telemetry.inbound_stat_name(workload.service, workload.version))


def endpoint_metadata(workload: Workload) -> EndpointMetadata:
    """Who answers at one instance of a service (Consul has the same: Service, Meta version and host, ID)."""
    return EndpointMetadata(workload.service, workload.version, workload.consul_id, workload.host)


def _upstream_clusters(mesh: Mesh, proxy: str, caller: Workload, upstream: Upstream,
                       policy: ServicePolicy) -> tuple[Cluster, ...]:
    """Every instance of the upstream service in the mesh, mTLS, checked through its health chain; then, when it
    runs two versions or more, the instances of each version. The policy sets how each balances and breaks;
    the caller's host's zone and region set each endpoint's priority."""
    service = upstream.service
    instances = [(host, workload) for host in mesh.hosts for workload in host.workloads if workload.service == service]
    if not instances:
        raise ConfigError(proxy, f"upstream {service!r}: no host runs this service")
    protocols = sorted({workload.protocol for _, workload in instances})
    if len(protocols) > 1:
        raise ConfigError(proxy, f"upstream {upstream.service!r}: its instances disagree on the protocol "
                                 f"({', '.join(protocols)})", hint="give every instance the same protocol")
    trust_domain = mesh.settings.trust_domain
    check = HealthCheck(
        kind="http",
        interval_ms=UPSTREAM_CHECK_INTERVAL_MS,
        timeout_ms=UPSTREAM_CHECK_TIMEOUT_MS,
        healthy_threshold=HEALTHY_THRESHOLD,
        unhealthy_threshold=UNHEALTHY_THRESHOLD,
        http_path=HEALTH_PATH,
        http_host=health_server_name(trust_domain),
        tls_server_name=health_server_name(trust_domain),
    )
    endpoints = _prioritized_endpoints(mesh.host(caller.host), instances)
    every = Cluster(
        name=upstream_cluster_name(service),
        protocol=instances[0][1].protocol,
        discovery=discovery_type(host.connection.address for host, _ in instances),
        endpoints=endpoints,
        health_check=check,
        connect_timeout_ms=CONNECT_TIMEOUT_MS,
        tls=UpstreamTls(CERTIFICATE_SECRET, TRUST_BUNDLE_SECRET, service, spiffe_id(trust_domain, service)),
        outlier_detection=traffic.outlier_detection(policy.outlier_detection),
        stat_name=telemetry.outbound_stat_name(caller.service, caller.version, service),
        lb_policy=traffic.lb_kind(policy.lb),
        circuit_breaker=traffic.circuit_breaker_thresholds(policy.circuit_breaker),
        overprovisioning_factor=traffic.OVERPROVISIONING_FACTOR,
        service=service,
    )
    versions = mesh.versions(service)
    if len(versions) < 2 or every.protocol == "tcp":
        return (every,)  # nothing routes a TCP connection by version: no clusters that would only add checks
    by_version = []
    for version in versions:
        chosen = tuple(endpoint for endpoint, (_, workload) in zip(endpoints, instances, strict=True)
                       if workload.version == version)
        by_version.append(replace(
            every, name=version_cluster_name(service, version, versions), endpoints=_renumbered(chosen),
            stat_name=telemetry.outbound_stat_name(caller.service, caller.version, service, version),
            version=version))
    return (every, *by_version)


def _prioritized_endpoints(caller: ManagedHost, instances: list[tuple[ManagedHost, Workload]]) \
        -> tuple[Endpoint, ...]:
    """Each instance as an endpoint, with its host's zone and region and the priority the caller's host gives it
    (mesh.config.traffic.endpoint_priority, renumbered from 0)."""
    raw = [traffic.endpoint_priority(caller.zone, caller.region, host.zone, host.region) for host, _ in instances]
    return tuple(Endpoint(host.connection.address, workload.proxy_port, endpoint_metadata(workload), zone=host.zone,
                          region=host.region, priority=priority)
                 for (host, workload), priority in zip(instances, traffic.prioritized(raw), strict=True))


def _renumbered(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """A subset's priorities renumbered from 0 (a version may have no instance in the caller's zone)."""
    priorities = traffic.prioritized([endpoint.priority for endpoint in endpoints])
    return tuple(replace(endpoint, priority=priority) for endpoint, priority in zip(endpoints, priorities,
                                                                                     strict=True))


def _ms(value: timedelta) -> int:
    return max(1, round(value.total_seconds() * 1000))
