"""The shapes of a service's traffic policy (one value of `mesh_services`) and of a run-time override, validated.

It owns the shapes only: reading them from the inventory (mesh/inventory/services.py), turning them into Envoy
config (mesh/config/traffic.py) and keeping overrides in Consul (mesh/traffic/) live elsewhere. Durations are
milliseconds, percentages are floats in [0, 100], versions are the workloads' `version` labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

LbPolicy = Literal["round_robin", "least_request", "ring_hash", "maglev", "random"]
HashKind = Literal["header", "cookie", "source_ip"]
PathKind = Literal["prefix", "exact", "regex"]
MtlsMode = Literal["strict", "permissive"]
AuthzDefault = Literal["declared", "allow", "deny"]
RuleMode = Literal["enforce", "shadow"]

MTLS_MODES: tuple[MtlsMode, ...] = ("strict", "permissive")
AUTHZ_DEFAULTS: tuple[AuthzDefault, ...] = ("declared", "allow", "deny")
RULE_MODES: tuple[RuleMode, ...] = ("enforce", "shadow")
UNAUTHENTICATED = "unauthenticated"  # the source of a plaintext client (a permissive service's plaintext chain)

LB_POLICIES: tuple[LbPolicy, ...] = ("round_robin", "least_request", "ring_hash", "maglev", "random")
HASHING_POLICIES: tuple[LbPolicy, ...] = ("ring_hash", "maglev")
TCP_LB_POLICIES: tuple[LbPolicy, ...] = ("round_robin", "least_request", "random", "ring_hash")
# Envoy's retry_on (x-envoy-retry-on) and gRPC retry_on (x-envoy-retry-grpc-on) conditions.
HTTP_RETRY_CONDITIONS = ("5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
                         "envoy-ratelimited", "retriable-4xx", "refused-stream", "http3-post-connect-failure")
GRPC_RETRY_CONDITIONS = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")


@dataclass(frozen=True)
class HashOn:
    """What ring_hash and maglev hash: a request header or cookie (by name), or the calling address."""

    kind: HashKind
    name: str | None = None  # header or cookie name; None for source_ip


@dataclass(frozen=True)
class LoadBalancing:
    policy: LbPolicy = "round_robin"
    hash_on: HashOn | None = None  # required for ring_hash and maglev


@dataclass(frozen=True)
class Backoff:
    base_ms: int
    max_ms: int


@dataclass(frozen=True)
class Retries:
    attempts: int  # retries after the first try (Istio's `attempts`, Envoy's num_retries)
    per_try_timeout_ms: int | None = None
    on: tuple[str, ...] = ()  # HTTP_RETRY_CONDITIONS and GRPC_RETRY_CONDITIONS names, in the order written
    backoff: Backoff | None = None


@dataclass(frozen=True)
class CircuitBreaker:
    """Envoy's cluster thresholds (default priority); None leaves Envoy's default."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    retry_budget: float | None = None  # percent of active requests that may be retries


@dataclass(frozen=True)
class OutlierPolicy:
    """Passive ejection of instances that answer errors. The defaults are mesh's own (before any policy)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 2
    interval_ms: int = 1_000
    base_ejection_time_ms: int = 10_000
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class PathMatch:
    kind: PathKind
    value: str  # prefix and exact start with '/'; regex is RE2 (checked by Python's re as a first filter)


@dataclass(frozen=True)
class RouteMatch:
    """Every given condition must hold. Header and cookie values match exactly."""

    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value)
    cookies: tuple[tuple[str, str], ...] = ()
    path: PathMatch | None = None
    method: str | None = None  # upper case


@dataclass(frozen=True)
class RouteRule:
    """One entry of `routes`: first match wins; no match = every request."""

    to: tuple[tuple[str, int], ...]  # (version, weight) in the order written; weights sum to 100
    match: RouteMatch | None = None
    timeout_ms: int | None = None  # overrides the service's
    retries: Retries | None = None  # overrides the service's


@dataclass(frozen=True)
class Mirror:
    to: str  # a version
    percent: float


@dataclass(frozen=True)
class Abort:
    status: int  # an HTTP status 200-599
    percent: float


@dataclass(frozen=True)
class Delay:
    duration_ms: int
    percent: float


@dataclass(frozen=True)
class Fault:
    """Injected by the caller's Envoy; with when_headers only into requests carrying all of them (exact values)."""

    abort: Abort | None = None
    delay: Delay | None = None
    when_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RateLimit:
    """Envoy's local rate limit on each instance's inbound listener (per instance, not fleet-wide): 429 past it."""

    requests_per_second: int
    burst: int  # the token bucket's size; at least requests_per_second


@dataclass(frozen=True)
class AuthzRule:
    """One allow or deny rule of `authz`: it matches a request when each given condition holds."""

    sources: tuple[str, ...] = ()  # `from`: service names, SPIFFE ids, `unauthenticated`; () = any source
    methods: tuple[str, ...] = ()  # upper case; () = any (HTTP only)
    paths: tuple[PathMatch, ...] = ()  # exact or prefix ("/x/*" is prefix "/x/"); () = any (HTTP only)
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value); HTTP only
    mode: RuleMode = "enforce"  # shadow: only logged, never enforced

    @property
    def unconditional(self) -> bool:
        """True when it matches every request of the sources it names (no method, path or header)."""
        return not (self.methods or self.paths or self.headers)


@dataclass(frozen=True)
class AuthzRules:
    """A service's `authz`: deny rules win over allow rules; the mesh's default applies to what no allow names."""

    allow: tuple[AuthzRule, ...] = ()
    deny: tuple[AuthzRule, ...] = ()


@dataclass(frozen=True)
class ServicePolicy:
    """One service's policy; the empty policy is mesh's behaviour without one (round robin over every instance,
    the default retries and outlier detection, no routes)."""

    lb: LoadBalancing = LoadBalancing()
    timeout_ms: int | None = None
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierPolicy = OutlierPolicy()
    routes: tuple[RouteRule, ...] = ()
    mirror: Mirror | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    mtls: MtlsMode = "strict"  # permissive: plaintext clients are accepted too, as `unauthenticated`
    authz: AuthzRules = AuthzRules()


NO_POLICY = ServicePolicy()


@dataclass(frozen=True)
class TrafficOverride:
    """A run-time change to one service's routing (Consul KV, `mesh route set`, `mesh fault set`): it wins over
    the inventory until `mesh route reset`."""

    split: tuple[tuple[str, int], ...] | None = None  # the catch-all route's `to`
    fault: Fault | None = None
    revision: str = ""  # set by whoever wrote it; the controller reports the revision it applied

    @property
    def empty(self) -> bool:
        return self.split is None and self.fault is None


@dataclass(frozen=True)
class AuthzOverride:
    """A run-time deny (Consul KV, `mesh authz deny`): these sources may not call the service until `--undo`."""

    deny_from: tuple[str, ...] = ()  # service names or SPIFFE ids, sorted, unique
    revision: str = ""


def apply_override(policy: ServicePolicy, override: TrafficOverride | None) -> ServicePolicy:
    """The effective policy: the override's split replaces the `to` of the catch-all route (the last route when it
    has no match; appended when there is none), its fault replaces the service's fault. Pure."""
    if override is None:
        return policy
    routes = policy.routes
    if override.split is not None:
        if routes and routes[-1].match is None:
            routes = (*routes[:-1], replace(routes[-1], to=override.split))
        else:
            routes = (*routes, RouteRule(to=override.split))
    fault = override.fault if override.fault is not None else policy.fault
    return replace(policy, routes=routes, fault=fault)
