"""Tracing: the fixed names and numbers the proxies and the controllers' span receiver share, and the pure
computation of a proxy's tracer (where its spans go) and of its spans' tags from `mesh_tracing`.

It must not render text (templates/envoy) or do I/O.
"""

from __future__ import annotations

from mesh.config.addresses import discovery_type, is_ip
from mesh.config.model import CollectorTls, Endpoint, Tracer, TraceTags, UpstreamTls
from mesh.inventory.model import Mesh, Workload, controller_spiffe_id

TRACE_PORT = 9411  # the controllers' span receiver (mTLS), where every proxy sends its spans
TRACE_CLUSTER = "mesh-traces"  # the Envoy cluster of the span collector (mesh's own or an outside one)
ZIPKIN_PATH = "/api/v2/spans"  # Zipkin's JSON v2 endpoint (mesh's receiver and an outside Zipkin's default)
OTLP_PATH = "/v1/traces"  # OTLP/HTTP's traces endpoint (an outside collector's default)
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # what an https outside collector's certificate chains to
CONNECT_TIMEOUT_MS = 1_000
CONTROLLER_SERVER_NAME = "controller.{trust_domain}"  # the SNI proxies send to the span receivers

# Span tags every traced connection manager sets (literal values: who made the span).
TAG_SERVICE = "mesh.service"
TAG_VERSION = "mesh.version"
TAG_PROXY = "mesh.proxy"
TAG_HOST = "mesh.host"
TAG_INSTANCE = "mesh.instance"
TAG_DIRECTION = "mesh.direction"
TAG_UPSTREAM = "mesh.upstream"


def tracer(mesh: Mesh, workload: Workload, certificate_secret: str, trust_bundle_secret: str) -> Tracer | None:
    """The tracer of `workload`'s proxy from `mesh_tracing` (None when unset): mesh's collector is every
    controller's span receiver at TRACE_PORT, reached with mTLS (the proxy's own certificate; the peer must be
    a controller); an outside collector is its URL's host and port, with TLS when https."""
    settings = mesh.settings.tracing
    if settings is None:
        return None
    if settings.collector == "mesh":
        trust_domain = mesh.settings.trust_domain
        addresses = tuple(dict.fromkeys(host.connection.address for host in mesh.controllers))
        return Tracer(
            kind="zipkin", sampling=settings.sampling, cluster=TRACE_CLUSTER, endpoint=ZIPKIN_PATH,
            hostname=TRACE_CLUSTER, service_name=workload.service, discovery=discovery_type(addresses),
            endpoints=tuple(Endpoint(address, TRACE_PORT) for address in addresses),
            connect_timeout_ms=CONNECT_TIMEOUT_MS,
            mesh_tls=UpstreamTls(certificate_secret, trust_bundle_secret,
                                 CONTROLLER_SERVER_NAME.format(trust_domain=trust_domain),
                                 controller_spiffe_id(trust_domain)))
    host, port = str(settings.host), int(settings.port or 0)
    ip = is_ip(host)
    default_path = ZIPKIN_PATH if settings.collector == "zipkin" else OTLP_PATH
    shown = f"[{host}]" if ":" in host else host
    outside_tls = None
    if settings.scheme == "https":
        outside_tls = CollectorTls(host if not ip else "", SYSTEM_CA_BUNDLE, "IP_ADDRESS" if ip else "DNS", host)
    hostname = shown if port == (443 if settings.scheme == "https" else 80) else f"{shown}:{port}"
    endpoint = settings.path or default_path
    return Tracer(
        kind="zipkin" if settings.collector == "zipkin" else "opentelemetry", sampling=settings.sampling,
        cluster=TRACE_CLUSTER, endpoint=endpoint, hostname=hostname, service_name=workload.service,
        discovery=discovery_type((host,)), endpoints=(Endpoint(host, port),), connect_timeout_ms=CONNECT_TIMEOUT_MS,
        outside_tls=outside_tls, uri=f"{settings.scheme}://{hostname}{endpoint}")


def inbound_tags(workload: Workload, proxy: str) -> TraceTags:
    """The tags of the spans a service's inbound app chain makes (a SERVER span per request it takes)."""
    return _tags(workload, proxy, "inbound")


def outbound_tags(workload: Workload, proxy: str, upstream: str) -> TraceTags:
    """The tags of the spans an outbound HTTP listener makes (a CLIENT span per request to `upstream`)."""
    return (*_tags(workload, proxy, "outbound"), (TAG_UPSTREAM, upstream))


def _tags(workload: Workload, proxy: str, direction: str) -> TraceTags:
    return ((TAG_SERVICE, workload.service), (TAG_VERSION, workload.version), (TAG_PROXY, proxy),
            (TAG_HOST, workload.host), (TAG_INSTANCE, workload.consul_id), (TAG_DIRECTION, direction))


