"""One proxy's resources as the ADS server streams them: the xds files of its snapshot (each a DiscoveryResponse
in YAML) parsed, their config sources pointed at the ADS stream, and each resource packed into a protobuf Any
(xds-protos). Pure: no I/O, no gRPC; it knows nothing of Consul or of how the files were computed.

What changes on the way from files to ADS:
- every ConfigSource with a `path_config_source` becomes `ads_source()`, except the SDS source of the
  certificate secret (a Secret with `tls_certificate`): the workload's key is made on its host and never leaves
  it, so that Secret stays a file the host renews, and it is not streamed;
- the trust secret (a Secret with `validation_context`) carries the bundle inline (`trusted_ca.inline_string`)
  and no `watched_directory`;
- ECDS sources (`extension_config_discovery`'s config_source) go over ADS too: Envoy 1.40 takes them (shown by
  tests/test_xds_envoy.py, which starts the real Envoy on these resources).

Versions are content hashes (sha256 over the sorted names and the sha256 of each resource's canonical JSON), so two
controllers computing the same snapshot give the same version and a failover resends nothing. A file's conversion
is memoized by its sha256: a thousand proxies share most files; and a whole proxy's resources by its files'
(relative path, kind, sha256) and the bundle: proxies of the same name on many hosts have the same files, so they
share one assembly (one ProxyResources but for node_id) and its version hashing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import yaml
from google.protobuf import any_pb2, json_format

from mesh.config.xds import ads_source
from mesh.controller.snapshot import ProxySnapshot
from mesh.errors import MeshError
from mesh.render import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_CONFIG_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    resource_name,
)

__all__ = ["EXTENSION_MODULES", "RESOURCE_TYPES", "SHORT_NAMES", "ProxyResources", "XdsConversionError",
           "ads_resources", "assembled", "content_version", "missing_types", "packed", "unpacked", "with_invalid_listener"]

RESOURCE_TYPES = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE, EXTENSION_CONFIG_TYPE)
SHORT_NAMES = {LISTENER_TYPE: "LDS", ROUTE_TYPE: "RDS", CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS",
               SECRET_TYPE: "SDS", EXTENSION_CONFIG_TYPE: "ECDS"}

# Every xds-protos module whose messages the templates name in an "@type" (a typed_config, a resource): importing
# one registers its messages in the default descriptor pool, which json_format needs to pack an Any.
# tests/unit/test_xds_resources.py fails when a template names a type that none of these registers.
EXTENSION_MODULES = (
    "envoy.config.listener.v3.listener_pb2",
    "envoy.config.route.v3.route_pb2",
    "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.endpoint.v3.endpoint_pb2",
    "envoy.config.core.v3.extension_pb2",
    "envoy.config.trace.v3.opentelemetry_pb2",
    "envoy.config.trace.v3.zipkin_pb2",
    "envoy.extensions.access_loggers.file.v3.file_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.health_check.v3.health_check_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.request_id.uuid.v3.uuid_pb2",
    "envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)
for _module in EXTENSION_MODULES:
    importlib.import_module(_module)

_TYPE_PREFIX = "type.googleapis.com/"
MEMO_LIMIT = 100_000  # files kept converted; past this the memo starts over (a plan changed under it)
SHARED_LIMIT = 1024  # distinct file sets kept assembled (least recently used go first)
INVALID_LISTENER_NAME = "mesh-test-hook-invalid"
# libyaml's safe loader when PyYAML has it (the same documents, ~10x faster: an EDS file of 1000 endpoints), else
# PyYAML's own
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class XdsConversionError(MeshError):
    """An xds file that cannot be streamed (not a DiscoveryResponse, an unknown "@type", a field xds-protos does
    not know): a bug in rendering, named with the proxy and the file."""


@dataclass(frozen=True)
class ProxyResources:
    """One proxy's streamed resources: type URL -> resource name -> serialized google.protobuf.Any, and per type
    URL the content hash of its resources (a type with none has no entry in either)."""

    node_id: str
    by_type: Mapping[str, Mapping[str, bytes]]
    versions: Mapping[str, str]
    digests: Mapping[str, Mapping[str, str]]  # type URL -> name -> sha256 of the resource's canonical JSON

    def names(self, type_url: str) -> tuple[str, ...]:
        return tuple(sorted(self.by_type.get(type_url, {})))


_Converted = tuple[tuple[str, str, bytes, str], ...]  # (type URL, name, Any bytes, digest) of one file
_memo: dict[tuple[str, str, str], _Converted] = {}
_memo_lock = threading.Lock()
# (bundle sha256, the streamed files' (relative path, kind, sha256) sorted) -> their resources (any node's id)
_shared: OrderedDict[tuple[str, tuple[tuple[str, str, str], ...]], ProxyResources] = OrderedDict()


def ads_resources(snapshot: ProxySnapshot, node_id: str, bundle_pem: str) -> ProxyResources:
    """The snapshot's xds files as streamed resources for node `node_id`, the trust secret holding bundle_pem.
    XdsConversionError names the file that cannot be converted."""
    bundle_digest = hashlib.sha256(bundle_pem.encode()).hexdigest()
    streamed = tuple(sorted((relpath, file.kind, file.sha256) for relpath, file in snapshot.xds.items()
                            if file.kind in ("resource", "secret")))
    shared_key = (bundle_digest, streamed)
    with _memo_lock:
        found = _shared.get(shared_key)
        if found is not None:
            _shared.move_to_end(shared_key)
    if found is not None:
        return found if found.node_id == node_id else replace(found, node_id=node_id)
    resources = _converted_resources(snapshot, node_id, bundle_pem, bundle_digest)
    with _memo_lock:
        _shared[shared_key] = resources
        while len(_shared) > SHARED_LIMIT:
            _shared.popitem(last=False)
    return resources


def _converted_resources(snapshot: ProxySnapshot, node_id: str, bundle_pem: str,
                         bundle_digest: str) -> ProxyResources:
    files = [file for file in snapshot.xds.values() if file.kind in ("resource", "secret")]
    certificate_secrets = frozenset(name for file in files if file.kind == "secret"
                                    for name in _certificate_secret_names(snapshot.proxy, file.path, file.content))
    kept_sources = " ".join(sorted(certificate_secrets))  # a conversion depends on which SDS sources stay files
    entries: list[tuple[str, str, bytes, str]] = []
    for file in sorted(files, key=lambda item: item.path):
        key = (file.sha256, bundle_digest if file.kind == "secret" else "", kept_sources)
        with _memo_lock:
            converted = _memo.get(key)
        if converted is None:
            converted = _convert_file(snapshot.proxy, file.path, file.content, certificate_secrets, bundle_pem)
            with _memo_lock:
                if len(_memo) >= MEMO_LIMIT:
                    _memo.clear()
                _memo[key] = converted
        entries.extend(converted)
    return assembled(node_id, entries)


def assembled(node_id: str, entries: Iterable[tuple[str, str, bytes, str]]) -> ProxyResources:
    """ProxyResources from (type URL, name, serialized Any, digest of the resource) entries."""
    by_type: dict[str, dict[str, bytes]] = {}
    digests: dict[str, dict[str, str]] = {}
    for type_url, name, packed_bytes, digest in entries:
        by_type.setdefault(type_url, {})[name] = packed_bytes
        digests.setdefault(type_url, {})[name] = digest
    versions = {type_url: content_version(named) for type_url, named in digests.items()}
    return ProxyResources(node_id,
                          MappingProxyType({url: MappingProxyType(named) for url, named in by_type.items()}),
                          MappingProxyType(versions),
                          MappingProxyType({url: MappingProxyType(named) for url, named in digests.items()}))


def content_version(digests: Mapping[str, str]) -> str:
    """The version of a set of resources (name -> sha256 of its canonical JSON): a hash of their content."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _resources_of(proxy: str, path: str, content: str) -> list[dict[str, Any]]:
    try:
        body = yaml.load(content, Loader=_YAML_LOADER)  # a safe loader (libyaml's when built)
    except yaml.YAMLError as error:
        raise XdsConversionError(f"proxy {proxy}: {path} is not YAML: {error}") from None
    items = body.get("resources") if isinstance(body, dict) else None
    if not isinstance(items, list) or any(not isinstance(item, dict) for item in items):
        raise XdsConversionError(f"proxy {proxy}: {path} is not a DiscoveryResponse with a list of resources")
    return items


def _certificate_secret_names(proxy: str, path: str, content: str) -> list[str]:
    return [str(item.get("name")) for item in _resources_of(proxy, path, content)
            if item.get("@type") == SECRET_TYPE and "tls_certificate" in item]


def _convert_file(proxy: str, path: str, content: str, certificate_secrets: frozenset[str],
                  bundle_pem: str) -> _Converted:
    converted = []
    for item in _resources_of(proxy, path, content):
        type_url = item.get("@type")
        if type_url not in RESOURCE_TYPES:
            raise XdsConversionError(f"proxy {proxy}: {path} holds a resource of type {type_url!r}, expected one of "
                                     f"{', '.join(RESOURCE_TYPES)}")
        if type_url == SECRET_TYPE and "tls_certificate" in item:
            continue  # the certificate stays a file on the host
        resource = _streamed(item, certificate_secrets, bundle_pem)
        try:
            name = resource_name(resource)
            packed_bytes = packed(resource)
        except (KeyError, json_format.ParseError, TypeError) as error:
            raise XdsConversionError(f"proxy {proxy}: {path}: a {SHORT_NAMES[type_url]} resource cannot be packed: "
                                     f"{error}") from None
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        converted.append((type_url, name, packed_bytes, hashlib.sha256(canonical.encode()).hexdigest()))
    return tuple(converted)


def _streamed(resource: dict[str, Any], certificate_secrets: frozenset[str], bundle_pem: str) -> dict[str, Any]:
    """The resource as ADS serves it (a new dict): config sources rewritten, the trust bundle inline."""
    rewritten: dict[str, Any] = _rewrite_sources(resource, certificate_secrets)
    if rewritten.get("@type") == SECRET_TYPE and "validation_context" in rewritten:
        context = {key: value for key, value in rewritten["validation_context"].items()
                   if key not in ("trusted_ca", "watched_directory")}
        rewritten["validation_context"] = {"trusted_ca": {"inline_string": bundle_pem}, **context}
    return rewritten


def _rewrite_sources(value: Any, certificate_secrets: frozenset[str]) -> Any:
    if isinstance(value, list):
        return [_rewrite_sources(item, certificate_secrets) for item in value]
    if not isinstance(value, dict):
        return value
    if "path_config_source" in value:
        return ads_source()
    if "sds_config" in value and value.get("name") in certificate_secrets:
        return dict(value)  # the certificate's SDS source: a file on the host
    return {key: _rewrite_sources(item, certificate_secrets) for key, item in value.items()}


def packed(resource: Mapping[str, Any]) -> bytes:
    """A resource in Envoy's JSON form ("@type" and its fields) as a serialized google.protobuf.Any
    (json_format.ParseError for a field or a type the descriptor pool does not know)."""
    message = any_pb2.Any()
    json_format.ParseDict(dict(resource), message)
    return message.SerializeToString(deterministic=True)


def unpacked(data: bytes) -> dict[str, Any]:
    """The JSON form of a serialized Any (what /config_dump shows, in proto field names)."""
    message = any_pb2.Any()
    message.ParseFromString(data)
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def missing_types(type_urls: Iterable[str]) -> list[str]:
    """The type URLs whose message the descriptor pool lacks (an Any of them could not be packed)."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    missing = []
    for url in type_urls:
        try:
            pool.FindMessageTypeByName(url.removeprefix(_TYPE_PREFIX))
        except KeyError:
            missing.append(url)
    return missing


def with_invalid_listener(resources: ProxyResources) -> ProxyResources:
    """`resources` with one more listener that Envoy refuses (an address that is no IP): only for the test hook
    that proves a NACK is reported once and the old config keeps serving."""
    invalid = {"@type": LISTENER_TYPE, "name": INVALID_LISTENER_NAME,
               "address": {"socket_address": {"address": "not-an-ip", "port_value": 1}},
               "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                   "stat_prefix": "invalid", "cluster": "none"}}]}]}
    digest = hashlib.sha256(json.dumps(invalid, sort_keys=True).encode()).hexdigest()
    entries = [(url, name, data, resources.digests[url][name])
               for url, named in resources.by_type.items() for name, data in named.items()]
    entries.append((LISTENER_TYPE, INVALID_LISTENER_NAME, packed(invalid), digest))
    return assembled(resources.node_id, entries)
