"""Run-time denies in Consul KV: `mesh/<mesh_id>/authz/<service>` holds one service's AuthzOverride as JSON
(mesh.inventory.services.authz_override_to_json, with who set it and when); the controllers apply it as the
`runtime-deny` entry of the service's inbound RBAC and report, in their state (key "authz"), per service the
revision every instance of it reflects ("" when none is applied).

It owns the authz kind of mesh.runtime_kv (which stores, reads and reports every kind of override): the keys, the
value's shape, when a stored one applies; it must not decide what to write (mesh.authz.changes does) or print.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from types import MappingProxyType

from mesh import catalog
from mesh.inventory.model import Mesh
from mesh.inventory.policy import AuthzOverride
from mesh.inventory.services import authz_override_from_json, authz_override_to_json, check_authz_override
from mesh.runtime_kv import (
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

KIND = "authz"
WHAT = "a run-time deny"
StoredDeny = Stored[AuthzOverride]
AuthzStore = OverrideStore[AuthzOverride]
applied_authz = partial(applied_revisions, section=KIND)


def authz_prefix(mesh_id: str) -> str:
    """Where every service's run-time deny lives (the controllers watch this prefix)."""
    return kv_prefix(mesh_id, KIND)


def authz_key(mesh_id: str, service: str) -> str:
    return authz_prefix(mesh_id) + service


def encode_deny(override: AuthzOverride, set_by: str, at: datetime) -> str:
    """The KV value: the deny's JSON with who set it and when (UTC), keys sorted."""
    return encode_value(authz_override_to_json(override, set_by, time_text(at)))


def decode_deny(service: str, value: bytes | str | None, index: int = 0) -> StoredDeny:
    """A KV value read back; never raises: what cannot be read is a StoredDeny with a problem."""
    return decode_value(service, value, index, authz_override_from_json, WHAT)


def is_empty(override: AuthzOverride) -> bool:
    return not override.deny_from


def usable_problems(stored: StoredDeny, mesh: Mesh) -> list[str]:
    """Why the controllers ignore this stored deny (unreadable, a service the inventory does not have, or
    check_authz_override's problems: an unknown source, an id outside the trust domain); empty when it applies."""
    if stored.override is None:
        return [stored.problem or "unreadable"]
    if stored.service not in mesh.services:
        return [f"the inventory has no service {stored.service!r}"]
    return check_authz_override(stored.override, tuple(mesh.services), mesh.settings.trust_domain)


class ConsulAuthz(ConsulOverrides[AuthzOverride]):
    """The mesh's run-time denies in its Consul."""

    def __init__(self, access: catalog.ConsulAccess, mesh_id: str) -> None:
        super().__init__(access, mesh_id, KIND, authz_override_from_json, WHAT)

    @classmethod
    def of(cls, mesh: Mesh) -> ConsulAuthz:
        return cls(catalog.access_for(mesh), mesh.settings.id)


def plan_authz_overrides(mesh: Mesh, warn: Callable[[str], None], store: AuthzStore | None = None
                         ) -> Mapping[str, AuthzOverride]:
    """The run-time denies a deploy plans with (so the inbound files it writes equal the controllers'): every
    stored one that applies to this inventory; one that does not is named in a warning and left out, as the
    controllers do. Consul that cannot be read: a warning, and authorization as the inventory says."""
    if not mesh.settings.consul_url:
        return MappingProxyType({})
    stored = read_all_or_warn(lambda: store or ConsulAuthz.of(mesh), warn, "denies (mesh authz deny)",
                              "authorization as the inventory says")
    return read_usable(stored, partial(usable_problems, mesh=mesh), is_empty, warn, "mesh authz deny {service} --undo")
