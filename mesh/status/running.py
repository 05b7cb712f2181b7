"""What a running Envoy says through its admin API (/server_info, /config_dump, /certs, /clusters), and where it
differs from the files on its host: the bootstrap's hash (node.metadata), each resource file's version_info, the
certificate's serial. Pure: text in, values out; it must not read hosts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from mesh.render import (
    BOOTSTRAP_METADATA_KEY,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_CONFIG_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)
from mesh.status.report import RunningDrift

# A resource as Envoy's config dump keys its version: (type URL, name); name None for LDS and CDS, whose dumps
# carry one version for every listener or cluster (the version of the last file Envoy accepted).
ResourceKey = tuple[str, str | None]
_ONE_VERSION_FOR_ALL = (LISTENER_TYPE, CLUSTER_TYPE)


def admin_json(text: bytes) -> dict[str, Any] | None:
    """An admin answer parsed, or None when there was none (Envoy down, socket missing) or it was not JSON."""
    try:
        data = json.loads(text or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def envoy_version(server_info: Mapping[str, Any]) -> str | None:
    """"1.40.0" from /server_info's version ("<sha>/1.40.0/Clean/RELEASE/BoringSSL")."""
    parts = str(server_info.get("version", "")).split("/")
    return parts[1] if len(parts) > 1 else None


def running_bootstrap_hash(server_info: Mapping[str, Any]) -> str | None:
    """node.metadata.mesh_bootstrap_sha256 of the bootstrap Envoy started with (from /server_info)."""
    node = server_info.get("node") or {}
    value = (node.get("metadata") or {}).get(BOOTSTRAP_METADATA_KEY) if isinstance(node, dict) else None
    return str(value) if value is not None else None


def file_bootstrap_hash(text: str) -> str | None:
    """node.metadata.mesh_bootstrap_sha256 of a bootstrap file on the host; None when it has none."""
    data = _yaml(text)
    node = data.get("node") if isinstance(data, dict) else None
    metadata = node.get("metadata") if isinstance(node, dict) else None
    value = metadata.get(BOOTSTRAP_METADATA_KEY) if isinstance(metadata, dict) else None
    return str(value) if value is not None else None


def file_versions(text: str) -> dict[ResourceKey, str]:
    """The version a resource file (a DiscoveryResponse) gives each resource in it, as loaded_versions shows it
    once Envoy took the file: its version_info, but the endpoints' addresses for a ClusterLoadAssignment (Envoy's
    dump shows no version of endpoints read from a file); {} when unreadable."""
    data = _yaml(text)
    if not isinstance(data, dict) or not isinstance(data.get("resources"), list):
        return {}
    version = str(data.get("version_info", ""))
    found: dict[ResourceKey, str] = {}
    for resource in data["resources"]:
        if isinstance(resource, dict):
            type_url = str(resource.get("@type", ""))
            found[_key(type_url, resource)] = endpoint_addresses(resource) if type_url == ENDPOINT_TYPE else version
    return found


def loaded_versions(config_dump: Mapping[str, Any]) -> dict[ResourceKey, str]:
    """The version Envoy holds per resource, from /config_dump?include_eds (for endpoints: their addresses)."""
    found: dict[ResourceKey, str] = {}
    for dump in config_dump.get("configs") or []:
        kind = str(dump.get("@type", "")).rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump" and dump.get("version_info"):
            found[(LISTENER_TYPE, None)] = str(dump["version_info"])
        elif kind == "ClustersConfigDump" and dump.get("version_info"):
            found[(CLUSTER_TYPE, None)] = str(dump["version_info"])
        elif kind == "RoutesConfigDump":
            for item in dump.get("dynamic_route_configs") or []:
                found[(ROUTE_TYPE, str((item.get("route_config") or {}).get("name")))] = str(item.get("version_info"))
        elif kind == "EndpointsConfigDump":
            for item in dump.get("dynamic_endpoint_configs") or []:
                assignment = item.get("endpoint_config") or {}
                found[(ENDPOINT_TYPE, str(assignment.get("cluster_name")))] = endpoint_addresses(assignment)
        elif kind == "EcdsConfigDump":  # the network filters read by ECDS (a TCP service's RBAC)
            for item in dump.get("ecds_filters") or []:
                found[(EXTENSION_CONFIG_TYPE, str((item.get("ecds_filter") or {}).get("name")))] = str(
                    item.get("version_info"))
        elif kind == "SecretsConfigDump":
            for item in dump.get("dynamic_active_secrets") or []:
                found[(SECRET_TYPE, str(item.get("name")))] = str(item.get("version_info"))
    return found


def endpoint_addresses(assignment: Mapping[str, Any]) -> str:
    """A ClusterLoadAssignment's endpoints as `address:port` sorted and joined by commas."""
    found = []
    for locality in assignment.get("endpoints") or []:
        for item in locality.get("lb_endpoints") or []:
            address = ((item.get("endpoint") or {}).get("address") or {}).get("socket_address") or {}
            found.append(f"{address.get('address')}:{address.get('port_value')}")
    return ",".join(sorted(found))


def served_serials(certs: Mapping[str, Any]) -> tuple[str, ...]:
    """The serial (hex, as `format(serial, "x")`) of each leaf Envoy presents, from /certs (one entry per TLS
    context; the leaf is the first of its cert_chain)."""
    found: set[str] = set()
    for context in certs.get("certificates") or []:
        chain = context.get("cert_chain") or []
        if chain and chain[0].get("serial_number"):
            found.add(normal_serial(str(chain[0]["serial_number"])))
    return tuple(sorted(found))


def normal_serial(text: str) -> str:
    """A hex serial without leading zeros, lower case (Envoy prints BoringSSL's form, with leading zeros)."""
    try:
        return format(int(text, 16), "x")
    except ValueError:
        return text.lower()


def cluster_health(clusters_text: bytes) -> dict[str, list[str]]:
    """Cluster -> the health_flags of each of its hosts, from the admin /clusters text."""
    found: dict[str, list[str]] = {}
    for line in clusters_text.decode(errors="replace").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            found.setdefault(parts[0], []).append(parts[3])
    return found


def resource_drifts(files: Mapping[str, str], loaded: Mapping[ResourceKey, str]) -> list[RunningDrift]:
    """Each resource file (name relative to the proxy folder -> its text on the host) whose version_info is not
    the one Envoy holds: a reload not yet done, or refused (Envoy keeps the last config it accepted)."""
    drifts = []
    for name, text in sorted(files.items()):
        for key, version in file_versions(text).items():
            running = loaded.get(key)
            if running != version:
                drifts.append(RunningDrift(name, running, version, "reload"))
                break  # one line per file
    return drifts


def bootstrap_drift(file_text: str, server_info: Mapping[str, Any]) -> RunningDrift | None:
    """The bootstrap on the host is not the one Envoy started with: a restart is owed."""
    on_disk, running = file_bootstrap_hash(file_text), running_bootstrap_hash(server_info)
    if on_disk is None or on_disk == running:
        return None
    return RunningDrift("bootstrap", running, on_disk, "restart")


def certificate_drift(on_disk: str | None, served: tuple[str, ...]) -> RunningDrift | None:
    """Envoy serves another certificate than the one on disk (or none): the SDS reload has not happened."""
    if on_disk is None or served == (on_disk,):
        return None
    return RunningDrift("certificate", ", ".join(served) or None, on_disk, "reload")


def _key(type_url: str, resource: Mapping[str, Any]) -> ResourceKey:
    if type_url in _ONE_VERSION_FOR_ALL:
        return (type_url, None)
    name = resource.get("cluster_name") if type_url == ENDPOINT_TYPE else resource.get("name")
    return (type_url, str(name))


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None
