"""What `mesh status` expects on each host, computed from the inventory before any host is read: per proxy the
files mesh renders (mesh.render.render_proxy_files), its certificate, unit or sidecar, and upstream clusters.
Pure; it must not read hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.config import paths
from mesh.config.compute import compute_proxy_config, upstream_cluster_name
from mesh.config.xds import Delivery
from mesh.containers.sidecar import sidecar_name
from mesh.inventory.model import ManagedHost, Mesh, Workload
from mesh.render import ProxyFiles, inbound_files, render_proxy_files


@dataclass(frozen=True)
class ExpectedProxy:
    """One proxy as the inventory wants it on its host."""

    workload: Workload
    proxy: str
    files: ProxyFiles
    cert_path: str
    ca_path: str  # the proxy's copy of the trust bundle: the host's /etc/mesh/ca.pem
    admin_socket: str
    unit: str | None  # the systemd unit of a VM proxy
    sidecar: str | None  # the sidecar container of a container-host proxy
    upstream_clusters: tuple[tuple[str, str], ...]  # (service, Envoy cluster name)
    permissive: bool = False  # its service accepts plaintext clients too (mtls: permissive)
    inbound_files: tuple[str, ...] = ()  # its inbound authorization files, which a controller redoes (run-time deny)
    delivery: Delivery = "files"  # its host's mesh_delivery: xds streams its resources from the controllers
    node_id: str = ""  # its Envoy node.id (the workload's Consul service ID), the ADS streams' key

    @property
    def runs_as_sidecar(self) -> bool:
        return self.sidecar is not None


def expected_proxies(mesh: Mesh, host: ManagedHost) -> tuple[ExpectedProxy, ...]:
    """The proxies of `host`, each with the files mesh would write for it (a config error raises, as in deploy)."""
    found = []
    for workload in host.workloads:
        proxy = paths.proxy_name(workload)
        sidecar = host.kind == "container_host"
        cfg = compute_proxy_config(mesh, workload)
        found.append(ExpectedProxy(
            workload=workload, proxy=proxy, files=render_proxy_files(cfg), inbound_files=tuple(inbound_files(cfg)),
            cert_path=paths.cert_path(proxy), ca_path=paths.proxy_ca_path(proxy),
            admin_socket=paths.admin_socket_path(proxy),
            unit=None if sidecar else paths.envoy_unit_name(proxy),
            sidecar=sidecar_name(workload) if sidecar else None,
            upstream_clusters=tuple((item.service, upstream_cluster_name(item.service))
                                    for item in workload.upstreams),
            permissive=mesh.policy(workload.service).mtls == "permissive", delivery=host.delivery,
            node_id=cfg.node_id))
    return tuple(found)
