"""build_spec: the controllers' spec.json from a deploy's plan. Pure: the known_hosts lines and the plan's digest
are given (read and computed by the deploy), so the spec says exactly what the deploy planned and checked.

Every managed host of the mesh is in it, reached as the deploy reaches it (address, port, host key lines), with
its proxies' files as rendered, which endpoint file each upstream service fills, and the identities the
controller renews there (each proxy's, and the checker's on a controller).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence

from mesh.config import paths
from mesh.config.model import ProxyConfig
from mesh.controller.spec import (
    CONSUL_CA_FILE,
    TOKEN_FILE,
    ControllerSpec,
    HostSpec,
    IdentitySpec,
    ProxySpec,
    SpecFile,
)
from mesh.inventory.model import Mesh
from mesh.plan.model import HostPlan, Plan, ProxyPlan
from mesh.render import ProxyFiles

CHECKER_IDENTITY = "checker"


def endpoint_files(config: ProxyConfig, files: ProxyFiles) -> dict[str, str]:
    """The proxy's endpoint files that Consul fills: eds file path -> the upstream service (the local app's
    endpoints are the plan's alone)."""
    rendered = {item.path for item in files.files}
    xds_dir = posixpath.join(files.proxy_dir, paths.XDS_DIR_NAME)
    found: dict[str, str] = {}
    for listener in config.outbound:
        path = f"{xds_dir}/eds.{listener.cluster}.yaml"
        if path in rendered:
            found[path] = listener.service
    return found


def proxy_spec(proxy: ProxyPlan) -> ProxySpec:
    files = tuple(SpecFile(item.path, item.kind, item.content) for item in proxy.rendered.files
                  if item.kind != "trust")  # the trust bundle (ca.pem) is the deploy's, never in ProxyFiles
    return ProxySpec(proxy.name, proxy.workload.service, proxy.rendered.proxy_dir, proxy.bootstrap_sha256, files,
                     endpoint_files(proxy.config, proxy.rendered))


def identities(host: HostPlan) -> tuple[IdentitySpec, ...]:
    """Each proxy's identity by name (reordering a host's workloads changes nothing), then the checker's."""
    found = [IdentitySpec(proxy.name, "container" if proxy.sidecar is not None else "vm", proxy.spiffe_id)
             for proxy in sorted(host.proxies, key=lambda proxy: proxy.name)]
    if host.checker_identity:
        found.append(IdentitySpec(CHECKER_IDENTITY, "checker", host.checker_identity))
    return tuple(found)


def build_spec(plan: Plan, mesh: Mesh, known_hosts: Mapping[str, Sequence[str]], plan_digest: str) -> ControllerSpec:
    """The spec every controller of `mesh` gets from `plan`. known_hosts: per host name, the known_hosts lines
    the deploy checks that host's key with; plan_digest: what the controller publishes once it runs this plan."""
    managed = {host.name for host in mesh.hosts}
    settings = mesh.settings
    hosts = tuple(
        HostSpec(name=host.name, address=host.host.connection.address, port=host.host.connection.port,
                 known_hosts=tuple(known_hosts.get(host.name, ())), identities=identities(host),
                 proxies=tuple(proxy_spec(proxy) for proxy in sorted(host.proxies, key=lambda proxy: proxy.name)))
        for host in plan.hosts if host.name in managed)
    return ControllerSpec(
        mesh_id=settings.id, trust_domain=settings.trust_domain, plan_digest=plan_digest,
        consul_url=settings.consul_url or "", consul_token_file=TOKEN_FILE if settings.consul_token_file else None,
        consul_ca_file=CONSUL_CA_FILE if settings.consul_ca_file else None, cert_ttl_s=settings.cert_ttl_seconds,
        renew_fraction=settings.cert_renew_fraction,
        hosts=hosts)
