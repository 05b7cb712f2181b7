"""Who may call a service: its authorization (the inventory's rules, the mesh's default, a run-time deny) compiled
into the entries of the two RBAC filters of its inbound app chain, and the decision those entries give. Pure.

Envoy's filters (mesh/render.py) and `mesh authz check` both read an AuthzConfig, so the proxy and the command
agree. It must not read the inventory's files, Consul or hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mesh.inventory.model import Protocol, spiffe_id
from mesh.inventory.policy import (
    UNAUTHENTICATED,
    AuthzDefault,
    AuthzOverride,
    PathMatch,
    ServicePolicy,
)

PrincipalKind = Literal["id", "prefix", "unauthenticated", "any"]


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: one SPIFFE id, every id under a prefix, a plaintext client, or anyone."""

    kind: PrincipalKind
    value: str = ""  # the SPIFFE id or prefix


@dataclass(frozen=True)
class AuthzEntry:
    """One RBAC policy: it matches a request from any of `principals` (and none of `excluded`) that meets every
    given condition."""

    name: str
    principals: tuple[Principal, ...]
    excluded: tuple[Principal, ...] = ()
    methods: tuple[str, ...] = ()  # () = any; HTTP only
    paths: tuple[PathMatch, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AuthzConfig:
    """The entries of a service's inbound DENY and ALLOW filters, enforced and shadow (allow_shadow None: no
    allow rule is in shadow mode)."""

    deny: tuple[AuthzEntry, ...]
    deny_shadow: tuple[AuthzEntry, ...]
    allow: tuple[AuthzEntry, ...]
    allow_shadow: tuple[AuthzEntry, ...] | None


@dataclass(frozen=True)
class InboundInputs:
    """What, besides the service's policy and run-time deny, decides a proxy's inbound authorization; JSON in the
    controller's spec."""

    service: str
    version: str
    protocol: Protocol
    trust_domain: str
    authz_default: AuthzDefault
    callers: tuple[str, ...]  # services declaring this one as an upstream, sorted

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "version": self.version, "protocol": self.protocol,
                "trust_domain": self.trust_domain, "authz_default": self.authz_default,
                "callers": list(self.callers)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InboundInputs:
        return cls(service=str(data["service"]), version=str(data["version"]), protocol=data["protocol"],
                   trust_domain=str(data["trust_domain"]), authz_default=data["authz_default"],
                   callers=tuple(str(caller) for caller in data["callers"]))


@dataclass(frozen=True)
class AuthzRequest:
    """A request (or a TCP connection: no method, path or headers) as the inbound app chain sees it."""

    source: str | None  # the caller's SPIFFE id; None = unauthenticated (plaintext)
    method: str | None = None  # None for TCP
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    rule: str  # the entry that decided, or "none"
    would_deny: tuple[str, ...] = ()  # shadow entries that would have denied it


def source_id(trust_domain: str, source: str) -> str | None:
    """The SPIFFE id of a source as rules write it: a service name gives its id, an id is itself, and
    `unauthenticated` gives None (a plaintext client has none)."""
    if source == UNAUTHENTICATED:
        return None
    if source.startswith("spiffe://"):
        return source
    return spiffe_id(trust_domain, source)


def compile_authz(inputs: InboundInputs, policy: ServicePolicy, override: AuthzOverride | None) -> AuthzConfig:
    """The RBAC entries of the service `inputs` names, from its policy's authz, the mesh's default, its callers
    and the run-time deny (see design: deny[i], runtime-deny, allow[i], default)."""
    raise NotImplementedError


def decide(config: AuthzConfig, request: AuthzRequest) -> AuthzDecision:
    """What Envoy's DENY then ALLOW filters decide for `request`, and which shadow entries would deny it."""
    raise NotImplementedError
