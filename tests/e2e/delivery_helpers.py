"""Helpers of the end-to-end tests run with both deliveries (issue 23): an inventory copy with `mesh_delivery`
set in all vars, the lab's proxies with their node ids, and what a running Envoy shows of where its config comes
from (the start step's marker, its node metadata in /server_info, its bootstrap's config sources in
/config_dump), so an `xds` variant proves its proxies really run on ADS. Every probe returns what it saw; the
tests decide.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_helpers import Edit, inventory_copy, sh, wait_for
from lab_helpers import LabUp
from rollout_helpers import lab_state_dir

from mesh.config import paths
from mesh.config.xds import DELIVERIES, DELIVERY_MARKER, METADATA_DELIVERY_KEY, XDS_CLUSTER, Delivery
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory

__all__ = ["DELIVERIES", "Delivery"]

ON_DELIVERY_WAIT = 120.0  # a deploy's restarted Envoys up on their new bootstrap: generous


# ---- inventories -------------------------------------------------------------------------------------------

def with_delivery(delivery: Delivery, edit: Edit | None = None) -> Edit | None:
    """`edit` for `files` (the inventory as the files tests always had it: the default, not written), else
    `edit` then `mesh_delivery: <delivery>` in all vars."""
    if delivery == "files":
        return edit

    def both(document: dict[str, Any]) -> None:
        if edit is not None:
            edit(document)
        document["all"].setdefault("vars", {})["mesh_delivery"] = delivery

    return both


def delivery_inventory(folder: Path, delivery: Delivery, edit: Edit | None = None,
                       hosts: dict[str, Edit] | None = None) -> Path:
    """inventory_copy of inventory/lab.yaml (the lab's state dir) with `edit` and `hosts`, on `delivery`."""
    return inventory_copy(folder, lab_state_dir(), edit=with_delivery(delivery, edit), hosts=hosts)


# ---- the lab's proxies -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabProxy:
    """One proxy as the inventory places it: its host, its folder name there and its node id (Consul ID)."""

    host: str
    proxy: str
    node_id: str
    service: str

    @property
    def folder(self) -> str:
        return paths.proxy_dir(self.proxy)


def lab_proxies(inventory: Path) -> list[LabProxy]:
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    return [LabProxy(host.name, paths.proxy_name(w), w.consul_id, w.service) for host in mesh.hosts
            for w in host.workloads]


def lab_proxy(inventory: Path, host: str, service: str) -> LabProxy:
    for found in lab_proxies(inventory):
        if (found.host, found.service) == (host, service):
            return found
    raise AssertionError(f"no {service} proxy on {host} in {inventory}")


# ---- where a running Envoy's config comes from -------------------------------------------------------------

def admin(lab: LabUp, proxy: LabProxy, path: str) -> str:
    """An admin API answer of the proxy's Envoy (its unix socket), `` when it does not answer."""
    socket = shlex.quote(paths.admin_socket_path(proxy.proxy))
    done = sh(lab, proxy.host, f"curl -sS --max-time 5 --unix-socket {socket} {shlex.quote('http://admin' + path)}",
              timeout=30)
    return done.stdout if done.returncode == 0 else ""


@dataclass(frozen=True)
class DeliverySeen:
    """What one running Envoy shows of its delivery."""

    marker: str  # <proxy>/admin/delivery as the start step wrote it ("" when absent)
    metadata: str  # node.metadata.mesh_delivery in /server_info ("" when absent, "?" when no answer)
    lds: str  # "ads", "path" or "" (the bootstrap's dynamic_resources.lds_config in /config_dump)
    cds: str
    eds_sources: tuple[str, ...]  # each dynamic EDS cluster's eds_config kind ("ads", "path", ...)
    xds_cluster: bool  # the bootstrap's static clusters hold mesh-xds

    def on_ads(self) -> bool:
        return (self.marker == "xds" and self.metadata == "xds" and self.lds == self.cds == "ads"
                and self.xds_cluster and bool(self.eds_sources) and set(self.eds_sources) == {"ads"})

    def on_files(self) -> bool:
        """Started from the files bootstrap (a start step's marker, when there is one, says so too)."""
        return (self.marker in ("", "files") and self.metadata == "" and self.lds == self.cds == "path"
                and not self.xds_cluster and "ads" not in self.eds_sources)


def _source_kind(source: Any) -> str:
    if not isinstance(source, dict):
        return ""
    if "ads" in source:
        return "ads"
    if "path_config_source" in source or "path" in source:
        return "path"
    return ",".join(sorted(source)) or ""


def delivery_seen(lab: LabUp, proxy: LabProxy) -> DeliverySeen:
    marker = sh(lab, proxy.host, f"cat {shlex.quote(paths.admin_dir(proxy.proxy) + '/' + DELIVERY_MARKER)}")
    try:
        info = json.loads(admin(lab, proxy, "/server_info") or "null")
        metadata = str(((info or {}).get("node") or {}).get("metadata", {}).get(METADATA_DELIVERY_KEY, ""))
    except (ValueError, AttributeError):
        metadata = "?"
    lds = cds = ""
    eds: list[str] = []
    xds_cluster = False
    try:
        dump = json.loads(admin(lab, proxy, "/config_dump") or "null") or {}
    except ValueError:
        dump = {}
    for config in dump.get("configs") or []:
        kind = str(config.get("@type", ""))
        if kind.endswith("BootstrapConfigDump"):
            bootstrap = config.get("bootstrap") or {}
            dynamic = bootstrap.get("dynamic_resources") or {}
            lds, cds = _source_kind(dynamic.get("lds_config")), _source_kind(dynamic.get("cds_config"))
            statics = (bootstrap.get("static_resources") or {}).get("clusters") or []
            xds_cluster = any(cluster.get("name") == XDS_CLUSTER for cluster in statics)
        elif kind.endswith("ClustersConfigDump"):
            for entry in config.get("dynamic_active_clusters") or []:
                cluster = entry.get("cluster") or {}
                if "eds_cluster_config" in cluster:
                    eds.append(_source_kind(cluster["eds_cluster_config"].get("eds_config")))
    return DeliverySeen(marker.stdout.strip() if marker.returncode == 0 else "", metadata, lds, cds,
                        tuple(eds), xds_cluster)


def fleet_delivery(lab: LabUp, proxies: Iterable[LabProxy]) -> dict[str, DeliverySeen]:
    """host/proxy -> what its Envoy shows."""
    return {f"{p.host}/{p.proxy}": delivery_seen(lab, p) for p in proxies}


def assert_delivery(lab: LabUp, inventory: Path, delivery: Delivery, timeout: float = ON_DELIVERY_WAIT) -> None:
    """Every proxy of the inventory runs on `delivery` (waits for Envoys a deploy restarted)."""
    proxies = lab_proxies(inventory)
    assert proxies, f"{inventory} has no proxy: nothing to check"

    def all_on(seen: dict[str, DeliverySeen]) -> bool:
        return all(s.on_ads() if delivery == "xds" else s.on_files() for s in seen.values())

    wait_for(lambda: fleet_delivery(lab, proxies), all_on, f"every proxy of {inventory.name} running on {delivery}",
             timeout=timeout, interval=2.0)


def xds_connections(lab: LabUp, proxy: LabProxy) -> dict[str, int]:
    """controller address -> the proxy's active connections to it in its mesh-xds cluster (/clusters)."""
    found: dict[str, int] = {}
    for line in admin(lab, proxy, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == XDS_CLUSTER and parts[2] == "cx_active":
            found[parts[1].rsplit(":", 1)[0]] = int(parts[3])
    return found
