"""Run-time overrides in Consul KV: `mesh/<mesh_id>/traffic/<service>` holds one service's override as JSON
(mesh.inventory.services.override_to_json, plus who set it and when); the active controller applies it and
reports, in its state (`mesh/<mesh_id>/controller/state`, key "traffic"), per service the revision every caller's
routes reflect ("" when they follow the inventory alone).

It owns the traffic kind of mesh.runtime_kv (which stores, reads and reports every kind of override): the keys,
the value's shape, when a stored one applies; it must not decide what to write (mesh.traffic.changes does) or
print.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from types import MappingProxyType

from mesh import catalog
from mesh.inventory.model import Mesh
from mesh.inventory.policy import TrafficOverride
from mesh.inventory.services import check_override, override_from_json, override_to_json
from mesh.runtime_kv import (
    AppliedRevisions,
    ConsulOverrides,
    OverrideStore,
    Stored,
    applied_revisions,
    decode_value,
    encode_value,
    kv_prefix,
    read_all_or_warn,
    read_usable,
    time_text,
)

KIND = "traffic"
WHAT = "an override"
StoredOverride = Stored[TrafficOverride]
TrafficStore = OverrideStore[TrafficOverride]
AppliedTraffic = AppliedRevisions
applied_traffic = partial(applied_revisions, section=KIND)


def traffic_prefix(mesh_id: str) -> str:
    """Where every service's override lives (the controllers watch this prefix)."""
    return kv_prefix(mesh_id, KIND)


def traffic_key(mesh_id: str, service: str) -> str:
    return traffic_prefix(mesh_id) + service


def encode_override(override: TrafficOverride, set_by: str, at: datetime) -> str:
    """The KV value: the override's canonical JSON with who set it and when (UTC), keys sorted."""
    return encode_value(override_to_json(override, set_by, time_text(at)))


def decode_override(service: str, value: bytes | str | None, index: int = 0) -> StoredOverride:
    """A KV value read back; never raises: what cannot be read is a StoredOverride with a problem."""
    return decode_value(service, value, index, override_from_json, WHAT)


def usable_problems(stored: StoredOverride, mesh: Mesh) -> list[str]:
    """Why the controllers ignore this stored override (unreadable, or check_override's problems against the
    inventory: an unknown version, weights not summing to 100, a fault on a TCP service); empty when it applies."""
    if stored.override is None:
        return [stored.problem or "unreadable"]
    workloads = mesh.services.get(stored.service, ())
    if not workloads:
        return [f"the inventory has no service {stored.service!r}"]
    return check_override(stored.override, mesh.versions(stored.service), workloads[0].protocol, stored.service)


class ConsulTraffic(ConsulOverrides[TrafficOverride]):
    """The mesh's traffic overrides in its Consul."""

    def __init__(self, access: catalog.ConsulAccess, mesh_id: str) -> None:
        super().__init__(access, mesh_id, KIND, override_from_json, WHAT)

    @classmethod
    def of(cls, mesh: Mesh) -> ConsulTraffic:
        return cls(catalog.access_for(mesh), mesh.settings.id)


def plan_overrides(mesh: Mesh, warn: Callable[[str], None], store: TrafficStore | None = None
                   ) -> Mapping[str, TrafficOverride]:
    """The overrides a deploy plans with (so the route files it writes equal the controllers'): every stored one
    that applies to this inventory; one that does not is named in a warning and left out, as the controllers do.
    Consul that cannot be read: a warning, and routes as the inventory says."""
    if not mesh.settings.consul_url:
        return MappingProxyType({})
    stored = read_all_or_warn(lambda: store or ConsulTraffic.of(mesh), warn, "traffic overrides",
                              "routes as the inventory says")
    return read_usable(stored, partial(usable_problems, mesh=mesh), lambda item: item.empty, warn,
                       "mesh route reset {service}")
