"""Who may call a service: its authorization (the inventory's rules, the mesh's default, a run-time deny) compiled
into the entries of the two RBAC filters of its inbound app chain, and the decision those entries give. Pure.

Envoy's filters (mesh/render.py) and `mesh authz check` both read an AuthzConfig, so the proxy and the command
agree. It must not read the inventory's files, Consul or hosts.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mesh.inventory.model import Protocol, spiffe_id
from mesh.inventory.policy import (
    AUTHZ_DEFAULTS,
    UNAUTHENTICATED,
    AuthzDefault,
    AuthzOverride,
    AuthzRule,
    PathMatch,
    ServicePolicy,
)
from mesh.inventory.workloads import PROTOCOLS

PrincipalKind = Literal["id", "prefix", "unauthenticated", "any"]
NO_MATCH = "none"  # the rule of a request no allow entry matches (as Envoy reports an ALLOW filter's denial)


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
        """The inputs to_json wrote; ValueError when the protocol or default is not one mesh knows."""
        if data["protocol"] not in PROTOCOLS or data["authz_default"] not in AUTHZ_DEFAULTS:
            raise ValueError(f"not inbound inputs: protocol {data['protocol']!r}, default {data['authz_default']!r}")
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
    and the run-time deny, named as Envoy reports them: `deny[i]`, `runtime-deny`, `allow[i]`, `default`.

    The `default` entry (the mesh's default: declared callers, every workload, or no one; plus `unauthenticated`
    on a permissive service) excludes every source an allow rule names, since such a rule narrows what those
    sources may do. The enforced set excludes the sources of enforced allow rules only (a shadow rule changes
    nothing that is enforced); the shadow allow set, the enforced set as if the shadow allow rules were
    enforced, excludes both."""
    td = inputs.trust_domain
    rules = policy.authz
    deny = [_entry(f"deny[{index}]", rule, td) for index, rule in enumerate(rules.deny) if rule.mode == "enforce"]
    if override is not None and override.deny_from:
        deny.append(AuthzEntry("runtime-deny", _principals(override.deny_from, td)))
    deny_shadow = tuple(_entry(f"deny[{index}]", rule, td) for index, rule in enumerate(rules.deny)
                        if rule.mode == "shadow")
    allow = _allow_entries(inputs, policy, ("enforce",))
    shadow = any(rule.mode == "shadow" for rule in rules.allow)
    return AuthzConfig(deny=tuple(deny), deny_shadow=deny_shadow, allow=allow,
                       allow_shadow=_allow_entries(inputs, policy, ("enforce", "shadow")) if shadow else None)


def _allow_entries(inputs: InboundInputs, policy: ServicePolicy, modes: tuple[str, ...]) -> tuple[AuthzEntry, ...]:
    td = inputs.trust_domain
    chosen = [(index, rule) for index, rule in enumerate(policy.authz.allow) if rule.mode in modes]
    entries = [_entry(f"allow[{index}]", rule, td) for index, rule in chosen]
    named = sorted({source for _, rule in chosen for source in rule.sources}, key=lambda s: source_id(td, s) or "")
    baseline: list[Principal] = []
    if inputs.authz_default == "declared":
        baseline = [Principal("id", spiffe_id(td, caller)) for caller in sorted(set(inputs.callers))]
    elif inputs.authz_default == "allow":
        baseline = [Principal("prefix", workload_prefix(td))]
    if policy.mtls == "permissive":
        baseline.append(Principal("unauthenticated"))
    if baseline:
        entries.append(AuthzEntry("default", tuple(baseline), _principals(named, td)))
    return tuple(entries)


def workload_prefix(trust_domain: str) -> str:
    """What every workload's SPIFFE id starts with (the checker's does not)."""
    return spiffe_id(trust_domain, "")


def _entry(name: str, rule: AuthzRule, trust_domain: str) -> AuthzEntry:
    # No `from`: any source, authenticated or not; on the app chain "any" still never means the checker.
    principals = _principals(rule.sources, trust_domain) if rule.sources else \
        (Principal("prefix", workload_prefix(trust_domain)), Principal("unauthenticated"))
    return AuthzEntry(name, principals, methods=rule.methods, paths=rule.paths, headers=rule.headers)


def _principals(sources: Iterable[str], trust_domain: str) -> tuple[Principal, ...]:
    """Sources as principals, in the order given, each once (a service and its id are one)."""
    found: dict[str | None, Principal] = {}
    for source in sources:
        identity = source_id(trust_domain, source)
        found.setdefault(identity, Principal("unauthenticated") if identity is None else Principal("id", identity))
    return tuple(found.values())


def decide(config: AuthzConfig, request: AuthzRequest) -> AuthzDecision:
    """What Envoy's DENY then ALLOW filters decide for `request`, and which shadow entries would deny it.

    Where several entries of one filter match, Envoy reports the first by name (its engine keeps policies in
    a sorted map), and so does this. The DENY filter's shadow rules always run; the ALLOW filter (and its
    shadow rules) only for what the DENY filter lets through. A shadow ALLOW set that matches nothing would
    deny with `none`."""
    would_deny = tuple(entry.name for entry in config.deny_shadow if matches(entry, request))
    denied = _first(config.deny, request)
    if denied is not None:
        return AuthzDecision(False, denied, would_deny)
    if config.allow_shadow is not None and _first(config.allow_shadow, request) is None:
        would_deny = (*would_deny, NO_MATCH)
    allowed = _first(config.allow, request)
    return AuthzDecision(allowed is not None, allowed or NO_MATCH, would_deny)


def _first(entries: Iterable[AuthzEntry], request: AuthzRequest) -> str | None:
    return min((entry.name for entry in entries if matches(entry, request)), default=None)


def matches(entry: AuthzEntry, request: AuthzRequest) -> bool:
    """True when the entry's principals take the request's source and each of its conditions holds."""
    if not any(_takes(principal, request.source) for principal in entry.principals):
        return False
    if any(_takes(principal, request.source) for principal in entry.excluded):
        return False
    if entry.methods and request.method not in entry.methods:
        return False
    if entry.paths:
        if request.path is None:
            return False
        path = normalized_path(request.path)
        if not any(path == match.value if match.kind == "exact" else path.startswith(match.value)
                   for match in entry.paths):
            return False
    headers = {(name.lower(), value) for name, value in request.headers}
    return all((name, value) in headers for name, value in entry.headers)


def _takes(principal: Principal, source: str | None) -> bool:
    if principal.kind == "any":
        return True
    if principal.kind == "unauthenticated":
        return source is None
    if source is None:
        return False
    return source == principal.value if principal.kind == "id" else source.startswith(principal.value)


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def normalized_path(path: str) -> str:
    """The path the inbound HTTP connection manager's filters see (its normalize_path and merge_slashes, so that
    `/orders/../admin/x` meets a rule on `/admin/*` as the app would read it): the query and fragment cut,
    percent-encoded unreserved characters decoded (`%2e` is `.`), `.` and `..` segments removed (RFC 3986), then
    repeated slashes merged. An escaped slash (`%2F`) stays as it is, as in Envoy."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    path = re.sub(r"%([0-9A-Fa-f]{2})", lambda found: chr(int(found[1], 16))
                  if chr(int(found[1], 16)) in _UNRESERVED else found[0].upper(), path)
    kept: list[str] = []
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments and segments[-1] in (".", ".."):
        kept.append("")  # `/a/b/..` is `/a/`
    return re.sub(r"/{2,}", "/", "/" + "/".join(kept))
