"""Where every proxy serves its Prometheus metrics (`ProxyTarget`), and the file_sd JSON Prometheus reads.

Pure: the inventory's mesh in, targets out; it must not reach a host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mesh.config import paths
from mesh.inventory.model import Mesh, Protocol

METRICS_PATH = "/stats/prometheus"

TargetKind = Literal["vm", "container"]


@dataclass(frozen=True)
class ProxyTarget:
    """One proxy's metrics port: `proxy` is its name on its host (`web-8080`, as in units and `mesh status`),
    `instance` its node id fleet-wide (the Consul service id, the access lines' `proxy`), `address` the host's
    connection address, `port` the workload's metrics_port."""

    proxy: str
    service: str
    version: str
    host: str
    kind: TargetKind
    address: str
    port: int
    instance: str = ""
    protocol: Protocol = "http"

    @property
    def endpoint(self) -> str:
        """`address:port`, an IPv6 address in brackets (`[fd00::1]:20000`)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}{METRICS_PATH}"


def proxy_targets(mesh: Mesh) -> tuple[ProxyTarget, ...]:
    """Every proxy of the mesh, in inventory order (hosts, then each host's workloads)."""
    return tuple(
        ProxyTarget(proxy=paths.proxy_name(workload), service=workload.service, version=workload.version,
                    host=host.name, kind="vm" if host.kind == "vm" else "container",
                    address=host.connection.address, port=workload.metrics_port, instance=workload.consul_id,
                    protocol=workload.protocol)
        for host in mesh.hosts for workload in host.workloads)


def file_sd(targets: tuple[ProxyTarget, ...] | list[ProxyTarget], mesh_id: str) -> list[dict[str, Any]]:
    """Prometheus `file_sd_configs` entries: one per proxy, its labels naming the mesh, service, version, proxy,
    host and kind (Prometheus drops the `__` labels after using `__metrics_path__`)."""
    return [{"targets": [target.endpoint],
             "labels": {"__metrics_path__": METRICS_PATH, "mesh_id": mesh_id, "mesh_service": target.service,
                        "mesh_version": target.version, "mesh_proxy": target.proxy, "mesh_host": target.host,
                        "mesh_kind": target.kind, "mesh_instance": target.instance}}
            for target in targets]
