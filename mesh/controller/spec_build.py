"""build_spec: the controllers' spec.json from a deploy's plan. Pure: the known_hosts lines and the plan's digest
are given (read and computed by the deploy), so the spec says exactly what the deploy planned and checked.

Every managed host of the mesh is in it, reached as the deploy reaches it (address, port, host key lines), with
its proxies' files as rendered, which instances fill each endpoint file (a service's, or one version's), what each
outbound route file is computed from, what each inbound authorization file is computed from, the host's zone and
region, and the identities the controller renews there (each proxy's, and the checker's on a controller); and the
inventory's policy of every service that has one (its traffic policy and authorization rules: every service a
proxy serves or calls is among them when it has one).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence

from mesh.config import paths
from mesh.config.model import ProxyConfig
from mesh.config.tracing import TRACE_PORT
from mesh.controller.spec import (
    CONSUL_CA_FILE,
    TOKEN_FILE,
    ControllerSpec,
    EndpointSource,
    HostSpec,
    IdentitySpec,
    ProxySpec,
    SpecFile,
)
from mesh.inventory.model import ManagedHost, Mesh, MeshSettings
from mesh.inventory.services import policy_to_json
from mesh.plan.model import HostPlan, Plan, ProxyPlan
from mesh.render import FileSources, ProxyFiles, inbound_files
from mesh.telemetry.targets import proxy_targets

CHECKER_IDENTITY = "checker"


def endpoint_files(config: ProxyConfig, files: ProxyFiles) -> dict[str, EndpointSource]:
    """The proxy's endpoint files that Consul fills: eds file path -> the upstream service, and the version for a
    version cluster's file (the local app's endpoints are the plan's alone)."""
    rendered = {item.path for item in files.files}
    sources = _sources(files)
    found: dict[str, EndpointSource] = {}
    for cluster in config.clusters:
        path = sources.path("eds", cluster.name)
        if cluster.service is not None and path in rendered:
            found[path] = EndpointSource(cluster.service, cluster.version)
    return found


def route_files(config: ProxyConfig, files: ProxyFiles) -> dict[str, dict[str, object]]:
    """The proxy's outbound route files (one per HTTP upstream): rds file path -> the RouteInputs JSON the
    controller redoes it from."""
    rendered = {item.path for item in files.files}
    sources = _sources(files)
    found: dict[str, dict[str, object]] = {}
    for listener in config.outbound:
        inputs = listener.route_inputs
        if inputs is not None and sources.path("rds", inputs.route_name) in rendered:
            found[sources.path("rds", inputs.route_name)] = inputs.to_json()
    return found


def inbound_entries(config: ProxyConfig, files: ProxyFiles) -> dict[str, dict[str, object]]:
    """The proxy's inbound files the controller redoes from the authorization rules and run-time deny (the inbound
    route of an HTTP service, the RBAC filter files of a TCP one): path -> {"kind", "inputs": InboundInputs JSON}."""
    rendered = {item.path for item in files.files}
    inputs = config.inbound.authz_inputs.to_json()
    return {path: {"kind": kind, "inputs": inputs} for path, kind in sorted(inbound_files(config).items())
            if path in rendered}


def controller_files(config: ProxyConfig, files: ProxyFiles) -> frozenset[str]:
    """The files a live controller keeps current (a deploy writes them only where missing): the upstream endpoint
    files (from Consul). Outbound route files are not among them: the deploy renders them with the overrides it
    read from Consul, as the controller does, so a deploy that adds or removes a version cluster moves its routes
    together with its clusters (a route never names a cluster Envoy no longer has)."""
    return frozenset(endpoint_files(config, files))


def _sources(files: ProxyFiles) -> FileSources:
    return FileSources(posixpath.join(files.proxy_dir, paths.XDS_DIR_NAME))


def proxy_spec(proxy: ProxyPlan, host: ManagedHost, metrics: str | None = None) -> ProxySpec:
    """`metrics`: the proxy's Prometheus listener as `ADDRESS:PORT` (mesh.telemetry.targets' endpoint)."""
    files = tuple(SpecFile(item.path, item.kind, item.content) for item in proxy.rendered.files
                  if item.kind != "trust")  # the trust bundle (ca.pem) is the deploy's, never in ProxyFiles
    return ProxySpec(proxy.name, proxy.workload.service, proxy.rendered.proxy_dir, proxy.bootstrap_sha256, files,
                     endpoint_files(proxy.config, proxy.rendered), route_files(proxy.config, proxy.rendered),
                     host.zone, host.region, inbound_entries(proxy.config, proxy.rendered),
                     version=proxy.workload.version, kind="vm" if host.consul_kind == "vm" else "container",
                     container=proxy.workload.container if host.kind != "vm" else None, metrics=metrics,
                     node_id=proxy.config.node_id, delivery=host.delivery)


def trace_port(settings: MeshSettings) -> int:
    """The controllers' span receiver port: TRACE_PORT when `mesh_tracing` uses mesh's own collector, else 0."""
    tracing = settings.tracing
    return TRACE_PORT if tracing is not None and tracing.collector == "mesh" else 0


def identities(host: HostPlan) -> tuple[IdentitySpec, ...]:
    """Each proxy's identity by name (reordering a host's workloads changes nothing), then the checker's."""
    found = [IdentitySpec(proxy.name, "container" if proxy.sidecar is not None else "vm", proxy.spiffe_id,
                          proxy.config.node_id)
             for proxy in sorted(host.proxies, key=lambda proxy: proxy.name)]
    if host.checker_identity:
        found.append(IdentitySpec(CHECKER_IDENTITY, "checker", host.checker_identity))
    return tuple(found)


def build_spec(plan: Plan, mesh: Mesh, known_hosts: Mapping[str, Sequence[str]], plan_digest: str) -> ControllerSpec:
    """The spec every controller of `mesh` gets from `plan`. known_hosts: per host name, the known_hosts lines
    the deploy checks that host's key with; plan_digest: what the controller publishes once it runs this plan."""
    managed = {host.name for host in mesh.hosts}
    settings = mesh.settings
    metrics = {(target.host, target.proxy): target.endpoint for target in proxy_targets(mesh)}
    hosts = tuple(
        HostSpec(name=host.name, address=host.host.connection.address, port=host.host.connection.port,
                 known_hosts=tuple(known_hosts.get(host.name, ())), identities=identities(host),
                 proxies=tuple(proxy_spec(proxy, host.host, metrics.get((host.name, proxy.name)))
                               for proxy in sorted(host.proxies, key=lambda proxy: proxy.name)))
        for host in plan.hosts if host.name in managed)
    return ControllerSpec(
        mesh_id=settings.id, trust_domain=settings.trust_domain, plan_digest=plan_digest,
        consul_url=settings.consul_url or "", consul_token_file=TOKEN_FILE if settings.consul_token_file else None,
        consul_ca_file=CONSUL_CA_FILE if settings.consul_ca_file else None, cert_ttl_s=settings.cert_ttl_seconds,
        renew_fraction=settings.cert_renew_fraction, trace_port=trace_port(settings),
        hosts=hosts, policies={service: policy_to_json(policy) for service, policy in sorted(mesh.policies.items())})
