"""Jinja2 rendering of a proxy's files (Envoy's resources and their files, systemd units) and a host's nftables
table.

One Environment (StrictUndefined) over the repository's `templates/`, a frozen context per template, and every
output parsed back before it is returned; it must not compute config (mesh.config) or touch a host.

A proxy's Envoy config is rendered in two layers, so that a live controller can serve the same resources over
another transport later:

- **resources** (`render_resources`): the xDS resources of one ProxyConfig as data: listeners, routes, clusters,
  endpoints and secrets, each a mapping with its "@type". Where one resource names another (a listener its route
  configuration or secrets, a cluster its endpoints) it asks a `ConfigSources` how Envoy reaches it.
- **delivery from files** (`render_proxy_files`): the `FileSources` of the proxy's folder, every resource file
  (a DiscoveryResponse whose version_info is the sha256 of its resources) and the bootstrap that holds only
  node, admin and where to read the rest. Envoy reloads a resource file moved into xds/ and the certificate and
  trust bundle moved into the proxy folder; only a new bootstrap needs a restart.

On the host (and, mounted whole and read-only, in a sidecar):

    <proxy folder>/envoy.yaml               bootstrap (node.metadata.mesh_bootstrap_sha256)
    <proxy folder>/envoy-ads.yaml           mesh_delivery: xds only: the bootstrap over ADS (the same metadata digest,
                                             and mesh_delivery: xds); the start step picks one of the two
    <proxy folder>/xds/sds.<secret>.yaml     a Secret: the certificate (tls/cert.pem, tls/key.pem), the trust bundle
    <proxy folder>/xds/eds.<cluster>.yaml    a ClusterLoadAssignment per cluster of IP addresses
    <proxy folder>/xds/cds.yaml              every Cluster
    <proxy folder>/xds/rds.<route>.yaml      a RouteConfiguration per HTTP connection manager
    <proxy folder>/xds/ecds.<filter>.yaml    a TypedExtensionConfig per network filter read by ECDS (the RBAC filters
                                             of a TCP inbound app chain: mesh.authz.deny, mesh.authz.allow)
    <proxy folder>/xds/lds.yaml              every Listener
    <proxy folder>/ca.pem                    the trust bundle (written by the caller: a ProxyConfig holds no PEM)
    <proxy folder>/tls -> tls.<version>/     key.pem and cert.pem, swapped together by one rename
    <proxy folder>/admin/admin.sock          Envoy's admin API

The templates live at the repository root (`templates/`, beside `mesh/`): an editable install or a checkout
finds them. Pass `templates_dir` to render from elsewhere.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import posixpath
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jinja2
import yaml

from mesh import package_data
from mesh.config import paths
from mesh.config.addresses import discovery_type
from mesh.config.authz import InboundInputs
from mesh.config.consistent import consistent
from mesh.config.errors import ConfigError, EnvoyRejectedConfig
from mesh.config.inbound import AUTHZ_FILTERS, INBOUND_LISTENER, inbound_authz, inbound_route
from mesh.config.model import (
    Admin,
    AuthzConfig,
    Endpoint,
    InboundRoute,
    OutboundRoute,
    ProxyConfig,
    RbacFilter,
    StatsTag,
    UpstreamTls,
)
from mesh.config.validate import (
    VALIDATE_TIMEOUT_S,
    envoy_binary,
    rewrite_file_paths,
    throwaway_tls_files,
)
from mesh.config.xds import (
    ADS_BOOTSTRAP_NAME,
    CONTROLLERS_COMMENT,
    DELIVERY_MARKER,
    METADATA_DELIVERY_KEY,
    XDS_CLUSTER,
    XDS_PORT,
    XdsBootstrap,
    ads_source,
)
from mesh.inventory.model import ManagedHost
from mesh.inventory.policy import AuthzOverride, ServicePolicy
from mesh.inventory.values import source_family

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TEMPLATES_DIR = package_data.templates_dir()

__all__ = ["BOOTSTRAP_KINDS", "ConfigSources", "EnvoyResources", "EnvoyUnitContext", "FileSources", "FirewallContext",
           "FirewallUnitContext", "HostValidation", "InboundFileKind", "ProxyFiles", "RenderedFile", "envoy_start_script",
           "host_validation", "inbound_files", "render_envoy_unit", "render_firewall", "render_firewall_unit", "render_inbound_file",
           "render_proxy_files", "render_resources", "render_route_file", "resource_file", "stale_paths",
           "static_bootstrap", "template_environment", "transition", "validate_proxy_files"]

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
BOOTSTRAP_METADATA_KEY = "mesh_bootstrap_sha256"
VALIDATE_CONFIG_NAME = "validate.yaml"
INSTALL_WAIT_S = 15  # for a running Envoy to take each moved file

Resource = Mapping[str, Any]  # one xDS resource as Envoy's JSON/YAML form: "@type", then its fields
FileKind = Literal["bootstrap", "ads-bootstrap", "resource", "secret", "trust"]
# The bootstraps (envoy.yaml; envoy-ads.yaml of an xds proxy): the deploy's alone, and only a new one restarts Envoy
BOOTSTRAP_KINDS: tuple[FileKind, ...] = ("bootstrap", "ads-bootstrap")
ADS_RETRY_BASE_MS = 500  # the ADS stream's jittered reconnect backoff (Envoy's own defaults: 0.5 s to 30 s)
ADS_RETRY_MAX_MS = 10_000
ADS_CONNECT_TIMEOUT_MS = 1_000
ADS_KEEPALIVE_INTERVAL_MS = 15_000  # HTTP/2 pings on the ADS connection
ADS_KEEPALIVE_TIMEOUT_MS = 5_000
InboundFileKind = Literal["route", "tcp-deny", "tcp-allow"]  # the inbound files a controller may redo alone
SourceKind = Literal["lds", "cds", "rds", "eds", "sds", "ecds"]


# --- (a) resources ---

class ConfigSources(Protocol):
    """How Envoy reaches a resource another one names: an Envoy ConfigSource per resource (files now, ADS later)."""

    def lds(self) -> dict[str, Any]: ...

    def cds(self) -> dict[str, Any]: ...

    def rds(self, name: str) -> dict[str, Any]: ...

    def eds(self, name: str) -> dict[str, Any]: ...

    def sds(self, name: str) -> dict[str, Any]: ...

    def ecds(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EnvoyResources:
    """One proxy's xDS resources (read-only mappings by convention), in the order Envoy's dumps list them."""

    listeners: tuple[Resource, ...]
    routes: tuple[Resource, ...]
    clusters: tuple[Resource, ...]
    endpoints: tuple[Resource, ...]
    secrets: tuple[Resource, ...]
    extension_configs: tuple[Resource, ...] = ()  # network filters read by ECDS


@dataclass(frozen=True)
class ResourcesContext:
    """templates/envoy/{listeners,routes,clusters,endpoints,secrets,extension_configs}.yaml.j2: a proxy's
    resources."""

    cfg: ProxyConfig
    sources: ConfigSources
    certificate_watch_dir: str  # the folder holding the `tls` link: one rename there swaps key and certificate
    trust_watch_dir: str  # the folder holding the trust bundle


def render_resources(cfg: ProxyConfig, sources: ConfigSources, templates_dir: Path = TEMPLATES_DIR) -> EnvoyResources:
    """The xDS resources of one proxy; refuses an inconsistent config first. Pure."""
    consistent(cfg)
    certificate = cfg.secrets.certificate
    link = posixpath.dirname(certificate.certificate_chain)
    if posixpath.dirname(certificate.private_key) != link:
        raise ConfigError(cfg.proxy, f"the key {certificate.private_key} and the certificate "
                                     f"{certificate.certificate_chain} are not in one folder: they could not be "
                                     "swapped together")
    context = ResourcesContext(cfg, sources, certificate_watch_dir=posixpath.dirname(link),
                               trust_watch_dir=posixpath.dirname(cfg.secrets.trust_bundle.trusted_ca))

    def listed(name: str, type_url: str) -> tuple[Resource, ...]:
        return _resource_list(cfg.proxy, _render(templates_dir, f"envoy/{name}.yaml.j2", context), name, type_url)

    return EnvoyResources(listeners=listed("listeners", LISTENER_TYPE), routes=listed("routes", ROUTE_TYPE),
                          clusters=listed("clusters", CLUSTER_TYPE), endpoints=listed("endpoints", ENDPOINT_TYPE),
                          secrets=listed("secrets", SECRET_TYPE),
                          extension_configs=listed("extension_configs", EXTENSION_CONFIG_TYPE))


def resource_name(resource: Resource) -> str:
    """A resource's name (a ClusterLoadAssignment's is its cluster_name)."""
    return str(resource["cluster_name"] if resource.get("@type") == ENDPOINT_TYPE else resource["name"])


def resources_version(resources: tuple[Resource, ...] | list[Resource]) -> str:
    """The version_info of a set of resources: the sha256 of their canonical JSON."""
    canonical = json.dumps(list(resources), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _resource_list(proxy: str, text: str, what: str, type_url: str) -> tuple[Resource, ...]:
    try:
        parsed = _load(text)
    except yaml.YAMLError as error:  # a template bug, but name the proxy
        raise ConfigError(proxy, f"rendered {what} are not YAML: {error}") from error
    parsed = [] if parsed is None else parsed
    if not isinstance(parsed, list) or any(not isinstance(item, dict) or item.get("@type") != type_url
                                           for item in parsed):
        raise ConfigError(proxy, f"rendered {what} are not a list of {type_url.rsplit('.', 1)[-1]}")
    names = [resource_name(item) for item in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(proxy, f"rendered {what} repeat a name: {names}")
    return tuple(parsed)


# --- (b) delivery from files ---

@dataclass(frozen=True)
class FileSources:
    """Resources as files in one watched folder (`xds_dir`): Envoy re-reads a file when one is moved in there."""

    xds_dir: str

    def path(self, kind: SourceKind, name: str | None = None) -> str:
        """xds/lds.yaml, xds/cds.yaml, xds/<rds|eds|sds|ecds>.<name>.yaml (Envoy takes one named resource a
        file)."""
        if kind in ("lds", "cds"):
            return f"{self.xds_dir}/{kind}.yaml"
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{kind} resource name {name!r} cannot name a file")
        return f"{self.xds_dir}/{kind}.{name}.yaml"

    def lds(self) -> dict[str, Any]:
        return self._source(self.path("lds"))

    def cds(self) -> dict[str, Any]:
        return self._source(self.path("cds"))

    def rds(self, name: str) -> dict[str, Any]:
        return self._source(self.path("rds", name))

    def eds(self, name: str) -> dict[str, Any]:
        return self._source(self.path("eds", name))

    def sds(self, name: str) -> dict[str, Any]:
        return self._source(self.path("sds", name))

    def ecds(self, name: str) -> dict[str, Any]:
        return self._source(self.path("ecds", name))

    def _source(self, path: str) -> dict[str, Any]:
        return {"resource_api_version": "V3",
                "path_config_source": {"path": path, "watched_directory": {"path": self.xds_dir}}}


@dataclass(frozen=True)
class RenderedFile:
    """One file of a proxy: its absolute path on the host and its content."""

    path: str
    content: str
    kind: FileKind

    @cached_property
    def sha256(self) -> str:
        """Hashed once per file object (an EDS file of 1000 endpoints is ~0.3 MB, shared by many snapshots)."""
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass(frozen=True)
class ProxyFiles:
    """Every file mesh renders for one proxy, in the order they are moved into place when they change:
    secrets, endpoints, clusters, routes, network filters (ECDS), listeners (what is named before what names it),
    the bootstrap last.
    ca.pem (the trust bundle, kind "trust") is not here: the caller writes it, before these, at
    paths.proxy_ca_path; so is the `tls` link (mesh.deploy.steps.identity)."""

    proxy: str
    proxy_dir: str
    files: tuple[RenderedFile, ...]
    bootstrap_sha256: str  # node.metadata.mesh_bootstrap_sha256 of the bootstrap(s): Envoy's /server_info shows it

    @property
    def bootstrap(self) -> RenderedFile:
        return next(file for file in self.files if file.kind == "bootstrap")

    @property
    def ads_bootstrap(self) -> RenderedFile | None:
        """envoy-ads.yaml of an xds proxy (None for a files proxy)."""
        return next((file for file in self.files if file.kind == "ads-bootstrap"), None)

    def file(self, path: str) -> RenderedFile:
        for file in self.files:
            if file.path == path:
                return file
        raise KeyError(path)


@dataclass(frozen=True)
class BootstrapContext:
    """templates/envoy/bootstrap.yaml.j2: node, admin, overload manager and where the resources are."""

    proxy: str
    node_id: str
    cluster: str
    bootstrap_sha256: str | None  # None: the text whose sha256 this is
    admin: Any  # mesh.config.model.Admin
    max_downstream_connections: int
    lds_config: dict[str, Any]
    cds_config: dict[str, Any]
    stats_tags: tuple[Any, ...]  # mesh.config.model.StatsTag: Prometheus labels from mesh's stat names


@dataclass(frozen=True)
class AdsBootstrapContext:
    """templates/envoy/bootstrap-ads.yaml.j2: node, admin, stats and overload manager as envoy.yaml, the ADS
    stream and the static cluster of every controller."""

    proxy: str
    node_id: str
    cluster: str
    bootstrap_sha256: str | None  # None: the text whose sha256 this is (with envoy.yaml's)
    delivery: str  # node.metadata.mesh_delivery
    admin: Admin
    max_downstream_connections: int
    stats_tags: tuple[StatsTag, ...]
    controllers_comment: str  # the first line's start; the controllers' address:port pairs follow it
    xds_cluster: str
    discovery: str  # STATIC (IP literals) or STRICT_DNS (some controller is a name)
    endpoints: tuple[Endpoint, ...]  # every controller at the ADS port
    connect_timeout_ms: int
    keepalive_interval_ms: int
    keepalive_timeout_ms: int
    retry_base_ms: int
    retry_max_ms: int
    tls: UpstreamTls  # the proxy's certificate and trust bundle secrets (read from their files), the controllers' id
    sources: FileSources  # where those secrets' files are
    lds_config: dict[str, Any]
    cds_config: dict[str, Any]


def _ads_context(cfg: ProxyConfig, xds: XdsBootstrap, sources: FileSources) -> AdsBootstrapContext:
    if not xds.controllers:
        raise ConfigError(cfg.proxy, "mesh_delivery: xds needs a controller (mesh_controllers) to stream from")
    for address in xds.controllers:  # the start step reads them back from the first line
        if not _CONTROLLER_ADDRESS.fullmatch(address):
            raise ConfigError(cfg.proxy, f"controller address {address!r} in {ADS_BOOTSTRAP_NAME}: expected an IP "
                                         "address or a host name (letters, digits, '-', '.', ':')")
    tls = UpstreamTls(cfg.secrets.certificate.name, cfg.secrets.trust_bundle.name, xds.server_name,
                      xds.controller_spiffe_id)
    return AdsBootstrapContext(
        cfg.proxy, cfg.node_id, cfg.service, None, "xds", cfg.admin, cfg.max_downstream_connections, cfg.stats_tags,
        CONTROLLERS_COMMENT, XDS_CLUSTER, discovery_type(xds.controllers), tuple(Endpoint(address, xds.port) for address in xds.controllers), ADS_CONNECT_TIMEOUT_MS,
        ADS_KEEPALIVE_INTERVAL_MS, ADS_KEEPALIVE_TIMEOUT_MS, ADS_RETRY_BASE_MS, ADS_RETRY_MAX_MS, tls, sources,
        ads_source(), ads_source())


_CONTROLLER_ADDRESS = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]*")


def render_proxy_files(cfg: ProxyConfig, templates_dir: Path = TEMPLATES_DIR) -> ProxyFiles:
    """Every file of one proxy (bootstrap, resources, secrets) at its path on the host. Pure.

    The proxy folder is the folder of cfg.config_path: a ProxyConfig whose paths point elsewhere (a test's temp
    folder) renders files there. A proxy with `cfg.xds` also gets envoy-ads.yaml (kind "ads-bootstrap") right
    before envoy.yaml; both carry one metadata digest, the sha256 of both texts rendered without it."""
    proxy_dir = posixpath.dirname(cfg.config_path)
    sources = FileSources(f"{proxy_dir}/{paths.XDS_DIR_NAME}")
    resources = render_resources(cfg, sources, templates_dir)
    files = [_resource_file(cfg.proxy, sources.path("sds", resource_name(secret)), "secret", (secret,))
             for secret in resources.secrets]
    files += [_resource_file(cfg.proxy, sources.path("eds", resource_name(assignment)), "resource", (assignment,))
              for assignment in resources.endpoints]
    files.append(_resource_file(cfg.proxy, sources.path("cds"), "resource", resources.clusters))
    files += [_resource_file(cfg.proxy, sources.path("rds", resource_name(route)), "resource", (route,))
              for route in resources.routes]
    files += [_resource_file(cfg.proxy, sources.path("ecds", resource_name(config)), "resource", (config,))
              for config in resources.extension_configs]
    files.append(_resource_file(cfg.proxy, sources.path("lds"), "resource", resources.listeners))
    context = BootstrapContext(cfg.proxy, cfg.node_id, cfg.service, None, cfg.admin, cfg.max_downstream_connections,
                               sources.lds(), sources.cds(), cfg.stats_tags)
    unmarked = _render(templates_dir, "envoy/bootstrap.yaml.j2", context)
    ads = _ads_context(cfg, cfg.xds, sources) if cfg.xds is not None else None
    if ads is None:
        digest = hashlib.sha256(unmarked.encode()).hexdigest()
    else:
        unmarked_ads = _render(templates_dir, "envoy/bootstrap-ads.yaml.j2", ads)
        digest = hashlib.sha256((unmarked + unmarked_ads).encode()).hexdigest()
        ads_text = _render(templates_dir, "envoy/bootstrap-ads.yaml.j2", replace(ads, bootstrap_sha256=digest))
        files.append(_ads_bootstrap_file(cfg, proxy_dir, ads_text, digest))
    bootstrap = _render(templates_dir, "envoy/bootstrap.yaml.j2", replace(context, bootstrap_sha256=digest))
    parsed = _parsed_yaml(cfg.proxy, bootstrap, "bootstrap")
    sections = {"node", "admin", "overload_manager", "dynamic_resources"} | ({"stats_config"} if cfg.stats_tags else set())
    if set(parsed) != sections \
            or parsed["node"].get("metadata") != {BOOTSTRAP_METADATA_KEY: digest}:
        raise ConfigError(cfg.proxy, f"rendered Envoy bootstrap has the sections {sorted(parsed)} and the node "
                                     f"metadata {parsed['node'].get('metadata')}")
    files.append(RenderedFile(cfg.config_path, bootstrap, "bootstrap"))
    return ProxyFiles(cfg.proxy, proxy_dir, tuple(files), digest)


def _ads_bootstrap_file(cfg: ProxyConfig, proxy_dir: str, text: str, digest: str) -> RenderedFile:
    """envoy-ads.yaml, parsed back: the sections Envoy needs and nothing else, the metadata of an xds proxy."""
    parsed = _parsed_yaml(cfg.proxy, text, "ADS bootstrap")
    sections = {"node", "admin", "overload_manager", "dynamic_resources", "static_resources"} \
        | ({"stats_config"} if cfg.stats_tags else set())
    metadata = parsed["node"].get("metadata")
    if set(parsed) != sections or metadata != {BOOTSTRAP_METADATA_KEY: digest, METADATA_DELIVERY_KEY: "xds"} \
            or not text.startswith(CONTROLLERS_COMMENT + " "):
        raise ConfigError(cfg.proxy, f"rendered ADS bootstrap has the sections {sorted(parsed)} and the node "
                                     f"metadata {metadata}")
    return RenderedFile(f"{proxy_dir}/{ADS_BOOTSTRAP_NAME}", text, "ads-bootstrap")


@dataclass(frozen=True)
class RouteContext:
    """templates/envoy/route.yaml.j2: one outbound RouteConfiguration."""

    route: OutboundRoute


def render_route_file(proxy: str, path: str, route: OutboundRoute, templates_dir: Path = TEMPLATES_DIR) \
        -> RenderedFile:
    """The file of one outbound RouteConfiguration at `path` (xds/rds.<route name>.yaml): byte for byte what
    render_proxy_files writes there for the same route, so a controller can redo one route alone. Pure."""
    resources = _resource_list(proxy, _render(templates_dir, "envoy/route.yaml.j2", RouteContext(route)), "route",
                               ROUTE_TYPE)
    if [resource_name(resource) for resource in resources] != [route.name]:
        raise ConfigError(proxy, f"rendered route is not the one route {route.name!r}")
    return resource_file(proxy, path, "resource", resources)


@dataclass(frozen=True)
class InboundRouteContext:
    """templates/envoy/inbound_route.yaml.j2: the inbound app RouteConfiguration."""

    route: InboundRoute


@dataclass(frozen=True)
class ExtensionConfigContext:
    """templates/envoy/extension_config.yaml.j2: one RBAC network filter's TypedExtensionConfig."""

    filter: RbacFilter
    authz: AuthzConfig


_TCP_FILTERS: dict[InboundFileKind, RbacFilter] = {"tcp-deny": AUTHZ_FILTERS[0], "tcp-allow": AUTHZ_FILTERS[1]}


def inbound_files(cfg: ProxyConfig) -> dict[str, InboundFileKind]:
    """The files of the proxy's inbound authorization a controller may redo alone (render_inbound_file), by path:
    the inbound route of an HTTP service ("route"), the ECDS files of a TCP one's DENY and ALLOW filters
    ("tcp-deny", "tcp-allow"). Pure."""
    sources = FileSources(f"{posixpath.dirname(cfg.config_path)}/{paths.XDS_DIR_NAME}")
    if cfg.inbound.http:
        return {sources.path("rds", INBOUND_LISTENER): "route"}
    by_name = {filter.name: kind for kind, filter in _TCP_FILTERS.items()}
    return {sources.path("ecds", filter.name): by_name[filter.name] for filter in cfg.inbound.authz_filters}


def render_inbound_file(proxy: str, path: str, kind: InboundFileKind, inputs: InboundInputs, policy: ServicePolicy,
                        override: AuthzOverride | None, templates_dir: Path = TEMPLATES_DIR) -> RenderedFile:
    """One inbound file (`inbound_files` gives its path and kind) from the service's inputs, policy and run-time
    deny: byte for byte what render_proxy_files writes there for the same, so a controller can redo it alone when
    the rules or the deny change. Pure."""
    if kind == "route":
        route = inbound_route(inputs, policy, override)
        text = _render(templates_dir, "envoy/inbound_route.yaml.j2", InboundRouteContext(route))
        resources = _resource_list(proxy, text, "inbound route", ROUTE_TYPE)
        wanted = route.name
    elif kind in _TCP_FILTERS:
        filter = _TCP_FILTERS[kind]
        context = ExtensionConfigContext(filter, inbound_authz(inputs, policy, override))
        text = _render(templates_dir, "envoy/extension_config.yaml.j2", context)
        resources = _resource_list(proxy, text, "network filter", EXTENSION_CONFIG_TYPE)
        wanted = filter.name
    else:
        raise ValueError(f"not an inbound file kind: {kind!r}")
    if [resource_name(resource) for resource in resources] != [wanted]:
        raise ConfigError(proxy, f"rendered inbound file is not the one resource {wanted!r}")
    return resource_file(proxy, path, "resource", resources)


def resource_file(proxy: str, path: str, kind: FileKind, resources: tuple[Resource, ...]) -> RenderedFile:
    """A DiscoveryResponse file: version_info (the sha256 of its resources, shown again by /config_dump) and them."""
    body = {"version_info": resources_version(resources), "resources": [dict(item) for item in resources]}
    header = (f"# {posixpath.basename(path)} of proxy {proxy}, rendered by mesh: `mesh deploy` moves a new one into "
              "place and Envoy reloads it.\n")
    return RenderedFile(path, header + _dump(body), kind)


_resource_file = resource_file  # the name the callers above use


# libyaml when PyYAML has it (the same documents, several times faster: a plan renders every proxy's files)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, width=1_000_000,
                     allow_unicode=True)


def _parsed_yaml(proxy: str, text: str, what: str) -> dict[str, Any]:
    try:
        parsed = _load(text)
    except yaml.YAMLError as error:
        raise ConfigError(proxy, f"rendered {what} is not YAML: {error}") from error
    if not isinstance(parsed, dict):
        raise ConfigError(proxy, f"rendered {what} is not a YAML mapping")
    return parsed

def transition(files: ProxyFiles, on_host: Mapping[str, str], host_cds: str | None = None) -> tuple[RenderedFile, ...]:
    """The files to move into place, in this order, to go from what the host has to `files` with no request failing.

    `on_host` maps each file of the proxy that exists on the host to its sha256 (hex); a file whose sha256 is
    the same is left out. The order is files.files' (what is named before what names it), so an added cluster
    exists before a route names it. A cluster that leaves must outlive the routes and listeners that named it:
    when the host's cds.yaml (`host_cds`, its content) holds clusters the new one has not, cds.yaml is moved in
    twice: first with those clusters kept after the new ones, then, after the listeners, as rendered (the
    go-control-plane rule: clusters first, stale clusters removed last). Files of the xds folder that are no
    longer rendered (`stale_paths`) are removed after the last move."""
    changed = [file for file in files.files if on_host.get(file.path) != file.sha256]
    cds = next((file for file in changed if file.path.endswith(f"/{paths.XDS_DIR_NAME}/cds.yaml")), None)
    gone = _clusters_gone(cds, host_cds) if cds is not None else []
    if cds is None or not gone:
        return tuple(changed)
    new = list(_load(cds.content)["resources"])
    kept = _resource_file(files.proxy, cds.path, "resource", tuple(new + gone))
    steps = [kept if file is cds else file for file in changed]
    last_resource = max(index for index, file in enumerate(steps) if file.kind not in BOOTSTRAP_KINDS)
    steps.insert(last_resource + 1, cds)
    return tuple(steps)


def stale_paths(files: ProxyFiles, on_host: Mapping[str, str]) -> tuple[str, ...]:
    """Files of the proxy's xds folder on the host (keys of on_host) that `files` no longer has: removed after
    the last move of `transition`."""
    xds = f"{files.proxy_dir}/{paths.XDS_DIR_NAME}/"
    rendered = {file.path for file in files.files}
    return tuple(sorted(path for path in on_host if path.startswith(xds) and path not in rendered))


def _clusters_gone(cds: RenderedFile, host_cds: str | None) -> list[dict[str, Any]]:
    """The clusters of the host's cds.yaml that the new one has not (none when the host's cannot be read)."""
    try:
        running = _load(host_cds or "") or {}
        new = _load(cds.content)
    except yaml.YAMLError:
        return []
    if not isinstance(running, dict) or not isinstance(running.get("resources"), list):
        return []
    names = {resource_name(resource) for resource in new["resources"]}
    return [resource for resource in running["resources"]
            if isinstance(resource, dict) and resource.get("name") not in names]


# --- checking the files with Envoy (`--mode validate` reads no resource file: it checks a static equivalent) ---

@dataclass(frozen=True)
class HostValidation:
    """How new files of a proxy are checked on its host, then moved into place (`host_validation`)."""

    staging_dir: str
    staged: tuple[RenderedFile, ...]  # to write first: each step of the transition at its path in staging_dir
    moves: tuple[tuple[str, str], ...]  # (staged path, final path), in the order `install` moves them
    config_path: str  # the static equivalent of the new files, in staging_dir (not moved anywhere)
    config: str
    command: str  # VM: the host's Envoy as the proxy's user checks config_path; exit 0 when it accepts
    install: str  # sh: the moves, each waiting for a running Envoy to take it; then staging and stale files removed


def static_bootstrap(files: ProxyFiles, dynamic: bool = True) -> dict[str, Any]:
    """The static equivalent of `files`: their bootstrap with every resource inline under static_resources.

    `envoy --mode validate` reads no resource file (it checks that lds/cds paths exist, nothing more), so this is
    what it can check: each route configuration in the listener naming it, each ClusterLoadAssignment in its
    cluster (then STATIC), each secret a static one named by the listeners and clusters. Every reference is
    followed by the path Envoy would read (`path_config_source`), and each file must hold what Envoy would take
    from it there (a DiscoveryResponse of one named resource of the right type; every listener in lds.yaml,
    every cluster in cds.yaml), with the folder of that path as its watched folder. dynamic=False drops
    dynamic_resources (whose files need not exist where the result is checked). Raises EnvoyRejectedConfig."""
    proxy = files.proxy
    responses = {file.path: _discovery_response(proxy, file) for file in files.files
                 if file.kind not in BOOTSTRAP_KINDS}
    bootstrap = _parsed_yaml(proxy, files.bootstrap.content, "bootstrap")
    dynamic_resources = bootstrap.get("dynamic_resources") or {}

    def read(source: Any, type_url: str, name: str | None, who: str) -> list[dict[str, Any]]:
        found = source.get("path_config_source") if isinstance(source, dict) else None
        if not isinstance(found, dict) or not isinstance(found.get("path"), str):
            raise EnvoyRejectedConfig(proxy, f"{who}: its config source is not a file (path_config_source)")
        path = found["path"]
        watched = (found.get("watched_directory") or {}).get("path")
        if watched != posixpath.dirname(path):
            raise EnvoyRejectedConfig(proxy, f"{who}: {path} is not watched in its folder (watched_directory "
                                             f"{watched!r}): a new file moved there would not be read")
        if path not in responses:
            raise EnvoyRejectedConfig(proxy, f"{who}: reads {path}, which is not one of the proxy's files")
        resources = responses[path]
        if any(resource.get("@type") != type_url for resource in resources):
            raise EnvoyRejectedConfig(proxy, f"{path}: holds resources other than {type_url}")
        if name is not None and [resource_name(resource) for resource in resources] != [name]:
            raise EnvoyRejectedConfig(proxy, f"{path}: must hold exactly the resource {name!r} ({who} names it)")
        return [{key: value for key, value in resource.items() if key != "@type"} for resource in resources]

    secrets: dict[str, dict[str, Any]] = {}

    def inline(node: Any, who: str) -> Any:
        if isinstance(node, list):
            return [inline(item, who) for item in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if "rds" in node:
            rds = node.pop("rds")
            name = str(rds.get("route_config_name"))
            node["route_config"] = read(rds.get("config_source"), ROUTE_TYPE, name, f"{who}, route {name!r}")[0]
        if "sds_config" in node and "name" in node:
            name = str(node["name"])
            secrets[name] = read(node.pop("sds_config"), SECRET_TYPE, name, f"{who}, secret {name!r}")[0]
        if "config_discovery" in node and "name" in node:
            name = str(node["name"])
            discovery = node.pop("config_discovery") or {}
            found = read(discovery.get("config_source"), EXTENSION_CONFIG_TYPE, name, f"{who}, filter {name!r}")[0]
            config = found.get("typed_config") or {}
            if config.get("@type") not in (discovery.get("type_urls") or []):
                raise EnvoyRejectedConfig(proxy, f"{who}, filter {name!r}: its file holds a {config.get('@type')}, "
                                                 f"not one of {discovery.get('type_urls')}")
            node["typed_config"] = config
        return {key: inline(value, who) for key, value in node.items()}

    listeners = [inline(listener, f"listener {listener.get('name')!r}")
                 for listener in read(dynamic_resources.get("lds_config"), LISTENER_TYPE, None, "lds_config")]
    clusters = []
    for cluster in read(dynamic_resources.get("cds_config"), CLUSTER_TYPE, None, "cds_config"):
        who = f"cluster {cluster.get('name')!r}"
        if cluster.get("type") == "EDS":
            eds = cluster.pop("eds_cluster_config", None) or {}
            name = str(eds.get("service_name") or cluster.get("name"))
            cluster = {**cluster, "type": "STATIC",
                       "load_assignment": read(eds.get("eds_config"), ENDPOINT_TYPE, name, f"{who}, endpoints")[0]}
        clusters.append(inline(cluster, who))
    config = {key: value for key, value in bootstrap.items() if key != "dynamic_resources" or dynamic}
    config["static_resources"] = {"secrets": [{"name": name, **{k: v for k, v in secret.items() if k != "name"}}
                                              for name, secret in secrets.items()],
                                  "listeners": listeners, "clusters": clusters}
    return config


def _discovery_response(proxy: str, file: RenderedFile) -> list[dict[str, Any]]:
    """The resources of a resource file, which must read as a DiscoveryResponse (what Envoy's file source reads)."""
    try:
        parsed = _load(file.content)
    except yaml.YAMLError as error:
        raise EnvoyRejectedConfig(proxy, f"{file.path} is not YAML: {error}") from error
    if not isinstance(parsed, dict) or not isinstance(parsed.get("resources"), list) \
            or set(parsed) - {"version_info", "resources"} \
            or not all(isinstance(resource, dict) for resource in parsed["resources"]):
        raise EnvoyRejectedConfig(proxy, f"{file.path} is not a DiscoveryResponse (version_info, resources)")
    return list(parsed["resources"])


def validate_proxy_files(files: ProxyFiles, ca_pem: bytes, envoy: str | None = None) -> None:
    """Check with the real Envoy (`envoy`, by default mesh's own) everything Envoy would load from `files`.

    The files are copied into a temp folder with every path in them moved there (the bootstrap as it is, its
    lds/cds files beside it), the certificate and key are throwaway stand-ins and the trust bundle is `ca_pem`;
    `envoy --mode validate` then checks the bootstrap together with the static equivalent of the resources
    (static_bootstrap). An xds proxy's envoy-ads.yaml is checked too, by a second Envoy run at the same time, as
    it is (the sds files it reads its secrets from are copied there too). Raises EnvoyRejectedConfig
    with Envoy's own reason (or mesh's, for a file Envoy's file source would refuse before parsing a resource)."""
    with tempfile.TemporaryDirectory(prefix="mesh-validate-") as temp:
        root = f"{temp}/proxy"
        moved = _relocated(files, root)
        for file in moved.files:
            Path(file.path).parent.mkdir(parents=True, exist_ok=True)
            Path(file.path).write_text(file.content)
        Path(root, "admin").mkdir(parents=True, exist_ok=True)
        config = static_bootstrap(moved, dynamic=True)
        stand_ins = throwaway_tls_files()
        rewrite_file_paths(config, Path(temp, "tls"),
                           lambda _path, role: ca_pem if role == "trusted_ca" else stand_ins[role])
        config_path = Path(temp, VALIDATE_CONFIG_NAME)
        config_path.write_text(_dump(config))
        configs = [("the files", config_path)]
        ads = moved.ads_bootstrap
        if ads is not None:  # Envoy checks that the sds files it names exist (they are copied above)
            configs.append((ADS_BOOTSTRAP_NAME, Path(ads.path)))
        runs = [(what, subprocess.Popen([envoy or envoy_binary(), "--mode", "validate", "-c", str(path),
                                         "--disable-hot-restart", "--log-level", "error"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                for what, path in configs]
        results = [(what, *_communicate(run)) for what, run in runs]
    for what, code, stdout, stderr in results:
        if code != 0:
            message = stderr.strip() or stdout.strip() or f"exit code {code}"
            raise EnvoyRejectedConfig(files.proxy, f"envoy --mode validate refused {what}: {_reason(message)}")


def _communicate(run: subprocess.Popen[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a validating Envoy, killed after VALIDATE_TIMEOUT_S."""
    try:
        stdout, stderr = run.communicate(timeout=VALIDATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        run.kill()
        stdout, stderr = run.communicate()
        stderr += f"\n[critical] envoy --mode validate took more than {VALIDATE_TIMEOUT_S} s"
    return run.returncode, stdout, stderr


def host_validation(files: ProxyFiles, steps: tuple[RenderedFile, ...] | None = None, stale: tuple[str, ...] = (),
                    staging_dir: str | None = None, user: str | None = "",
                    envoy: str = paths.ENVOY_BINARY, wait_s: int = INSTALL_WAIT_S) -> HostValidation:
    """How to check `files` on their host with the host's Envoy, then move them into place with no request lost.

    `steps` are the files to move (`transition(files, on_host, host_cds)`; every file when None), `stale` the
    files to remove after them (`stale_paths(files, on_host)`). The deploy step:
    1. writes `staged` (each step below `staging_dir`, by default paths.proxy_staging_dir: inside the proxy
       folder, so each move is one atomic rename on one filesystem, and a sidecar's mount shows it) and `config`
       at `config_path`: the static equivalent of all of `files` (static_bootstrap without dynamic_resources),
       naming the live key, certificate and trust bundle (ca.pem and the `tls` link are moved into place first,
       by their own steps, so they are checked too);
    2. runs `command` (a VM: the host's Envoy as the proxy's `user`, so a key it cannot read is refused too; a
       container host runs instead mesh.containers.sidecar.validate_args(spec, config_path): the sidecar's
       image, user and mounts); a non-zero exit refuses the files, with Envoy's reason in its output (its
       `[critical]` lines): remove staging_dir and keep the running files;
    3. runs `install` as root (`sh -c`): `mv -f` of each staged file into place, in order; while Envoy answers on
       its admin socket, after each cds.yaml, rds.<route>.yaml and lds.yaml that it reads it waits (up to wait_s
       seconds) for Envoy to run that file's version_info (its `*.version_text` stats) with no cluster or
       listener still warming, so a route never names a cluster Envoy does not have yet (an Envoy that does not
       read the file, e.g. one started from an older, static bootstrap, is not waited for); then it removes
       staging_dir and the stale files. Exit 1 with a message when Envoy did not take a file in time (the moves after it are not
       made: Envoy keeps what it took). A missing xds/ is created (0755: its files name paths, no secret).
       It needs `curl` on the host (as `mesh status` does).
    Restart the proxy only when a bootstrap (envoy.yaml; an xds proxy's envoy-ads.yaml, moved right before it)
    was one of the moves: Envoy reloads the rest. envoy-ads.yaml is checked by validate_proxy_files before (the
    host's check is the static equivalent of the files: the ADS bootstrap names sds files only in place after
    the moves).
    `user` "" (the default) is the proxy's own user (paths.envoy_user); None runs Envoy as whoever runs the
    command."""
    staging = staging_dir or f"{files.proxy_dir}/{paths.STAGING_DIR_NAME}"
    staged, moves, used = [], [], set()
    for file in files.files if steps is None else steps:
        if not file.path.startswith(files.proxy_dir + "/"):
            raise ConfigError(files.proxy, f"{file.path} is not in the proxy folder {files.proxy_dir}")
        path = staging + file.path[len(files.proxy_dir):]
        while path in used:  # cds.yaml twice (a transition keeping clusters that leave): a second staged name
            path += ".next"
        used.add(path)
        staged.append(RenderedFile(path, file.content, file.kind))
        moves.append((path, file.path))
    config_path = f"{staging}/{VALIDATE_CONFIG_NAME}"
    config = (f"# The static equivalent of proxy {files.proxy}'s new files, checked by `envoy --mode validate` "
              "before they are moved into place.\n" + _dump(static_bootstrap(files, dynamic=False)))
    command = [envoy, "--mode", "validate", "-c", config_path, "--disable-hot-restart", "--log-level", "error"]
    user = paths.envoy_user(files.proxy) if user == "" else user
    prefix = ["runuser", "-u", user, "--"] if user else []
    admin = _parsed_yaml(files.proxy, files.bootstrap.content, "bootstrap")["admin"]["address"]["pipe"]["path"]
    install = _install_script(files.proxy, tuple(zip(staged, moves, strict=True)), stale, staging, str(admin), wait_s,
                              files.bootstrap_sha256)
    return HostValidation(staging, tuple(staged), tuple(moves), config_path, config,
                          shlex.join([*prefix, *command]), install)


def _install_script(proxy: str, moves: tuple[tuple[RenderedFile, tuple[str, str]], ...], stale: tuple[str, ...],
                    staging: str, admin_socket: str, wait_s: int, bootstrap_sha256: str) -> str:
    """The sh of host_validation's `install`: moves, waits for a live Envoy to take each, cleanup."""
    q = shlex.quote
    lines = [
        "set -u",
        f"admin={q(admin_socket)}",
        "stats() { curl -sf --max-time 2 --unix-socket \"$admin\" \"http://envoy/stats?filter=$1\" 2>/dev/null; }",
        # took FILTER LINE ABSENT_OK NAME: the stat line is there (or, with ABSENT_OK, no stat matches: the
        # running Envoy does not read that file: a new route, or an Envoy started from another bootstrap, which
        # the restart after this script replaces) and nothing warms
        "took() {",
        "  found=$(stats \"$1\") || return 1",
        ("  if [ -n \"$3\" ] && [ -z \"$found\" ]; then :; "
         "elif ! printf '%s\\n' \"$found\" | grep -qF -- \"$2\"; then return 1; fi"),
        "  stats warming | grep -qE ': [1-9]' && return 1",
        "  return 0",
        "}",
        "wait_for() {",
        "  [ \"$live\" = 1 ] || return 0",
        f"  i=0; until took \"$@\"; do i=$((i + 1)); if [ \"$i\" -ge {wait_s * 10} ]; then",
        (f"    echo \"proxy {proxy}: Envoy did not take $4 within {wait_s} s (it runs the files it took before; "
         "see its log)\" >&2; exit 1; fi; sleep 0.1; done"),
        "}",
        # Waits only for an Envoy that runs this bootstrap: one running another (an old one, or none) is
        # restarted after the moves and reads every file then. One that started from envoy-ads.yaml (its start
        # step's marker says xds) reads no resource file: its files are the last-known-good, nothing to wait for.
        (f"live=0; curl -sf --max-time 2 --unix-socket \"$admin\" http://envoy/server_info 2>/dev/null "
         f"| grep -q {q(bootstrap_sha256)} && live=1"),
        (f"[ \"$(head -c 16 \"$(dirname \"$admin\")\"/{DELIVERY_MARKER} 2>/dev/null)\" = xds ] && live=0"),
    ]
    for folder in sorted({posixpath.dirname(final) for _file, (_staged, final) in moves}):
        lines.append(f"[ -d {q(folder)} ] || mkdir -p -m 0755 {q(folder)} || exit 1")  # xds/ on a first deploy
    for file, (staged, final) in moves:
        lines.append(f"mv -f {q(staged)} {q(final)} || exit 1")
        name = posixpath.basename(final)
        if file.kind != "resource" or name.startswith("eds."):  # nothing names them before they are read
            continue
        version = '"' + str(_load(file.content)["version_info"]) + '"'
        if name in ("cds.yaml", "lds.yaml"):
            stat = {"cds.yaml": "cluster_manager.cds", "lds.yaml": "listener_manager.lds"}[name] + ".version_text"
            lines.append(" ".join(["wait_for", q(stat), q(f"{stat}: {version}"), "absent-ok", q(name)]))
        elif name.startswith("rds."):
            stat = f"rds.{name[len('rds.'):-len('.yaml')]}.version_text"
            lines.append(" ".join(["wait_for", q(stat), q(f".{stat}: {version}"), "absent-ok", q(name)]))
        elif name.startswith("ecds."):
            stat = f"extension_config_discovery.network_filter.{name[len('ecds.'):-len('.yaml')]}.version_text"
            lines.append(" ".join(["wait_for", q(stat), q(f"{stat}: {version}"), "absent-ok", q(name)]))
    lines.append(f"rm -rf -- {q(staging)}")
    if stale:
        lines.append("rm -f -- " + " ".join(q(path) for path in stale))
    return "\n".join(lines) + "\n"


def _relocated(files: ProxyFiles, root: str) -> ProxyFiles:
    """`files` with every path in and of them below files.proxy_dir moved below root (content re-serialized)."""
    old = files.proxy_dir

    def move(node: Any) -> Any:
        if isinstance(node, str):
            return root + node[len(old):] if node == old or node.startswith(old + "/") else node
        if isinstance(node, list):
            return [move(item) for item in node]
        if isinstance(node, dict):
            return {key: move(value) for key, value in node.items()}
        return node

    moved = []
    for file in files.files:
        try:
            content = _dump(move(_load(file.content)))
        except yaml.YAMLError:
            content = file.content  # static_bootstrap reports it
        moved.append(RenderedFile(move(file.path), content, file.kind))
    return replace(files, proxy_dir=root, files=tuple(moved))


def _reason(message: str) -> str:
    """Envoy's own reason from `--mode validate` output: its [critical] line and, when Envoy printed the offending
    config after it, the last lines (where the reason ends)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = next((index for index, line in enumerate(lines) if "[critical]" in line), max(0, len(lines) - 3))
    shown = lines[first:] if len(lines) - first <= 4 else [lines[first], "...", *lines[-2:]]
    return " | ".join(shown)[:3000]


@dataclass(frozen=True)
class EnvoyUnitContext:
    """templates/systemd/mesh-envoy.service.j2."""

    proxy: str
    node_id: str
    host: str
    user: str
    binary: str
    config_path: str
    base_id: int
    admin_dir: str
    start: str | None = None  # mesh_delivery: xds: the start step Envoy runs through (paths.ENVOY_START)
    proxy_dir: str = ""  # the start step's first argument


@dataclass(frozen=True)
class FirewallContext:
    """templates/nftables/firewall.nft.j2: the app ports to close to other hosts, and the metrics ports to open
    to the metrics sources only (IPv4 and IPv6 literals, and host names nft resolves to IPv4 when it loads)."""

    host: str
    nft: str
    app_ports: tuple[int, ...]
    metrics_ports: tuple[int, ...] = ()
    sources_v4: tuple[str, ...] = ()
    sources_v6: tuple[str, ...] = ()
    source_names: tuple[str, ...] = ()
    xds_port: int | None = None  # a controller serving ADS: the port open to the mesh's hosts only
    xds_v4: tuple[str, ...] = ()
    xds_v6: tuple[str, ...] = ()
    xds_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FirewallUnitContext:
    """templates/systemd/mesh-firewall.service.j2."""

    nft: str
    ruleset_path: str


def render_envoy_unit(cfg: ProxyConfig, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The hardened systemd unit running this proxy's Envoy (installed at paths.envoy_unit_path); an xds proxy's
    runs it through the start step (templates/host/envoy-start, installed at paths.ENVOY_START)."""
    context = EnvoyUnitContext(proxy=cfg.proxy, node_id=cfg.node_id, host=cfg.host,
                               user=paths.envoy_user(cfg.proxy),
                               binary=paths.ENVOY_BINARY, config_path=cfg.config_path, base_id=cfg.base_id,
                               admin_dir=paths.admin_dir(cfg.proxy),
                               start=paths.ENVOY_START if cfg.xds is not None else None,
                               proxy_dir=posixpath.dirname(cfg.config_path))
    return _parsed_unit(_render(templates_dir, "systemd/mesh-envoy.service.j2", context))


def envoy_start_script(templates_dir: Path = TEMPLATES_DIR) -> str:
    """The start step of an xds proxy (templates/host/envoy-start, a plain sh script: nothing is rendered in it),
    installed at paths.ENVOY_START on every host with one."""
    return Path(templates_dir, "host", "envoy-start").read_text(encoding="utf-8")


def render_firewall(host: ManagedHost, metrics_sources: tuple[str, ...], xds_sources: tuple[str, ...] = (),
                    templates_dir: Path = TEMPLATES_DIR) -> str:
    """The nft script of mesh's `inet mesh` table: drop non-loopback tcp to the host's app ports, and to its
    metrics ports from all but metrics_sources (Mesh.metrics_sources; each checked again, as it goes into a
    ruleset root loads); on a controller serving ADS (xds_sources: Mesh.xds_sources, non-empty), drop tcp to
    XDS_PORT from all but those."""
    ports = tuple(sorted({workload.port for workload in host.workloads}))
    metrics_ports = tuple(sorted({workload.metrics_port for workload in host.workloads}))
    families = _source_families(host.name, "metrics source", metrics_sources)
    xds = _source_families(host.name, "mesh host address", xds_sources if host.is_controller else ())
    context = FirewallContext(host.name, paths.NFT_BINARY, ports, metrics_ports, sources_v4=tuple(families["ipv4"]),
                              sources_v6=tuple(families["ipv6"]), source_names=tuple(families["name"]),
                              xds_port=XDS_PORT if host.is_controller and xds_sources else None,
                              xds_v4=tuple(xds["ipv4"]), xds_v6=tuple(xds["ipv6"]), xds_names=tuple(xds["name"]))
    text = _render(templates_dir, "nftables/firewall.nft.j2", context)
    if text.count("table inet mesh {") != 1:
        raise ConfigError(host.name, "rendered firewall does not declare exactly one `inet mesh` table")
    return text


def _source_families(host: str, what: str, sources: tuple[str, ...]) -> dict[str, list[str]]:
    families: dict[str, list[str]] = {"ipv4": [], "ipv6": [], "name": []}
    for source in sources:
        family = source_family(source) if isinstance(source, str) else None
        if family is None:
            raise ConfigError(host, f"{what} {source!r}: expected an IP address or a host name of letters, digits, "
                                    "'-' and '.'")
        families[family].append(source)
    return families


def render_firewall_unit(templates_dir: Path = TEMPLATES_DIR) -> str:
    """The oneshot `mesh-firewall.service` that loads the table at boot."""
    context = FirewallUnitContext(paths.NFT_BINARY, paths.FIREWALL_PATH)
    return _parsed_unit(_render(templates_dir, "systemd/mesh-firewall.service.j2", context))


def template_environment(templates_dir: Path = TEMPLATES_DIR) -> jinja2.Environment:
    """The one Environment mesh renders with (cached per folder; Environments are safe to share)."""
    return _environment(str(templates_dir))


@cache
def _environment(templates_dir: str) -> jinja2.Environment:
    if not Path(templates_dir, "envoy").is_dir():
        raise FileNotFoundError(f"mesh's templates are not at {templates_dir}: render from a checkout "
                                "or an editable install (wheels do not ship them)")
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, autoescape=False)
    environment.filters["seconds"] = _seconds
    return environment


def _render(templates_dir: Path, name: str, context: DataclassInstance) -> str:
    """Render with the context's fields as the template's only names (StrictUndefined refuses others)."""
    names = {field.name: getattr(context, field.name) for field in fields(context)}
    return template_environment(templates_dir).get_template(name).render(names)


def _seconds(milliseconds: int) -> str:
    """A protobuf Duration in YAML, exact: 1000 -> "1s", 800 -> "0.8s", 86_400_001 -> "86400.001s"."""
    whole, fraction = divmod(int(milliseconds), 1000)
    return f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"


def _parsed_unit(text: str) -> str:
    """Parse a unit back (INI-like); a unit without its sections is a template bug."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    missing = {"Unit", "Service", "Install"} - set(parser.sections())
    if missing:
        raise ValueError(f"rendered unit lacks section(s) {sorted(missing)}")
    return text
