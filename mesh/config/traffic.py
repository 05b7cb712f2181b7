"""A service's traffic policy as Envoy config: its outbound route, the settings of its clusters, the priorities
of its endpoints for a caller, and the local rate limit of its instances. Pure.

The deploy (compute.py) and the controller (which redoes one outbound route when a run-time override changes)
both call these, so a route rendered by either is the same. It owns the cluster names of versions; it must not
read the inventory's files, Consul or hosts.

Names: `upstream-<svc>` holds every instance of a service; `upstream-<svc>.<version>` the instances of one
version, for a service with two versions or more (a single version's "cluster" is `upstream-<svc>` itself).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mesh.config.model import (
    CircuitBreakerThresholds,
    FaultInjection,
    HashPolicy,
    HeaderMatch,
    LbKind,
    LocalRateLimit,
    OutboundRoute,
    OutboundRouteEntry,
    OutlierDetection,
    PathMatchKind,
    Percent,
    RequestMatch,
    RequestMirror,
    RetryPolicy,
    RouteInputs,
    WeightedCluster,
)
from mesh.inventory.policy import (
    CircuitBreaker,
    Fault,
    LoadBalancing,
    OutlierPolicy,
    RateLimit,
    Retries,
    RouteMatch,
    RouteRule,
    ServicePolicy,
)

__all__ = ["DEFAULT_RETRIES", "RATE_LIMIT_FILL_INTERVAL_MS", "RouteInputs", "circuit_breaker_thresholds",
           "cookie_regex", "endpoint_priority", "fault_injection", "lb_kind", "local_rate_limit",
           "outbound_route", "outlier_detection", "percent", "prioritized", "retry_policy", "upstream_cluster_name",
           "version_cluster_name"]

DEFAULT_RETRY_ON = "connect-failure,refused-stream,reset"
DEFAULT_NUM_RETRIES = 2
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 3
DEFAULT_RETRIES = RetryPolicy(retry_on=DEFAULT_RETRY_ON, num_retries=DEFAULT_NUM_RETRIES,
                              host_selection_retry_max_attempts=HOST_SELECTION_RETRY_MAX_ATTEMPTS)
RATE_LIMIT_FILL_INTERVAL_MS = 1_000
# Envoy's own default: a priority keeps all traffic while 100/140 = 71.4% of its endpoints are healthy, then
# hands the next priority the missing share (written in every upstream assignment, so it is visible).
OVERPROVISIONING_FACTOR = 140
_LB_KINDS: dict[str, LbKind] = {"round_robin": "ROUND_ROBIN", "least_request": "LEAST_REQUEST",
                                "ring_hash": "RING_HASH", "maglev": "MAGLEV", "random": "RANDOM"}
_PATH_KINDS: dict[str, PathMatchKind] = {"prefix": "prefix", "exact": "path", "regex": "safe_regex"}


# --- names ---

def upstream_cluster_name(service: str) -> str:
    """The cluster of every instance of `service`."""
    return f"upstream-{service}"


def version_cluster_name(service: str, version: str, versions: tuple[str, ...]) -> str:
    """The cluster of `service`'s instances at `version`: `upstream-<svc>.<version>` when the service has two
    versions or more (`versions`: all of them), else `upstream-<svc>` (every instance is that version)."""
    if len(versions) < 2:
        return upstream_cluster_name(service)
    return f"{upstream_cluster_name(service)}.{version}"


# --- clusters ---

def lb_kind(lb: LoadBalancing) -> LbKind:
    return _LB_KINDS[lb.policy]


def circuit_breaker_thresholds(breaker: CircuitBreaker | None) -> CircuitBreakerThresholds | None:
    if breaker is None:
        return None
    return CircuitBreakerThresholds(breaker.max_connections, breaker.max_pending_requests, breaker.max_requests,
                                    breaker.max_retries, breaker.retry_budget)


def outlier_detection(policy: OutlierPolicy) -> OutlierDetection:
    return OutlierDetection(policy.consecutive_5xx, policy.consecutive_gateway_failure, policy.interval_ms,
                            policy.base_ejection_time_ms, policy.max_ejection_percent)


# --- endpoints ---

def endpoint_priority(caller_zone: str | None, caller_region: str | None, zone: str | None,
                      region: str | None) -> int:
    """The priority a caller on a host in (caller_zone, caller_region) gives an instance in (zone, region): 0 in
    its zone (and its region, when both say one), 1 in its region, 2 elsewhere; 0 for all when the caller's host
    says neither."""
    if caller_zone is None and caller_region is None:
        return 0
    if caller_zone is not None and zone == caller_zone \
            and (caller_region is None or region is None or region == caller_region):
        return 0
    if caller_region is not None and region == caller_region:
        return 1
    return 2


def prioritized(priorities: Sequence[int]) -> tuple[int, ...]:
    """`priorities` renumbered 0..n-1 in their order (Envoy wants no gap): (1, 2, 1) -> (0, 1, 0)."""
    used = sorted(set(priorities))
    return tuple(used.index(priority) for priority in priorities)


# --- routes ---

def percent(value: float) -> Percent:
    """A percentage as Envoy's FractionalPercent: per hundred when integral, else per million."""
    if float(value).is_integer():
        return Percent(int(value), "HUNDRED")
    return Percent(round(value * 10_000), "MILLION")


def retry_policy(retries: Retries | None) -> RetryPolicy:
    """A route's retry_policy: mesh's default (connection failures and resets, twice) without a policy."""
    if retries is None:
        return DEFAULT_RETRIES
    backoff = retries.backoff
    return RetryPolicy(retry_on=",".join(retries.on) if retries.on else DEFAULT_RETRY_ON,
                       num_retries=retries.attempts,
                       host_selection_retry_max_attempts=HOST_SELECTION_RETRY_MAX_ATTEMPTS,
                       per_try_timeout_ms=retries.per_try_timeout_ms,
                       backoff_base_ms=backoff.base_ms if backoff else None,
                       backoff_max_ms=backoff.max_ms if backoff else None)


def cookie_regex(name: str, value: str) -> str:
    """An RE2 regex that matches a Cookie header holding cookie `name` with exactly `value`, wherever it is among
    the cookies: Envoy matches a header's safe_regex against the whole value (a full match)."""
    return rf"(.*;\s*)?{re.escape(name)}={re.escape(value)}(;.*)?"


def request_match(match: RouteMatch | None) -> RequestMatch:
    if match is None:
        return RequestMatch()
    kind: PathMatchKind = "prefix"
    path = "/"
    if match.path is not None:
        kind, path = _PATH_KINDS[match.path.kind], match.path.value
    headers = [HeaderMatch(name, exact=value) for name, value in match.headers]
    headers += [HeaderMatch("cookie", regex=cookie_regex(name, value)) for name, value in match.cookies]
    if match.method is not None:
        headers.append(HeaderMatch(":method", exact=match.method))
    return RequestMatch(kind, path, tuple(headers))


def fault_injection(fault: Fault | None) -> FaultInjection | None:
    if fault is None or (fault.abort is None and fault.delay is None):
        return None
    abort, delay = fault.abort, fault.delay
    return FaultInjection(abort_status=abort.status if abort else None,
                          abort_percent=percent(abort.percent) if abort else None,
                          delay_ms=delay.duration_ms if delay else None,
                          delay_percent=percent(delay.percent) if delay else None,
                          headers=tuple(HeaderMatch(name, exact=value) for name, value in fault.when_headers))


def _hash_policies(lb: LoadBalancing) -> tuple[HashPolicy, ...]:
    if lb.policy not in ("ring_hash", "maglev") or lb.hash_on is None:
        return ()
    return (HashPolicy(lb.hash_on.kind, lb.hash_on.name),)


def outbound_route(inputs: RouteInputs, policy: ServicePolicy) -> OutboundRoute:
    """The RouteConfiguration of an outbound HTTP listener to `inputs.service` under `policy` (with any override
    already applied: mesh.inventory.policy.apply_override). Its rules in order (first match wins), then a
    catch-all to every instance when the last rule has a match (no request goes unrouted); without rules, one
    route to every instance. Each route carries the timeout, retries, hash policy, mirror and fault."""
    rules = list(policy.routes)
    if not rules or rules[-1].match is not None:
        rules.append(RouteRule(to=()))
    default_timeout = None if inputs.protocol == "http" else 0  # no timeout for streams (http2, grpc)
    mirrors: tuple[RequestMirror, ...] = ()
    if policy.mirror is not None and policy.mirror.percent > 0:
        mirrors = (RequestMirror(version_cluster_name(inputs.service, policy.mirror.to, inputs.versions),
                                 percent(policy.mirror.percent)),)
    fault = fault_injection(policy.fault)
    hashing = _hash_policies(policy.lb)
    routes = []
    for rule in rules:
        timeout = rule.timeout_ms if rule.timeout_ms is not None else policy.timeout_ms
        routes.append(OutboundRouteEntry(
            match=request_match(rule.match),
            clusters=_clusters(inputs, rule),
            retry_policy=retry_policy(rule.retries if rule.retries is not None else policy.retries),
            timeout_ms=timeout if timeout is not None else default_timeout,
            hash_policies=hashing,
            mirrors=mirrors,
            fault=fault,
            request_headers=inputs.request_headers,
        ))
    return OutboundRoute(inputs.route_name, inputs.service, tuple(routes))


def _clusters(inputs: RouteInputs, rule: RouteRule) -> tuple[WeightedCluster, ...]:
    """Where a rule sends: every instance when it names no version, else its versions' clusters by weight
    (versions at 0 left out; one left: a plain cluster)."""
    weighted = [(version, weight) for version, weight in rule.to if weight > 0]
    if not weighted:
        return (WeightedCluster(upstream_cluster_name(inputs.service), 100),)
    merged: dict[str, int] = {}
    for version, weight in weighted:
        name = version_cluster_name(inputs.service, version, inputs.versions)
        merged[name] = merged.get(name, 0) + weight
    return tuple(WeightedCluster(name, weight) for name, weight in merged.items())


# --- the callee's side ---

def local_rate_limit(limit: RateLimit | None) -> LocalRateLimit | None:
    """The token bucket of one instance: `burst` tokens, `requests_per_second` more every second."""
    if limit is None:
        return None
    return LocalRateLimit(max_tokens=limit.burst, tokens_per_fill=limit.requests_per_second,
                          fill_interval_ms=RATE_LIMIT_FILL_INTERVAL_MS)
