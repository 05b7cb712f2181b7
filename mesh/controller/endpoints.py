"""Which endpoints an EDS file gets from what Consul says about a service, and the file itself. Pure.

It owns the up/registered rule (mesh's own instances of this mesh id; up = no critical check), the panic rule,
the version filter of a version cluster's file, the localities and priorities a caller sees (its zone first, then
its region, then the rest) and the rewrite of one ClusterLoadAssignment file; it must not talk to Consul or hosts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from mesh import catalog
from mesh.config.compute import is_ip
from mesh.config.telemetry import ENDPOINT_METADATA_NAMESPACE
from mesh.config.traffic import OVERPROVISIONING_FACTOR, endpoint_priority, prioritized
from mesh.render import ENDPOINT_TYPE, RenderedFile, resource_file


@dataclass(frozen=True, order=True)
class Endpoint:
    """One instance as Envoy reaches it: the service Address (the node's when empty) and Port; who answers
    there (Service, Meta version and host, ID: the lb_endpoint's metadata, which callers' access logs read; empty
    when Consul does not say); where it runs (Meta zone and region: its locality; empty when unknown)."""

    address: str
    port: int
    service: str = ""
    version: str = ""
    instance: str = ""
    host: str = ""
    zone: str = ""
    region: str = ""

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

    def of_version(self, version: str | None) -> ServiceEndpoints:
        """Only the instances of `version` (Meta version); all of them for None (the `upstream-<svc>` file)."""
        if version is None:
            return self
        return replace(self, registered=tuple(e for e in self.registered if e.version == version),
                       up=tuple(e for e in self.up if e.version == version))


@dataclass(frozen=True, order=True)
class Locality:
    """One LocalityLbEndpoints of a caller's file: its priority for that caller (0 first), the locality (empty
    strings when unknown) and its endpoints (sorted)."""

    priority: int
    region: str
    zone: str
    endpoints: tuple[Endpoint, ...]


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
                            str(meta.get("host") or ""), str(meta.get("zone") or ""), str(meta.get("region") or ""))
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


def localities(endpoints: Iterable[Endpoint], zone: str | None, region: str | None) -> tuple[Locality, ...]:
    """`endpoints` as a caller in `zone`/`region` sees them: grouped by priority (mesh.config.traffic's
    endpoint_priority; the priorities used renumbered 0..n-1, as Envoy wants them without gaps), then by locality;
    sorted, so equal sets make equal files."""
    members = sorted(set(endpoints))
    priorities = prioritized([endpoint_priority(zone, region, endpoint.zone or None, endpoint.region or None)
                              for endpoint in members])
    groups: dict[tuple[int, str, str], list[Endpoint]] = {}
    for endpoint, priority in zip(members, priorities, strict=True):
        groups.setdefault((priority, endpoint.region, endpoint.zone), []).append(endpoint)
    return tuple(sorted(Locality(priority, found_region, found_zone, tuple(found))
                        for (priority, found_region, found_zone), found in groups.items()))


def file_localities(file: RenderedFile) -> tuple[Locality, ...]:
    """The localities an EDS file holds now (sorted), with their endpoints' metadata."""
    found = []
    for group in _assignment(file).get("endpoints") or []:
        where = group.get("locality") or {}
        region, zone = str(where.get("region") or ""), str(where.get("zone") or "")
        members = set()
        for item in group.get("lb_endpoints") or []:
            socket = item["endpoint"]["address"]["socket_address"]
            who = ((item.get("metadata") or {}).get("filter_metadata") or {}).get(ENDPOINT_METADATA_NAMESPACE) or {}
            members.add(Endpoint(str(socket["address"]), int(socket["port_value"]), str(who.get("service") or ""),
                                 str(who.get("version") or ""), str(who.get("instance") or ""),
                                 str(who.get("host") or ""), zone, region))
        found.append(Locality(int(group.get("priority") or 0), region, zone, tuple(sorted(members))))
    return tuple(sorted(found))


def file_endpoints(file: RenderedFile) -> tuple[Endpoint, ...]:
    """The endpoints an EDS file holds now (sorted), with their metadata and locality."""
    return tuple(sorted({endpoint for group in file_localities(file) for endpoint in group.endpoints}))


def with_endpoints(proxy: str, file: RenderedFile, endpoints: tuple[Endpoint, ...], zone: str | None = None,
                   region: str | None = None) -> RenderedFile:
    """`file` (an EDS file as the plan rendered it) holding `endpoints` instead, as a caller in `zone`/`region`
    sees them: the same ClusterLoadAssignment with a LocalityLbEndpoints per priority and locality (localities())
    and the overprovisioning factor. The plan's own file when it already holds exactly these, so a controller never
    rewrites what the deploy wrote."""
    wanted = localities(endpoints, zone, region)
    if file_localities(file) == wanted:
        return file
    assignment = dict(_assignment(file))
    assignment["endpoints"] = [_locality(group) for group in wanted]
    assignment["policy"] = {**dict(assignment.get("policy") or {}), "overprovisioning_factor": OVERPROVISIONING_FACTOR}
    return resource_file(proxy, file.path, file.kind, (assignment,))


class EdsRenders:
    """A bounded memo of with_endpoints for the controller's snapshot: proxies of the same name (a service's
    callers on every host) get byte-identical EDS files, so one render serves them all.

    A render is keyed by everything with_endpoints reads: the proxy name, the plan file (path, kind, content), a
    digest of the chosen endpoints (repr of the sorted Endpoint tuple: every field), the zone and the region. The
    digest of a service's chosen endpoints is computed once per Consul answer (`chosen()`, keyed by the answer
    object), not per proxy. Least recently used renders go past `max_entries` or `max_chars` of content.
    Not thread-safe: one owner (the controller's loop) builds snapshots."""

    def __init__(self, max_entries: int = 4096, max_chars: int = 128 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.hits = 0
        self.misses = 0
        self._renders: OrderedDict[tuple[object, ...], RenderedFile] = OrderedDict()
        self._chars = 0
        # (service, version) -> (the ServiceEndpoints it was chosen from, the chosen endpoints, their digest)
        self._chosen: dict[tuple[str, str | None], tuple[ServiceEndpoints, tuple[Endpoint, ...] | None, str]] = {}

    def chosen(self, seen: ServiceEndpoints, version: str | None) -> tuple[tuple[Endpoint, ...] | None, str]:
        """chosen_endpoints(seen.of_version(version)) and its digest, computed once per answer `seen`."""
        key = (seen.service, version)
        found = self._chosen.get(key)
        if found is not None and found[0] is seen:
            return found[1], found[2]
        endpoints = chosen_endpoints(seen.of_version(version))
        digest = hashlib.sha256(repr(endpoints).encode()).hexdigest()
        self._chosen[key] = (seen, endpoints, digest)
        return endpoints, digest

    def with_endpoints(self, proxy: str, file: RenderedFile, endpoints: tuple[Endpoint, ...], digest: str,
                       zone: str | None = None, region: str | None = None) -> RenderedFile:
        """with_endpoints(proxy, file, endpoints, zone, region), rendered once per distinct input; `digest` is
        chosen()'s for these endpoints."""
        key = (proxy, file.path, file.kind, file.content, digest, zone, region)
        found = self._renders.get(key)
        if found is not None:
            self.hits += 1
            self._renders.move_to_end(key)
            return found
        self.misses += 1
        rendered = with_endpoints(proxy, file, endpoints, zone, region)
        self._renders[key] = rendered
        self._chars += len(rendered.content)
        while self._renders and (len(self._renders) > self.max_entries or self._chars > self.max_chars):
            _, dropped = self._renders.popitem(last=False)
            self._chars -= len(dropped.content)
        return rendered


def _locality(group: Locality) -> dict[str, Any]:
    """One LocalityLbEndpoints as the deploy renders it (templates/envoy/_macros.j2 load_assignment)."""
    item: dict[str, Any] = {"lb_endpoints": [_lb_endpoint(endpoint) for endpoint in group.endpoints]}
    where = {key: value for key, value in (("region", group.region), ("zone", group.zone)) if value}
    if where:
        item["locality"] = where
    if group.priority:
        item["priority"] = group.priority
    return item


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
