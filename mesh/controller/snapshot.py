"""The controller's snapshot: per (host, proxy) the files the proxy should run, from the spec, the endpoints
known from Consul, each service's effective traffic policy and its inbound authorization rules (go-control-plane's
snapshot per node). Pure.

It owns which endpoints each EDS file gets (the last known ones when Consul says nothing), which route and inbound
files are redone and each proxy's resource version; it must not talk to Consul or hosts, and knows nothing of the transport.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from types import MappingProxyType

from mesh.config.authz import InboundInputs
from mesh.config.traffic import RouteInputs
from mesh.controller.endpoints import EdsRenders, ServiceEndpoints, chosen_endpoints, with_endpoints
from mesh.controller.inbound import Rules, inbound_file
from mesh.controller.protocol import relpath_in, resource_version
from mesh.controller.routes import RoutePolicies, route_file
from mesh.controller.spec import ControllerSpec, ProxySpec
from mesh.render import BOOTSTRAP_KINDS, ProxyFiles, RenderedFile

ProxyKey = tuple[str, str]  # (host name, proxy name)
# relpath_in of (proxy folder, file path), computed once per pair (posixpath.relpath is slow, and every build and
# every snapshot's version asks it for every file of every proxy)
file_relpath = lru_cache(maxsize=65536)(relpath_in)
KnownEndpoints = Mapping[str, ServiceEndpoints]  # service -> Consul's last answer that listed some instance


@dataclass(frozen=True)
class ProxySnapshot:
    """One proxy's desired files: the spec's, with each EDS file holding the endpoints known for its service.
    `files` keeps the bootstrap (validation needs it); the controller moves only the xds files."""

    host: str
    files: ProxyFiles
    validation_key: str  # files_digest of the plan's files with routes and inbound redone: endpoints need no other
    # EDS relpaths whose instances Consul never listed, route (inbound) relpaths before the traffic (authorization)
    # KV was read: a host's own stays
    unsettled: frozenset[str] = frozenset()
    # The files the controller owns: the EDS files it fills from Consul, the route files it redoes from the traffic
    # policy, the inbound files it redoes from the authorization rules. Every other resource file is the deploy's: the controller writes one only when the host lacks it, and
    # never replaces or removes one. A deploy stopped halfway (--serial, a failed health gate) leaves hosts with
    # newer files than the spec the controllers hold, and they must stay.
    owned: frozenset[str] = frozenset()

    @property
    def proxy(self) -> str:
        return self.files.proxy

    @property
    def xds(self) -> dict[str, RenderedFile]:
        """Relative path (`xds/eds.api.yaml`) -> file, every file but the bootstrap."""
        return {file_relpath(self.files.proxy_dir, file.path): file for file in self.files.files
                if file.kind not in BOOTSTRAP_KINDS}

    @property
    def digests(self) -> dict[str, str]:
        """Relative path -> sha256 of every xds file: what `state` reports when the host runs them."""
        return dict(self._digests)

    @cached_property
    def _digests(self) -> Mapping[str, str]:
        return MappingProxyType({path: file.sha256 for path, file in self.xds.items()})

    @cached_property
    def version(self) -> str:
        return resource_version(self._digests)

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
    """`known` after Consul's answer `seen`: that answer, or, when Consul lists none of this mesh's instances, what
    was known before (at start: nothing, so the spec's own file stays)."""
    if not seen.registered or known.get(seen.service) == seen:
        return known
    return MappingProxyType({**known, seen.service: seen})


def proxy_snapshot(host: str, proxy: ProxySpec, known: KnownEndpoints, policies: RoutePolicies | None = None,
                   rules: Rules | None = None, renders: EdsRenders | None = None) -> ProxySnapshot:
    """One proxy's desired files: each route file of proxy.routes redone under its service's effective policy
    (`policies`; None before the traffic KV was read: left as the plan wrote it, `unsettled`), each inbound file of
    proxy.inbound under its service's authorization rules and run-time deny (`rules`; None before the authorization
    KV was read: likewise), then each EDS file
    of proxy.endpoints rewritten with the chosen instances of its service (and version), in localities by priority
    for the proxy's zone and region (left as the plan wrote it when Consul never listed one: `unsettled`, and a
    host's own file stays).

    Its validation key is the file set with the routes and inbound files redone: an endpoint rewrite only replaces lb_endpoints
    with IP:port pairs, their metadata strings and localities (endpoints.py takes no other), which cannot make
    Envoy refuse a set it accepted, so the controller runs Envoy once per route set, not once per endpoint change.

    `renders` (optional) memoizes the EDS rewrites across proxies and builds: the same files either way."""
    files = spec_files(proxy)
    routed, unsettled = [], set()
    for file in files.files:
        if file.path in proxy.routes and policies is None:
            unsettled.add(file_relpath(files.proxy_dir, file.path))
        elif file.path in proxy.routes and policies is not None:
            redone = route_file(proxy, file.path, policies)
            file = file if redone.content == file.content else redone
        elif file.path in proxy.inbound and rules is None:
            unsettled.add(file_relpath(files.proxy_dir, file.path))
        elif file.path in proxy.inbound and rules is not None:
            redone = inbound_file(proxy, file.path, rules)
            file = file if redone.content == file.content else redone
        routed.append(file)
    rewritten = []
    for file in routed:
        source = proxy.endpoints.get(file.path)
        seen = known.get(source.service) if source is not None else None
        if seen is None or source is None:
            endpoints, digest = None, ""
        elif renders is None:
            endpoints, digest = chosen_endpoints(seen.of_version(source.version)), ""
        else:
            endpoints, digest = renders.chosen(seen, source.version)
        if source is not None and endpoints is None:
            unsettled.add(file_relpath(files.proxy_dir, file.path))
        if endpoints is None:
            rewritten.append(file)
        elif renders is None:
            rewritten.append(with_endpoints(proxy.name, file, endpoints, proxy.zone, proxy.region))
        else:
            rewritten.append(renders.with_endpoints(proxy.name, file, endpoints, digest, proxy.zone, proxy.region))
    owned = frozenset(file_relpath(files.proxy_dir, path) for path in (*proxy.endpoints, *proxy.routes, *proxy.inbound))
    return ProxySnapshot(host, ProxyFiles(files.proxy, files.proxy_dir, tuple(rewritten), files.bootstrap_sha256),
                         files_digest(replace(files, files=tuple(routed))), frozenset(unsettled), owned)


@dataclass(frozen=True)
class Built:
    """A snapshot and the inputs it was built from: what an incremental build_snapshot starts from."""

    snapshot: Snapshot
    spec: ControllerSpec
    known: KnownEndpoints
    policies: RoutePolicies | None
    rules: Rules | None


def build_snapshot(spec: ControllerSpec, known: KnownEndpoints, policies: RoutePolicies | None = None,
                   rules: Rules | None = None, previous: Built | None = None,
                   renders: EdsRenders | None = None) -> dict[ProxyKey, ProxySnapshot]:
    """Every proxy of every host of the spec, with the known endpoints, the effective policies and the inbound
    rules (None: the traffic, the authorization KV not read yet).

    With `previous`, a proxy whose inputs are the same as then (its spec, the known entries of its EDS files'
    services, the policies of its route files' services, the rules of its inbound files' services) keeps its
    previous ProxySnapshot object: exactly what a full build gives, at the cost of a few lookups per proxy, so one
    Consul change redoes only the callers of that service. `renders` shares EDS rewrites (EdsRenders)."""
    if previous is None:
        return {(host.name, proxy.name): proxy_snapshot(host.name, proxy, known, policies, rules, renders)
                for host in spec.hosts for proxy in host.proxies}
    before = {(host.name, proxy.name): proxy for host in previous.spec.hosts for proxy in host.proxies}
    moved = _Moved(_moved(known, previous.known), _moved_or_all(policies, previous.policies),
                   _moved_or_all(rules, previous.rules))
    built: dict[ProxyKey, ProxySnapshot] = {}
    for host in spec.hosts:
        for proxy in host.proxies:
            key = (host.name, proxy.name)
            kept = previous.snapshot.get(key)
            built[key] = kept if kept is not None and _same_inputs(proxy, before.get(key), moved) \
                else proxy_snapshot(host.name, proxy, known, policies, rules, renders)
    return built


@dataclass(frozen=True)
class _Moved:
    """Since the previous build: the services whose known endpoints, policy, inbound rules are not the same (None:
    every service's, the traffic or authorization KV read or lost since)."""

    known: frozenset[str]
    policies: frozenset[str] | None
    rules: frozenset[str] | None


def _moved(now: Mapping[str, object], then: Mapping[str, object]) -> frozenset[str]:
    if now is then:
        return frozenset()
    return frozenset(service for service in {*now, *then} if not _same(now.get(service), then.get(service)))


def _moved_or_all(now: Mapping[str, object] | None, then: Mapping[str, object] | None) -> frozenset[str] | None:
    if now is None or then is None:
        return frozenset() if now is then else None
    return _moved(now, then)


def _same_inputs(proxy: ProxySpec, proxy_then: ProxySpec | None, moved: _Moved) -> bool:
    """Whether everything proxy_snapshot reads for `proxy` is what it was for the previous build."""
    if proxy_then is None or not _same(proxy, proxy_then):
        return False
    if moved.known and any(source.service in moved.known for source in proxy.endpoints.values()):
        return False
    if proxy.routes and moved.policies != frozenset() and (
            moved.policies is None
            or any(RouteInputs.from_json(data).service in moved.policies for data in proxy.routes.values())):
        return False
    return not (proxy.inbound and moved.rules != frozenset() and (
        moved.rules is None
        or any(InboundInputs.from_json(entry["inputs"]).service in moved.rules for entry in proxy.inbound.values())))


def _same(now: object, then: object) -> bool:
    return now is then or now == then


def watched_services(spec: ControllerSpec) -> tuple[str, ...]:
    """Every service some proxy's EDS file is filled from, sorted."""
    return tuple(sorted({source.service for host in spec.hosts for proxy in host.proxies
                         for source in proxy.endpoints.values()}))
