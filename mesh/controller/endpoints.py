"""Which endpoints an EDS file gets from what Consul says about a service, and the file itself. Pure.

It owns the up/registered rule (mesh's own instances of this mesh id; up = no critical check), the panic rule
and the rewrite of one ClusterLoadAssignment file; it must not talk to Consul or hosts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mesh import catalog
from mesh.config.compute import is_ip
from mesh.config.telemetry import ENDPOINT_METADATA_NAMESPACE
from mesh.render import ENDPOINT_TYPE, RenderedFile, resource_file


@dataclass(frozen=True, order=True)
class Endpoint:
    """One instance as Envoy reaches it: the service Address (the node's when empty) and Port; and who answers
    there (Service, Meta version and host, ID: the lb_endpoint's metadata, which callers' access logs read; empty
    when Consul does not say)."""

    address: str
    port: int
    service: str = ""
    version: str = ""
    instance: str = ""
    host: str = ""

    @property
    def metadata(self) -> dict[str, str]:
        """filter_metadata `mesh` of its lb_endpoint: the keys Consul gave a value."""
        found = {"service": self.service, "version": self.version, "instance": self.instance, "host": self.host}
        return {key: value for key, value in found.items() if value}


@dataclass(frozen=True)
class ServiceEndpoints:
    """What Consul lists for one service, this mesh's instances only: every registered one, and those up."""

    service: str
    registered: tuple[Endpoint, ...]
    up: tuple[Endpoint, ...]


def service_endpoints(service: str, entries: Iterable[Mapping[str, Any]], mesh_id: str) -> ServiceEndpoints:
    """The endpoints of /v1/health/service/<service>'s entries: Meta managed-by mesh with this mesh id only
    (another mesh's instances are never ours), an IP address and a port; up when no check is critical (a `mesh drain` check is a critical
    check like any other). Sorted, so equal sets make equal files."""
    registered, up = set(), set()
    for entry in entries:
        node, svc = entry.get("Node") or {}, entry.get("Service") or {}
        meta = svc.get("Meta") or {}
        if meta.get(catalog.MANAGED_BY) != catalog.MESH or meta.get(catalog.MESH_ID) != mesh_id:
            continue
        endpoint = Endpoint(str(svc.get("Address") or node.get("Address") or ""), int(svc.get("Port") or 0),
                            str(svc.get("Service") or ""), str(meta.get("version") or ""), str(svc.get("ID") or ""),
                            str(meta.get("host") or ""))
        if not is_ip(endpoint.address) or not 0 < endpoint.port < 65536:
            continue  # an EDS file holds IP addresses only (a name would be a STRICT_DNS cluster's)
        registered.add(endpoint)
        if not any(check.get("Status", "critical") == "critical" for check in entry.get("Checks") or []):
            up.add(endpoint)
    return ServiceEndpoints(service, tuple(sorted(registered)), tuple(sorted(up)))


def chosen_endpoints(seen: ServiceEndpoints) -> tuple[Endpoint, ...] | None:
    """What a caller's EDS file gets: the up instances; when none is up but some are registered, all registered
    ones (Envoy's panic threshold then decides, as Istio does); None when Consul lists none: keep what the
    file had (never an empty endpoint set)."""
    if seen.up:
        return seen.up
    if seen.registered:
        return seen.registered
    return None


def file_endpoints(file: RenderedFile) -> tuple[Endpoint, ...]:
    """The endpoints an EDS file holds now (sorted), with their metadata."""
    assignment = _assignment(file)
    found = set()
    for locality in assignment.get("endpoints") or []:
        for item in locality.get("lb_endpoints") or []:
            socket = item["endpoint"]["address"]["socket_address"]
            who = ((item.get("metadata") or {}).get("filter_metadata") or {}).get(ENDPOINT_METADATA_NAMESPACE) or {}
            found.add(Endpoint(str(socket["address"]), int(socket["port_value"]), str(who.get("service") or ""),
                               str(who.get("version") or ""), str(who.get("instance") or ""),
                               str(who.get("host") or "")))
    return tuple(sorted(found))


def with_endpoints(proxy: str, file: RenderedFile, endpoints: tuple[Endpoint, ...]) -> RenderedFile:
    """`file` (an EDS file as the plan rendered it) holding `endpoints` instead: the same ClusterLoadAssignment
    with one locality whose lb_endpoints are these, in sorted order. The plan's own file when it already holds
    exactly these endpoints, so a controller never rewrites what the deploy wrote."""
    wanted = tuple(sorted(set(endpoints)))
    if file_endpoints(file) == wanted:
        return file
    assignment = dict(_assignment(file))
    localities = list(assignment.get("endpoints") or [{}])
    first = {key: value for key, value in dict(localities[0] or {}).items() if key != "lb_endpoints"}
    first["lb_endpoints"] = [_lb_endpoint(endpoint) for endpoint in wanted]
    assignment["endpoints"] = [first]
    return resource_file(proxy, file.path, file.kind, (assignment,))


def _lb_endpoint(endpoint: Endpoint) -> dict[str, Any]:
    """One lb_endpoint as the deploy renders it (templates/envoy/_macros.j2 load_assignment)."""
    item: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": endpoint.address,
                                                                        "port_value": endpoint.port}}}}
    if endpoint.metadata:
        item["metadata"] = {"filter_metadata": {ENDPOINT_METADATA_NAMESPACE: endpoint.metadata}}
    return item


def _assignment(file: RenderedFile) -> Mapping[str, Any]:
    parsed = yaml.safe_load(file.content)
    resources = parsed.get("resources") if isinstance(parsed, dict) else None
    if not isinstance(resources, list) or len(resources) != 1 or not isinstance(resources[0], dict) \
            or resources[0].get("@type") != ENDPOINT_TYPE:
        raise ValueError(f"{file.path} is not a file of one ClusterLoadAssignment")
    return resources[0]
