"""Run-time overrides in Consul KV: `mesh/<mesh_id>/traffic/<service>` holds one service's override as JSON
(mesh.inventory.services.override_to_json, plus who set it and when); the active controller applies it and
reports, in its state (`mesh/<mesh_id>/controller/state`, key "traffic"), per service the revision every caller's
routes reflect ("" when they follow the inventory alone).

It owns the keys, the stored value's shape and reading the controllers' report; it must not decide what to write
(mesh.traffic.changes does) or print.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

from mesh import catalog
from mesh.controller.spec import lock_key, state_key
from mesh.errors import MeshError
from mesh.inventory.model import Mesh
from mesh.inventory.policy import TrafficOverride
from mesh.inventory.services import PolicyError, check_override, override_from_json, override_to_json
from mesh.status.controllers import judge_controllers

MAX_VALUE = 64 * 1024  # an override is a few hundred bytes; Consul's own limit is 512 KiB


def traffic_prefix(mesh_id: str) -> str:
    """Where every service's override lives (the controllers watch this prefix)."""
    return f"mesh/{mesh_id}/traffic/"


def traffic_key(mesh_id: str, service: str) -> str:
    return traffic_prefix(mesh_id) + service


@dataclass(frozen=True)
class StoredOverride:
    """One service's override as Consul holds it; `override` is None when the value is not one mesh can read
    (`problem` says why: the controllers then ignore it and the inventory's routing holds)."""

    service: str
    override: TrafficOverride | None
    problem: str | None = None
    set_by: str = ""
    at: str = ""
    index: int = 0  # Consul's ModifyIndex: a write or delete checks it (check-and-set)


def encode_override(override: TrafficOverride, set_by: str, at: datetime) -> str:
    """The KV value: the override's canonical JSON with who set it and when (UTC), keys sorted."""
    return json.dumps(override_to_json(override, set_by, at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")),
                      sort_keys=True)


def decode_override(service: str, value: bytes | str | None, index: int = 0) -> StoredOverride:
    """A KV value read back; never raises: what cannot be read is a StoredOverride with a problem."""
    raw = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else (value or "")
    if len(raw) > MAX_VALUE:
        return StoredOverride(service, None, f"the value is larger than {MAX_VALUE} bytes", index=index)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return StoredOverride(service, None, f"not JSON: {exc}", index=index)
    if not isinstance(data, dict):
        return StoredOverride(service, None, "not a JSON object", index=index)
    try:
        override = override_from_json(data)
    except PolicyError as exc:
        return StoredOverride(service, None, f"not an override: {'; '.join(exc.problems)}", index=index)
    return StoredOverride(service, override, None, _text(data.get("set_by")), _text(data.get("at")), index)


def _text(value: object) -> str:
    return value[:200] if isinstance(value, str) else ""


def usable_problems(stored: StoredOverride, mesh: Mesh) -> list[str]:
    """Why the controllers ignore this stored override (unreadable, or check_override's problems against the
    inventory: an unknown version, weights not summing to 100, a fault on a TCP service); empty when it applies."""
    if stored.override is None:
        return [stored.problem or "unreadable"]
    workloads = mesh.services.get(stored.service, ())
    if not workloads:
        return [f"the inventory has no service {stored.service!r}"]
    return check_override(stored.override, mesh.versions(stored.service), workloads[0].protocol, stored.service)


@dataclass(frozen=True)
class AppliedTraffic:
    """The controllers' report: whether one is active (else why not) and, per service with callers, the revision
    of the override every caller's routes reflect ("" = none; a service is absent while a push is pending)."""

    active: bool
    reason: str | None = None
    lock_held: bool = False
    revisions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def revision(self, service: str) -> str | None:
        return self.revisions.get(service) if self.active else None


def applied_traffic(lock_session: str | None, state_value: bytes | str | None, now: datetime) -> AppliedTraffic:
    """The report from the lock's session and the published state's text. Pure."""
    view = judge_controllers(lock_session, state_value, now)
    revisions: dict[str, str] = {}
    try:
        document = json.loads(state_value or b"")
    except ValueError:
        document = None
    traffic = document.get("traffic") if isinstance(document, dict) else None
    for service, revision in (traffic.items() if isinstance(traffic, dict) else ()):
        if isinstance(revision, str):
            revisions[str(service)] = revision
    return AppliedTraffic(view.status.active, view.status.reason, view.status.lock_held,
                          MappingProxyType(revisions))


class TrafficStore(Protocol):
    """Where overrides are read and written: Consul (ConsulTraffic), or a fake in tests."""

    def read(self, service: str) -> StoredOverride | None: ...

    def read_all(self) -> Mapping[str, StoredOverride]: ...

    def write(self, service: str, value: str, index: int) -> bool:
        """Check-and-set: stores value only if the key is unchanged since `index` was read (0: only if it does
        not exist); False otherwise."""
        ...

    def delete(self, service: str, index: int) -> bool:
        """Check-and-set delete of the value read at `index`; False when it changed meanwhile."""
        ...

    def applied(self) -> AppliedTraffic: ...


@dataclass(frozen=True)
class ConsulTraffic:
    """The mesh's overrides in its Consul (token and CA as every command uses them)."""

    access: catalog.ConsulAccess
    mesh_id: str

    @classmethod
    def of(cls, mesh: Mesh) -> ConsulTraffic:
        return cls(catalog.access_for(mesh), mesh.settings.id)

    def read(self, service: str) -> StoredOverride | None:
        with catalog.client_for(self.access) as client:
            _, entry = client.kv.get(traffic_key(self.mesh_id, service))
        if not entry:
            return None
        return decode_override(service, entry.get("Value"), int(entry.get("ModifyIndex") or 0))

    def read_all(self) -> Mapping[str, StoredOverride]:
        prefix = traffic_prefix(self.mesh_id)
        with catalog.client_for(self.access) as client:
            _, entries = client.kv.get(prefix, recurse=True)
        found = {}
        for entry in entries or []:
            service = str(entry.get("Key", ""))[len(prefix):]
            if service and "/" not in service:
                found[service] = decode_override(service, entry.get("Value"), int(entry.get("ModifyIndex") or 0))
        return dict(sorted(found.items()))

    def write(self, service: str, value: str, index: int) -> bool:
        with catalog.client_for(self.access) as client:
            return bool(client.kv.put(traffic_key(self.mesh_id, service), value, cas=index))

    def delete(self, service: str, index: int) -> bool:
        with catalog.client_for(self.access) as client:
            return bool(client.kv.delete(traffic_key(self.mesh_id, service), cas=index))

    def applied(self) -> AppliedTraffic:
        try:
            with catalog.client_for(self.access) as client:
                _, lock = client.kv.get(lock_key(self.mesh_id))
                _, state = client.kv.get(state_key(self.mesh_id))
        except MeshError as exc:
            return AppliedTraffic(False, f"Consul not read: {exc}")
        session = (lock or {}).get("Session")
        return applied_traffic(str(session) if session else None, (state or {}).get("Value"), datetime.now(UTC))


def plan_overrides(mesh: Mesh, warn: Any, store: TrafficStore | None = None) -> Mapping[str, TrafficOverride]:
    """The overrides a deploy plans with (so the route files it writes equal the controllers'): every stored one
    that applies to this inventory; one that does not is named in a warning and left out, as the controllers do.
    Consul that cannot be read: a warning, and routes as the inventory says."""
    if not mesh.settings.consul_url:
        return MappingProxyType({})
    try:
        stored = (store or ConsulTraffic.of(mesh)).read_all()
    except catalog.TokenRefused:
        raise
    except MeshError as exc:
        warn(f"cannot read the run-time traffic overrides ({exc}): routes as the inventory says")
        return MappingProxyType({})
    found: dict[str, TrafficOverride] = {}
    for service, item in stored.items():
        problems = usable_problems(item, mesh)
        if problems:
            warn(f"the run-time override of {service} is ignored: {'; '.join(problems)} "
                 f"(`mesh route reset {service}` removes it)")
        elif item.override is not None and not item.override.empty:
            found[service] = item.override
    return MappingProxyType(found)
