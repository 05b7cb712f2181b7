"""What `mesh authz check/matrix/show` answer, from the inventory and the run-time denies read from Consul: a
service's compiled authorization (mesh.config.authz.compile_authz, the one Envoy's RBAC filters are rendered from),
the decision for one request (mesh.config.authz.decide) with the deciding rule in the inventory's words, and the
matrix cell of a pair (allow, deny, or partial: the decisions over probe requests that cross every condition).

Pure: it never re-implements the semantics (decide does), reads nothing and prints nothing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mesh.authz.kv import StoredDeny, usable_problems
from mesh.config.authz import (
    AuthzConfig,
    AuthzDecision,
    AuthzEntry,
    AuthzRequest,
    InboundInputs,
    compile_authz,
    decide,
    source_id,
)
from mesh.inventory.authz import rule_text
from mesh.inventory.model import Mesh, Protocol
from mesh.inventory.policy import UNAUTHENTICATED, AuthzOverride, ServicePolicy
from mesh.inventory.policy_values import HTTP_METHODS

Cell = Literal["allow", "deny", "partial"]
STRICT_RULE = "mtls-strict"  # a plaintext client of a strict service: refused by the TLS handshake, before RBAC
_NUMBERED = re.compile(r"(allow|deny)\[(\d+)\]")


def callers_of(mesh: Mesh, service: str) -> tuple[str, ...]:
    """The services whose workloads declare `service` as an upstream, sorted."""
    return tuple(sorted({workload.service for workload in mesh.workloads
                         if any(upstream.service == service for upstream in workload.upstreams)}))


def inbound_inputs(mesh: Mesh, service: str) -> InboundInputs:
    """The InboundInputs of the service's instances (the version aside, they are the same for every instance)."""
    workload = mesh.services[service][0]
    return InboundInputs(service=service, version=workload.version, protocol=workload.protocol,
                         trust_domain=mesh.settings.trust_domain, authz_default=mesh.settings.authz_default,
                         callers=callers_of(mesh, service))


@dataclass(frozen=True)
class ServiceAuthz:
    """A service's authorization as its proxies enforce it: the inventory's policy, the run-time deny read from
    Consul (with why it is ignored, if it is) and the compiled entries."""

    service: str
    protocol: Protocol
    policy: ServicePolicy
    inputs: InboundInputs
    stored: StoredDeny | None
    problems: tuple[str, ...]  # why the stored deny is ignored (empty: it applies, or none is stored)
    config: AuthzConfig

    @property
    def override(self) -> AuthzOverride | None:
        """The run-time deny that applies, or None."""
        if self.stored is None or self.problems or self.stored.override is None or not self.stored.override.deny_from:
            return None
        return self.stored.override

    @property
    def permissive(self) -> bool:
        return self.policy.mtls == "permissive"


def service_authz(mesh: Mesh, service: str, stored: StoredDeny | None) -> ServiceAuthz:
    """The authorization of `service` (which the inventory must have)."""
    problems = tuple(usable_problems(stored, mesh)) if stored is not None else ()
    override = stored.override if stored is not None and not problems else None
    inputs = inbound_inputs(mesh, service)
    policy = mesh.policy(service)
    return ServiceAuthz(service, inputs.protocol, policy, inputs, stored, problems,
                        compile_authz(inputs, policy, override))


def every_service_authz(mesh: Mesh, stored: Mapping[str, StoredDeny]) -> dict[str, ServiceAuthz]:
    return {service: service_authz(mesh, service, stored.get(service)) for service in sorted(mesh.services)}


@dataclass(frozen=True)
class Answer:
    """The decision for one request to one service, and the deciding rule (and shadow rules) in words."""

    decision: AuthzDecision
    rule_text: str
    would_deny: tuple[tuple[str, str], ...]  # (shadow entry, its text)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def answer(authz: ServiceAuthz, request: AuthzRequest) -> Answer:
    """decide() on the service's entries; a plaintext request to a strict service never reaches them."""
    if request.source is None and not authz.permissive:
        decision = AuthzDecision(False, STRICT_RULE)
    else:
        decision = decide(authz.config, request)
    plaintext = request.source is None
    return Answer(decision, explain(authz, decision.rule, request.source, plaintext),
                  tuple((name, explain(authz, name, request.source, plaintext)) for name in decision.would_deny))


def explain(authz: ServiceAuthz, rule: str, source: str | None = None, plaintext: bool = False) -> str:
    """A rule's name with what it says for a request from `source` (an id; `plaintext`: a plaintext client):
    `deny[0] {from: [web], paths: [/admin/*]}`, `default (declared: web lists api in its upstreams)`,
    `runtime-deny (mesh authz deny, set by X at T)`."""
    numbered = _NUMBERED.fullmatch(rule)
    if numbered is not None:
        rules = authz.policy.authz.allow if numbered.group(1) == "allow" else authz.policy.authz.deny
        index = int(numbered.group(2))
        return f"{rule} {rule_text(rules[index])}" if index < len(rules) else rule
    if rule == "runtime-deny":
        stored = authz.stored
        who = f", set by {stored.set_by}" if stored is not None and stored.set_by else ""
        when = f" at {stored.at}" if stored is not None and stored.at else ""
        return f"runtime-deny (mesh authz deny{who}{when})"
    if rule == "default":
        return f"default ({default_text(authz, source, plaintext)})"
    if rule == STRICT_RULE:
        return f"{STRICT_RULE} ({authz.service} accepts only mTLS: a plaintext client fails the handshake)"
    if rule == "none":
        naming = [f"allow[{index}]" for index, item in enumerate(authz.policy.authz.allow)
                  if any(source_id(authz.inputs.trust_domain, named) == source for named in item.sources)]
        if source is not None and naming:
            return (f"none (no allow rule matches; {', '.join(naming)} name{'s' if len(naming) == 1 else ''} "
                    "this source, so the default does not cover it)")
        return "none (no allow rule matches)"
    return rule


def default_text(authz: ServiceAuthz, source: str | None = None, plaintext_request: bool = False) -> str:
    """What the mesh's default allows for this service, in words (for `source` when it is named, or for a
    plaintext client)."""
    default = authz.inputs.authz_default
    plaintext = "; permissive: plaintext clients too" if authz.permissive else ""
    if plaintext_request and authz.permissive:
        return f"{default}; permissive: plaintext clients are allowed"
    if default == "declared":
        trust = f"spiffe://{authz.inputs.trust_domain}/svc/"
        caller = source[len(trust):] if source is not None and source.startswith(trust) else None
        service = authz.service
        if caller is not None and caller in authz.inputs.callers:
            return f"declared: {caller} lists {service} in its upstreams{plaintext}"
        callers = authz.inputs.callers
        if not callers:
            return f"declared: no service lists {service} in its upstreams{plaintext}"
        if len(callers) == 1:
            return f"declared: {callers[0]} lists {service} in its upstreams{plaintext}"
        return f"declared: {', '.join(callers)} list {service} in their upstreams{plaintext}"
    if default == "allow":
        return f"allow: every workload of {authz.inputs.trust_domain}{plaintext}"
    return f"deny: only allow rules{plaintext}"


# ---- the matrix -------------------------------------------------------------------------------------------


def matrix_sources(mesh: Mesh, authz: Mapping[str, ServiceAuthz]) -> tuple[str, ...]:
    """Every service, and `unauthenticated` when some service is permissive."""
    sources = tuple(sorted(mesh.services))
    return (*sources, UNAUTHENTICATED) if any(item.permissive for item in authz.values()) else sources


def cell(authz: ServiceAuthz, source: str) -> Cell:
    """allow (every request from `source`), deny (none), or partial (some): decide() over probe requests that
    fall on each side of every method, path and header condition of the service's entries."""
    identity = source_id(authz.inputs.trust_domain, source)
    outcomes = {answer(authz, request).allowed for request in probes(authz, identity)}
    if outcomes == {True}:
        return "allow"
    return "deny" if outcomes == {False} else "partial"


def probes(authz: ServiceAuthz, identity: str | None) -> list[AuthzRequest]:
    """Requests from `identity` that together meet and miss every condition of every entry (one connection
    for a TCP service)."""
    if authz.protocol == "tcp":
        return [AuthzRequest(identity)]
    config = authz.config
    entries = [*config.deny, *config.deny_shadow, *config.allow, *(config.allow_shadow or ())]
    named = sorted({method for entry in entries for method in entry.methods})
    methods = [*named, next(method for method in ("GET", *HTTP_METHODS) if method not in named)]
    paths = {"/", "/.mesh-authz-probe"}
    for entry in entries:
        for path in entry.paths:
            paths.add(path.value if path.kind == "exact" else path.value + "x")
            paths.add(path.value.rstrip("/") or "/")
    headers = _header_sets(entries)
    return [AuthzRequest(identity, method, path, header_set)
            for method, path, header_set in itertools.product(methods, sorted(paths), headers)]


def _header_sets(entries: list[AuthzEntry]) -> list[tuple[tuple[str, str], ...]]:
    """No header; each entry's headers; and every header any entry names (first value per name)."""
    sets: list[tuple[tuple[str, str], ...]] = [()]
    everything: dict[str, str] = {}
    for entry in entries:
        if entry.headers and entry.headers not in sets:
            sets.append(entry.headers)
        for name, value in entry.headers:
            everything.setdefault(name, value)
    together = tuple(sorted(everything.items()))
    if together not in sets:
        sets.append(together)
    return sets
