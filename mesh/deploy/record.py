"""What mesh deployed where: the managed hosts of the last deploys with how to reach them, in the state dir
(`deployed.json`) and in Consul (`mesh/<mesh_id>/deployed/<host>`), so that a host that left the inventory
entirely (it lost its last workload and its controller role) can still be reached and cleaned. It owns the
record's format; it decides nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mesh import catalog
from mesh.errors import MeshError
from mesh.inventory.model import Connection, ManagedHost, Mesh

RECORD_FILE = "deployed.json"
RECORD_VERSION = 1
Warn = Callable[[str], None]


def consul_prefix(mesh_id: str) -> str:
    return f"mesh/{mesh_id}/deployed/"


def host_entry(host: ManagedHost) -> dict[str, Any]:
    return {"kind": host.kind, "connection": asdict(host.connection)}


def host_from_entry(name: str, entry: Mapping[str, Any]) -> ManagedHost | None:
    """The recorded host with no workload and no role (what a plan of nothing needs), or None when unreadable."""
    try:
        kind = entry["kind"]
        if kind not in ("vm", "container_host"):
            return None
        return ManagedHost(name, kind, Connection(**entry["connection"]))
    except (KeyError, TypeError):
        return None


def read_local(state_dir: str) -> dict[str, dict[str, Any]]:
    """The state dir's record (empty when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(state_dir) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    hosts = data.get("hosts") if isinstance(data, dict) else None
    return {str(name): entry for name, entry in hosts.items() if isinstance(entry, dict)} \
        if isinstance(hosts, dict) else {}


def retired_hosts(mesh: Mesh, warn: Warn) -> list[ManagedHost]:
    """Hosts the state dir's record has and the inventory no longer manages. How to reach a host is taken from
    the state dir only (the operator's own 0600 file): Consul's copy names hosts, but anyone allowed to write
    mesh's keys there must not choose where mesh connects, with which key or host-key check. A host only Consul
    remembers is named in a warning, not cleaned."""
    local = read_local(mesh.settings.state_dir)
    managed = {host.name for host in mesh.hosts}
    elsewhere = sorted(set(_read_consul(mesh, warn)) - set(local) - managed)
    if elsewhere:
        warn(f"Consul records hosts mesh deployed that left the inventory but this state dir does not know: "
             f"{', '.join(elsewhere)}; they are not cleaned from here (deploy from the state dir that deployed "
             "them)")
    found = []
    for name, entry in sorted(local.items()):
        if name in managed:
            continue
        host = host_from_entry(name, entry)
        if host is None:
            warn(f"the deployment record of {name} cannot be read; it is not cleaned")
            continue
        found.append(host)
    return found


def update(mesh: Mesh, deployed: Iterable[ManagedHost], cleaned: Iterable[str], warn: Warn) -> None:
    """Record the hosts deployed now and drop the ones cleaned, in the state dir and in Consul."""
    deployed = list(deployed)
    cleaned = set(cleaned)
    hosts = read_local(mesh.settings.state_dir)
    hosts.update({host.name: host_entry(host) for host in deployed})
    for name in cleaned:
        hosts.pop(name, None)
    _write_local(mesh.settings.state_dir, hosts)
    _write_consul(mesh, {host.name: host_entry(host) for host in deployed}, cleaned, warn)


def _write_local(state_dir: str, hosts: Mapping[str, Any]) -> None:
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle, temp = tempfile.mkstemp(prefix=".deployed-", dir=folder)
    with os.fdopen(handle, "w") as out:
        json.dump({"version": RECORD_VERSION, "hosts": dict(sorted(hosts.items()))}, out, indent=2, sort_keys=True)
    os.replace(temp, folder / RECORD_FILE)


def _read_consul(mesh: Mesh, warn: Warn) -> dict[str, dict[str, Any]]:
    if not mesh.settings.consul_url:
        return {}
    try:
        with catalog.client_for(catalog.access_for(mesh)) as client:
            _, entries = client.kv.get(consul_prefix(mesh.settings.id), recurse=True)
    except MeshError as exc:
        warn(f"the deployment record in Consul cannot be read ({exc}); the state dir's is used")
        return {}
    found = {}
    for item in entries or []:
        name = str(item.get("Key", "")).rsplit("/", 1)[-1]
        try:
            entry = json.loads(item.get("Value") or b"")
        except ValueError:
            continue
        if name and isinstance(entry, dict):
            found[name] = entry
    return found


def _write_consul(mesh: Mesh, deployed: Mapping[str, Any], cleaned: Iterable[str], warn: Warn) -> None:
    if not mesh.settings.consul_url:
        return
    prefix = consul_prefix(mesh.settings.id)
    try:
        with catalog.client_for(catalog.access_for(mesh)) as client:
            for name, entry in deployed.items():
                client.kv.put(prefix + name, json.dumps(entry, sort_keys=True))
            for name in cleaned:
                client.kv.delete(prefix + name)
    except MeshError as exc:
        warn(f"the deployment record in Consul was not updated ({exc}); the state dir's was")
