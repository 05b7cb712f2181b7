"""The controller's snapshot: per (host, proxy) the files the proxy should run, from the spec and the endpoints
known from Consul (go-control-plane's snapshot per node). Pure.

It owns which endpoints each EDS file gets (the last known ones when Consul says nothing) and each proxy's
resource version; it must not talk to Consul or hosts, and knows nothing of the transport.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mesh.controller.endpoints import Endpoint, ServiceEndpoints, chosen_endpoints, with_endpoints
from mesh.controller.protocol import relpath_in, resource_version
from mesh.controller.spec import ControllerSpec, ProxySpec
from mesh.render import ProxyFiles, RenderedFile

ProxyKey = tuple[str, str]  # (host name, proxy name)
KnownEndpoints = Mapping[str, tuple[Endpoint, ...]]  # service -> the endpoints its callers get


@dataclass(frozen=True)
class ProxySnapshot:
    """One proxy's desired files: the spec's, with each EDS file holding the endpoints known for its service.
    `files` keeps the bootstrap (validation needs it); the controller moves only the xds files."""

    host: str
    files: ProxyFiles
    validation_key: str  # files_digest of the plan's files: endpoint rewrites alone need no other validation
    unsettled: frozenset[str] = frozenset()  # EDS relpaths whose service Consul never answered for: a host's own stays
    # The files the controller owns: the EDS files it fills from Consul. Every other resource file is the
    # deploy's: the controller writes one only when the host lacks it, and never replaces or removes one. A
    # deploy stopped halfway (--serial, a failed health gate) leaves hosts with newer files than the spec the
    # controllers hold, and they must stay.
    owned: frozenset[str] = frozenset()

    @property
    def proxy(self) -> str:
        return self.files.proxy

    @property
    def xds(self) -> dict[str, RenderedFile]:
        """Relative path (`xds/eds.api.yaml`) -> file, every file but the bootstrap."""
        return {relpath_in(self.files.proxy_dir, file.path): file for file in self.files.files
                if file.kind != "bootstrap"}

    @property
    def digests(self) -> dict[str, str]:
        """Relative path -> sha256 of every xds file: what `state` reports when the host runs them."""
        return {path: file.sha256 for path, file in self.xds.items()}

    @property
    def version(self) -> str:
        return resource_version(self.digests)

    def on(self, on_host: Mapping[str, str]) -> dict[str, str]:
        """The digests the host should have, given what it has (relpath -> sha256): a file the controller does not
        own, and an unsettled EDS file, that the host already has are left as they are (a controller that just
        started, or cannot reach Consul, never puts the plan's endpoints back over fresher ones; a controller
        never undoes a deploy)."""
        digests = self.digests
        for relpath in digests:
            if relpath in on_host and (relpath not in self.owned or relpath in self.unsettled):
                digests[relpath] = on_host[relpath]
        return digests

    def version_on(self, on_host: Mapping[str, str]) -> str:
        return resource_version(self.on(on_host))

    @property
    def bootstrap_sha256(self) -> str:
        """The sha256 of the bootstrap file's text (as `state` reports envoy.yaml), not its metadata digest."""
        return self.files.bootstrap.sha256


Snapshot = Mapping[ProxyKey, ProxySnapshot]


def files_digest(files: ProxyFiles) -> str:
    """One proxy's whole file set (bootstrap included)."""
    lines = "".join(f"{file.path} {file.kind} {file.sha256}\n" for file in files.files)
    return hashlib.sha256(lines.encode()).hexdigest()


def spec_files(proxy: ProxySpec) -> ProxyFiles:
    """A proxy's files exactly as the plan rendered them."""
    return ProxyFiles(proxy.name, proxy.proxy_dir,
                      tuple(RenderedFile(file.path, file.content, file.kind) for file in proxy.files),
                      proxy.bootstrap_sha256)


def remembered(known: KnownEndpoints, seen: ServiceEndpoints) -> KnownEndpoints:
    """`known` after Consul's answer `seen`: its chosen endpoints, or, when Consul lists none of this mesh's
    instances, what was known before (at start: nothing, so the spec's own file stays)."""
    chosen = chosen_endpoints(seen)
    if chosen is None or known.get(seen.service) == chosen:
        return known
    return MappingProxyType({**known, seen.service: chosen})


def proxy_snapshot(host: str, proxy: ProxySpec, known: KnownEndpoints) -> ProxySnapshot:
    """One proxy's desired files: each EDS file of proxy.endpoints rewritten with its service's known endpoints
    (left as the plan wrote it when none are known: `unsettled`, and a host's own file stays). Its validation key is
    the plan's file set: a rewrite only replaces lb_endpoints with IP:port pairs and their metadata strings
    (endpoints.py takes no other), which cannot make Envoy refuse a set it accepted, so the controller runs Envoy
    once per plan file set, not once per endpoint change."""
    files = spec_files(proxy)
    rewritten, unsettled = [], set()
    for file in files.files:
        service = proxy.endpoints.get(file.path)
        endpoints = known.get(service) if service is not None else None
        if service is not None and endpoints is None:
            unsettled.add(relpath_in(files.proxy_dir, file.path))
        rewritten.append(file if endpoints is None else with_endpoints(proxy.name, file, endpoints))
    owned = frozenset(relpath_in(files.proxy_dir, path) for path in proxy.endpoints)
    return ProxySnapshot(host, ProxyFiles(files.proxy, files.proxy_dir, tuple(rewritten), files.bootstrap_sha256),
                         files_digest(files), frozenset(unsettled), owned)


def build_snapshot(spec: ControllerSpec, known: KnownEndpoints) -> dict[ProxyKey, ProxySnapshot]:
    """Every proxy of every host of the spec, with the known endpoints."""
    return {(host.name, proxy.name): proxy_snapshot(host.name, proxy, known)
            for host in spec.hosts for proxy in host.proxies}


def watched_services(spec: ControllerSpec) -> tuple[str, ...]:
    """Every service some proxy's EDS file is filled from, sorted."""
    return tuple(sorted({service for host in spec.hosts for proxy in host.proxies
                         for service in proxy.endpoints.values()}))
