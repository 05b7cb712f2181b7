"""Reads `mesh_services` (one traffic policy per service) into ServicePolicy values, and writes and reads their
canonical JSON (the controller's spec, and the run-time overrides kept in Consul KV).

One reader per field serves both ways in: the inventory (errors placed at file, line and key, checked against
the services, versions and protocols the inventory runs) and JSON (PolicyError; the same checks when the
service's facts are given). It owns the policy syntax; the shapes are mesh/inventory/policy.py's, single values
are read by mesh/inventory/policy_values.py.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from mesh.errors import InventoryError, MeshError, Origin
from mesh.inventory.authz import (
    SourceScope,
    authz_to_json,
    deny_override_to_json,
    read_authz,
    read_deny_override,
    read_mtls,
)
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import Protocol
from mesh.inventory.policy import (
    GRPC_RETRY_CONDITIONS,
    HASHING_POLICIES,
    HTTP_RETRY_CONDITIONS,
    LB_POLICIES,
    TCP_LB_POLICIES,
    Abort,
    AuthzOverride,
    AuthzRules,
    Backoff,
    CircuitBreaker,
    Delay,
    Fault,
    HashOn,
    LoadBalancing,
    Mirror,
    OutlierPolicy,
    PathMatch,
    RateLimit,
    Retries,
    RouteMatch,
    RouteRule,
    ServicePolicy,
    TrafficOverride,
)
from mesh.inventory.policy_reading import MISSING, read_pairs, read_value
from mesh.inventory.policy_reading import Missing as _Missing
from mesh.inventory.policy_reading import mapping as _mapping
from mesh.inventory.policy_values import (
    check_cookie_name,
    check_cookie_value,
    check_header_name,
    check_header_value,
    check_method,
    check_path,
    check_regex,
    millis_text,
    parse_count,
    parse_millis,
    parse_percent,
    percent_json,
)
from mesh.inventory.values import BadValue, check_dns_label, check_version, describe
from mesh.suggest import did_you_mean

T = TypeVar("T")

SERVICES_KEY = "mesh_services"
POLICY_KEYS = ("lb", "timeout", "retries", "circuit_breaker", "outlier_detection", "routes", "mirror", "fault",
               "rate_limit", "mtls", "authz")
LB_KEYS = ("policy", "hash_on")
HASH_KINDS = ("header", "cookie", "source_ip")
RETRY_KEYS = ("attempts", "per_try_timeout", "on", "backoff")
BACKOFF_KEYS = ("base", "max")
BREAKER_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries", "retry_budget")
OUTLIER_KEYS = ("consecutive_5xx", "consecutive_gateway_failure", "interval", "base_ejection_time",
                "max_ejection_percent")
ROUTE_KEYS = ("match", "to", "timeout", "retries")
MATCH_KEYS = ("headers", "cookies", "path", "method")
PATH_KINDS = ("prefix", "exact", "regex")
MIRROR_KEYS = ("to", "percent")
FAULT_KEYS = ("abort", "delay", "when_headers")
ABORT_KEYS = ("status", "percent")
DELAY_KEYS = ("duration", "percent")
RATE_KEYS = ("requests_per_second", "burst")
OVERRIDE_KEYS = ("split", "fault", "revision", "set_by", "at")
RETRY_CONDITIONS = HTTP_RETRY_CONDITIONS + GRPC_RETRY_CONDITIONS
MAX_ATTEMPTS = 100
MAX_RATE = 1_000_000_000

# Why a TCP service refuses a field: each is about HTTP requests.
TCP_REFUSED = {
    "timeout": "a TCP connection has no requests to time out",
    "retries": "TCP connections carry no requests to retry",
    "routes": "routes match HTTP requests",
    "mirror": "mirroring copies HTTP requests",
    "fault": "faults are injected into HTTP requests",
    "rate_limit": "the rate limit is Envoy's HTTP local rate limit (requests per second)",
}
TCP_LB = ("TCP services take round_robin, least_request, random, or ring_hash with hash_on: source_ip "
          "(affinity per calling instance)")


class PolicyError(MeshError):
    """A policy or override in JSON (the controller's spec, Consul KV) that is not valid; the message lists every
    problem."""

    def __init__(self, problems: list[str], what: str = "traffic policy") -> None:
        super().__init__(f"invalid {what}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServiceFacts:
    """What the inventory says about a service, which a policy is checked against."""

    service: str
    versions: tuple[str, ...]  # sorted
    protocol: Protocol | None = None  # None: unknown (its instances disagree, or none could be read)
    trust_domain: str | None = None  # what a rule's SPIFFE ids must be in; None: not checked
    services: tuple[str, ...] | None = None  # the services a rule may name; None: not checked

    @property
    def tcp(self) -> bool:
        return self.protocol == "tcp"


# --- the inventory ---------------------------------------------------------------------------------------------

def read_services(where: Located, facts: Mapping[str, ServiceFacts], written: set[str],
                  problems: Problems, trust_domain: str | None = None) -> dict[str, ServicePolicy]:
    """The policies of `mesh_services` (an unset or empty mapping: none). facts: the services the inventory
    runs, by name; written: every service name some workload writes (even one with errors elsewhere), so that a
    mistake there is reported once; trust_domain: what the SPIFFE ids of authz rules must be in."""
    if where.value is None:
        return {}
    if not isinstance(where.value, dict):
        hint = ("in INI a [vars] value is always a string: set mesh_services in group_vars/all.yml"
                if isinstance(where.value, str) else None)
        problems.at(where, f"expected a mapping from service name to its policy, got {describe(where.value)}", hint)
        return {}
    known = sorted(set(facts) | written)
    policies: dict[str, ServicePolicy] = {}
    for name in where.value:
        spot = where.child(name)
        if problems.read(Located(name, where.key_origin(name), spot.key), check_dns_label) is None:
            continue
        service_facts = facts.get(name)
        if service_facts is not None:
            service_facts = replace(service_facts, trust_domain=trust_domain, services=tuple(known))
        if name not in written and service_facts is None:
            problems.add_error(where, name, f"no host runs the service {name!r}; known services: "
                                            f"{', '.join(known) or 'none'}", did_you_mean(name, known))
        policy = read_policy(spot, service_facts, problems)
        if policy is not None and service_facts is not None:
            policies[name] = policy
    return policies


def read_policy(where: Located, facts: ServiceFacts | None, problems: Problems) -> ServicePolicy | None:
    """One service's policy (None, as YAML reads `api:` alone, is the empty policy); None after recording its
    problems. facts None: only the policy's own rules are checked (no versions, no protocol)."""
    if where.value is None:
        return ServicePolicy()
    count = len(problems.errors)
    if not _mapping(where, POLICY_KEYS, "service policy", problems, "{lb: ..., timeout: ..., routes: [...], ...}"):
        return None
    reader = _Reader(facts, problems)
    values = where.value
    if facts is not None and facts.tcp:
        for key, why in TCP_REFUSED.items():
            if key in values:
                problems.add_error(where, key, f"{facts.service} is a TCP service (protocol tcp): {why}")
    policy = ServicePolicy(
        lb=_optional(where, "lb", reader.lb, LoadBalancing()),
        timeout_ms=_optional(where, "timeout", reader.millis, None),
        retries=_optional(where, "retries", reader.retries, None),
        circuit_breaker=_optional(where, "circuit_breaker", reader.circuit_breaker, None),
        outlier_detection=_optional(where, "outlier_detection", reader.outlier, OutlierPolicy()),
        routes=_optional(where, "routes", reader.routes, ()),
        mirror=_optional(where, "mirror", reader.mirror, None),
        fault=_optional(where, "fault", reader.fault, None),
        rate_limit=_optional(where, "rate_limit", reader.rate_limit, None),
        mtls=_optional(where, "mtls", lambda spot: read_mtls(spot, problems), "strict"),
        authz=_optional(where, "authz", lambda spot: read_authz(spot, _scope(facts), problems), AuthzRules()),
    )
    return policy if len(problems.errors) == count else None


def _optional(where: Located, key: str, reader: Callable[[Located], T | _Missing], default: T) -> T:
    """reader(where.key) when written, else default. A value that could not be read gives the default too (the
    caller sees the recorded problem and drops the whole policy)."""
    if key not in where.value:
        return default
    value = reader(where.child(key))
    return default if isinstance(value, _Missing) else value


def _scope(facts: ServiceFacts | None) -> SourceScope:
    """What a service's authz rules are checked against."""
    if facts is None:
        return SourceScope()
    return SourceScope(facts.service, facts.tcp, facts.trust_domain, facts.services)


def _yaml_on(where: Located) -> Located:
    """A retries mapping whose key `on` YAML 1.1 (and so Ansible) read as the boolean true, with `on` back."""
    values = {("on" if key is True else key): value for key, value in where.value.items()}
    marks = where.marks
    if marks is not None and isinstance(marks.items, dict):
        items = {("on" if key is True else key): value for key, value in marks.items.items()}
        origins = {("on" if key is True else key): value for key, value in (marks.key_origins or {}).items()}
        marks = replace(marks, items=items, key_origins=origins)
    return Located(values, where.origin, where.key, marks)


class _Reader:
    """The readers of a policy's fields; each records its problems and returns MISSING when it cannot read."""

    def __init__(self, facts: ServiceFacts | None, problems: Problems) -> None:
        self.facts = facts
        self.problems = problems

    def value(self, where: Located, parse: Callable[[Any], T]) -> T | _Missing:
        return read_value(where, parse, self.problems)

    def millis(self, where: Located) -> int | _Missing:
        return self.value(where, parse_millis)

    def percent(self, where: Located) -> float | _Missing:
        return self.value(where, parse_percent)

    def count(self, where: Located, low: int = 0, high: int | None = None) -> int | _Missing:
        raw = getattr(where.marks, "raw", None)
        if isinstance(where.value, int) and not isinstance(where.value, bool) and raw and raw.strip() != str(where.value):
            self.problems.at(where, f"YAML 1.1 reads {raw.strip()!r} as {where.value}; write the integer in plain "
                                    "decimal")
            return MISSING
        return self.value(where, lambda v: parse_count(v, low) if high is None else parse_count(v, low, high))

    # -- lb --
    def lb(self, where: Located) -> LoadBalancing | _Missing:
        if not _mapping(where, LB_KEYS, "load balancing", self.problems, "{policy: least_request}"):
            return MISSING
        policy = "round_robin"
        if "policy" in where.value:
            spot = where.child("policy")
            if spot.value not in LB_POLICIES:
                self.problems.at(spot, f"expected one of {', '.join(LB_POLICIES)}, got {describe(spot.value)}",
                                 did_you_mean(str(spot.value), LB_POLICIES))
                return MISSING
            policy = spot.value
        tcp = self.facts is not None and self.facts.tcp
        if tcp and policy not in TCP_LB_POLICIES:
            self.problems.at(where.child("policy"), f"{self._service} is a TCP service: {TCP_LB}")
            return MISSING
        hash_on = self.hash_on(where.child("hash_on")) if "hash_on" in where.value else None
        if isinstance(hash_on, _Missing):
            return MISSING
        if policy in HASHING_POLICIES and hash_on is None:
            self.problems.at(where, f"{policy} needs hash_on: {{header: NAME}}, {{cookie: NAME}} or source_ip")
            return MISSING
        if policy not in HASHING_POLICIES and hash_on is not None:
            self.problems.at(where.child("hash_on"), f"hash_on is for ring_hash and maglev, not {policy}")
            return MISSING
        if tcp and hash_on is not None and hash_on.kind != "source_ip":
            self.problems.at(where.child("hash_on"), f"{self._service} is a TCP service: a connection has no "
                                                     f"headers or cookies; hash on source_ip (affinity per calling "
                                                     "instance)")
            return MISSING
        return LoadBalancing(policy=cast(Any, policy), hash_on=hash_on)

    @property
    def _service(self) -> str:
        return self.facts.service if self.facts is not None else "the service"

    def hash_on(self, where: Located) -> HashOn | _Missing:
        expected = "{header: NAME}, {cookie: NAME} or source_ip"
        if where.value == "source_ip":
            return HashOn("source_ip")
        if not isinstance(where.value, dict) or len(where.value) != 1:
            hint = did_you_mean(where.value, HASH_KINDS) if isinstance(where.value, str) else None
            self.problems.at(where, f"expected {expected}, got {describe(where.value)}", hint)
            return MISSING
        kind = next(iter(where.value))
        if kind not in ("header", "cookie"):
            self.problems.add_error(where, kind, f"expected {expected}", did_you_mean(str(kind), HASH_KINDS))
            return MISSING
        name = self.value(where.child(kind), check_header_name if kind == "header" else check_cookie_name)
        return MISSING if isinstance(name, _Missing) else HashOn(cast(Any, kind), name)

    # -- retries --
    def retries(self, where: Located) -> Retries | _Missing:
        if isinstance(where.value, dict) and True in where.value and "on" not in where.value:
            where = _yaml_on(where)
        if not _mapping(where, RETRY_KEYS, "retries", self.problems, "{attempts: 3, per_try_timeout: 500ms}"):
            return MISSING
        if "attempts" not in where.value:
            self.problems.at(where, "retries need `attempts`: how many times a failed request is tried again")
            return MISSING
        attempts = self.count(where.child("attempts"), 0, MAX_ATTEMPTS)
        per_try = self.millis(where.child("per_try_timeout")) if "per_try_timeout" in where.value else None
        on = self.conditions(where.child("on")) if "on" in where.value else ()
        backoff = self.backoff(where.child("backoff")) if "backoff" in where.value else None
        if any(isinstance(part, _Missing) for part in (attempts, per_try, on, backoff)):
            return MISSING
        return Retries(cast(int, attempts), cast(Any, per_try), cast(Any, on), cast(Any, backoff))

    def conditions(self, where: Located) -> tuple[str, ...] | _Missing:
        """A list of retry conditions, or one string of them separated by ',' (as Istio and Envoy write it)."""
        value = where.value
        items: list[tuple[Any, Located]]
        if isinstance(value, str):
            items = [(part.strip(), where) for part in value.split(",")]
        elif isinstance(value, list):
            items = [(where.value[index], where.child(index)) for index in range(len(value))]
        else:
            self.problems.at(where, f"expected a list of retry conditions such as [5xx, reset, connect-failure], "
                                    f"got {describe(value)}")
            return MISSING
        found: list[str] = []
        ok = True
        for item, spot in items:
            if item not in RETRY_CONDITIONS:
                self.problems.at(spot, f"expected a retry condition ({', '.join(RETRY_CONDITIONS)}), got "
                                       f"{describe(item)}", did_you_mean(str(item), RETRY_CONDITIONS))
                ok = False
            elif item in found:
                self.problems.at(spot, f"the retry condition {item!r} is written twice")
                ok = False
            else:
                found.append(item)
        if ok and not found:
            self.problems.at(where, "expected at least one retry condition")
            ok = False
        return tuple(found) if ok else MISSING

    def backoff(self, where: Located) -> Backoff | _Missing:
        if not _mapping(where, BACKOFF_KEYS, "retry backoff", self.problems, "{base: 25ms, max: 250ms}"):
            return MISSING
        if "base" not in where.value:
            self.problems.at(where, "a backoff needs `base`: the first wait between tries (max defaults to 10 times "
                                    "base, as in Envoy)")
            return MISSING
        base = self.millis(where.child("base"))
        if isinstance(base, _Missing):
            return MISSING
        most = self.millis(where.child("max")) if "max" in where.value else min(10 * base, 86_400_000)
        if isinstance(most, _Missing):
            return MISSING
        if most < base:
            self.problems.at(where.child("max"), f"expected max to be at least base ({millis_text(base)}), got "
                                                 f"{where.value['max']!r}")
            return MISSING
        return Backoff(base, most)

    # -- circuit breaker and outlier detection --
    def circuit_breaker(self, where: Located) -> CircuitBreaker | _Missing:
        if not _mapping(where, BREAKER_KEYS, "circuit breaker", self.problems, "{max_connections: 1000}"):
            return MISSING
        counts = {key: self.count(where.child(key), 1) if key in where.value else None for key in BREAKER_KEYS[:-1]}
        budget = self.percent(where.child("retry_budget")) if "retry_budget" in where.value else None
        if any(isinstance(value, _Missing) for value in (*counts.values(), budget)):
            return MISSING
        return CircuitBreaker(**cast(Any, counts), retry_budget=cast(Any, budget))

    def outlier(self, where: Located) -> OutlierPolicy | _Missing:
        if not _mapping(where, OUTLIER_KEYS, "outlier detection", self.problems, "{consecutive_5xx: 5, interval: 10s}"):
            return MISSING
        default = OutlierPolicy()
        readers: dict[str, Callable[[Located], Any]] = {
            "consecutive_5xx": lambda spot: self.count(spot, 1),
            "consecutive_gateway_failure": lambda spot: self.count(spot, 1),
            "interval": self.millis,
            "base_ejection_time": self.millis,
            "max_ejection_percent": self.whole_percent,
        }
        names = {"interval": "interval_ms", "base_ejection_time": "base_ejection_time_ms"}
        read = {names.get(key, key): reader(where.child(key)) if key in where.value else getattr(
            default, names.get(key, key)) for key, reader in readers.items()}
        if any(isinstance(value, _Missing) for value in read.values()):
            return MISSING
        return OutlierPolicy(**read)

    def whole_percent(self, where: Located) -> int | _Missing:
        percent = self.percent(where)
        if isinstance(percent, _Missing):
            return MISSING
        if percent != int(percent):
            self.problems.at(where, f"expected a whole percentage from 0 to 100, got {describe(where.value)}")
            return MISSING
        return int(percent)

    # -- routes --
    def routes(self, where: Located) -> tuple[RouteRule, ...] | _Missing:
        if not isinstance(where.value, list):
            self.problems.at(where, f"expected a list of routes such as [{{match: {{headers: {{x-canary: '1'}}}}, "
                                    f"to: {{v2: 100}}}}, {{to: {{v1: 100}}}}], got {describe(where.value)}")
            return MISSING
        rules = [self.route(where.child(index)) for index in range(len(where.value))]
        if any(isinstance(rule, _Missing) for rule in rules):
            return MISSING
        return tuple(cast(list[RouteRule], rules))

    def route(self, where: Located) -> RouteRule | _Missing:
        if not _mapping(where, ROUTE_KEYS, "route", self.problems, "{match: {...}, to: {v1: 90, v2: 10}}"):
            return MISSING
        if "to" not in where.value:
            self.problems.at(where, "a route needs `to`: the versions it sends to and their weights, such as "
                                    "{v1: 90, v2: 10}")
            return MISSING
        match = self.match(where.child("match")) if "match" in where.value else None
        to = self.split(where.child("to"))
        timeout = self.millis(where.child("timeout")) if "timeout" in where.value else None
        retries = self.retries(where.child("retries")) if "retries" in where.value else None
        if any(isinstance(part, _Missing) for part in (match, to, timeout, retries)):
            return MISSING
        return RouteRule(cast(Any, to), cast(Any, match), cast(Any, timeout), cast(Any, retries))

    def split(self, where: Located) -> tuple[tuple[str, int], ...] | _Missing:
        """`{version: weight}`: versions the service runs, integer weights 0-100 that sum to 100."""
        if not isinstance(where.value, dict) or not where.value:
            self.problems.at(where, f"expected versions and their weights such as {{v1: 90, v2: 10}}, got "
                                    f"{describe(where.value)}")
            return MISSING
        found: list[tuple[str, int]] = []
        ok = True
        for version in where.value:
            weight = self.count(where.child(version), 0, 100)
            known = self.version(Located(version, where.key_origin(version), where.child(version).key), version)
            if isinstance(weight, _Missing) or known is None:
                ok = False
                continue
            found.append((known, weight))
        total = sum(weight for _, weight in found)
        if ok and total != 100:
            terms = f" ({' + '.join(str(weight) for _, weight in found)})" if len(found) > 1 else ""
            self.problems.at(where, f"expected weights that sum to 100, got {total}{terms}")
            ok = False
        return tuple(found) if ok else MISSING

    def version(self, where: Located, version: Any) -> str | None:
        """version (written at where) when the service runs it; without facts, when it is a version label."""
        try:
            check_version(version)
        except BadValue as exc:
            self.problems.at(where, str(exc))
            return None
        if self.facts is not None and version not in self.facts.versions:
            self.problems.at(where, f"no instance of {self.facts.service} runs version {version!r}; its versions: "
                                    f"{', '.join(self.facts.versions)}", did_you_mean(version, self.facts.versions))
            return None
        return cast(str, version)

    def match(self, where: Located) -> RouteMatch | None | _Missing:
        if not _mapping(where, MATCH_KEYS, "route match", self.problems,
                        "{headers: {x-canary: '1'}, path: {prefix: /api}}"):
            return MISSING
        headers = self.pairs(where.child("headers"), check_header_name, check_header_value, "headers") \
            if "headers" in where.value else ()
        cookies = self.pairs(where.child("cookies"), check_cookie_name, check_cookie_value, "cookies") \
            if "cookies" in where.value else ()
        path = self.path(where.child("path")) if "path" in where.value else None
        method = self.value(where.child("method"), check_method) if "method" in where.value else None
        if any(isinstance(part, _Missing) for part in (headers, cookies, path, method)):
            return MISSING
        match = RouteMatch(cast(Any, headers), cast(Any, cookies), cast(Any, path), cast(Any, method))
        return None if match == RouteMatch() else match

    def pairs(self, where: Located, name: Callable[[Any], str], value: Callable[[Any], str],
              what: str) -> tuple[tuple[str, str], ...] | _Missing:
        return read_pairs(where, name, value, what, self.problems)

    def path(self, where: Located) -> PathMatch | _Missing:
        expected = "{prefix: /api}, {exact: /api/orders} or {regex: '/api/v[0-9]+/.*'}"
        if not isinstance(where.value, dict) or len(where.value) != 1:
            self.problems.at(where, f"expected one of {expected}, got {describe(where.value)}")
            return MISSING
        kind = next(iter(where.value))
        if kind not in PATH_KINDS:
            self.problems.add_error(where, kind, f"expected one of {expected}", did_you_mean(str(kind), PATH_KINDS))
            return MISSING
        value = self.value(where.child(kind), check_regex if kind == "regex" else check_path)
        return MISSING if isinstance(value, _Missing) else PathMatch(cast(Any, kind), value)

    # -- mirror, fault, rate limit --
    def mirror(self, where: Located) -> Mirror | _Missing:
        if not _mapping(where, MIRROR_KEYS, "mirror", self.problems, "{to: v2, percent: 5}"):
            return MISSING
        if "to" not in where.value:
            self.problems.at(where, "a mirror needs `to`: the version that gets the copies")
            return MISSING
        version = self.version(where.child("to"), where.value["to"])
        percent = self.percent(where.child("percent")) if "percent" in where.value else 100.0
        if version is None or isinstance(percent, _Missing):
            return MISSING
        return Mirror(version, percent)

    def fault(self, where: Located) -> Fault | _Missing:
        if not _mapping(where, FAULT_KEYS, "fault", self.problems, "{abort: {status: 503, percent: 50}}"):
            return MISSING
        if "abort" not in where.value and "delay" not in where.value:
            self.problems.at(where, "a fault needs abort, delay or both")
            return MISSING
        abort = self.abort(where.child("abort")) if "abort" in where.value else None
        delay = self.delay(where.child("delay")) if "delay" in where.value else None
        headers = self.pairs(where.child("when_headers"), check_header_name, check_header_value, "headers") \
            if "when_headers" in where.value else ()
        if any(isinstance(part, _Missing) for part in (abort, delay, headers)):
            return MISSING
        return Fault(cast(Any, abort), cast(Any, delay), cast(Any, headers))

    def abort(self, where: Located) -> Abort | _Missing:
        if not _mapping(where, ABORT_KEYS, "abort", self.problems, "{status: 503, percent: 50}"):
            return MISSING
        if "status" not in where.value:
            self.problems.at(where, "an abort needs `status`: the HTTP status the caller gets (200-599)")
            return MISSING
        status = self.count(where.child("status"), 200, 599)
        percent = self.percent(where.child("percent")) if "percent" in where.value else 100.0
        if isinstance(status, _Missing) or isinstance(percent, _Missing):
            return MISSING
        return Abort(status, percent)

    def delay(self, where: Located) -> Delay | _Missing:
        if not _mapping(where, DELAY_KEYS, "delay", self.problems, "{duration: 2s, percent: 10}"):
            return MISSING
        if "duration" not in where.value:
            self.problems.at(where, "a delay needs `duration`, such as 2s")
            return MISSING
        duration = self.millis(where.child("duration"))
        percent = self.percent(where.child("percent")) if "percent" in where.value else 100.0
        if isinstance(duration, _Missing) or isinstance(percent, _Missing):
            return MISSING
        return Delay(duration, percent)

    def rate_limit(self, where: Located) -> RateLimit | _Missing:
        if not _mapping(where, RATE_KEYS, "rate limit", self.problems, "{requests_per_second: 100, burst: 200}"):
            return MISSING
        if "requests_per_second" not in where.value:
            self.problems.at(where, "a rate limit needs `requests_per_second` (per instance)")
            return MISSING
        rate = self.count(where.child("requests_per_second"), 1, MAX_RATE)
        if isinstance(rate, _Missing):
            return MISSING
        burst = self.count(where.child("burst"), 1, MAX_RATE) if "burst" in where.value else rate
        if isinstance(burst, _Missing):
            return MISSING
        if burst < rate:
            self.problems.at(where.child("burst"), f"expected a burst of at least requests_per_second ({rate}), "
                                                   f"got {burst}")
            return MISSING
        return RateLimit(rate, burst)


# --- canonical JSON --------------------------------------------------------------------------------------------

JSON_ORIGIN = Origin("<json>")


def policy_to_json(policy: ServicePolicy) -> dict[str, Any]:
    """The policy in the inventory's syntax, only the fields that differ from the empty policy; durations as
    "<n>ms", percentages as numbers. policy_from_json reads it back to an equal policy."""
    out: dict[str, Any] = {}
    if policy.lb != LoadBalancing():
        out["lb"] = _lb_json(policy.lb)
    if policy.timeout_ms is not None:
        out["timeout"] = millis_text(policy.timeout_ms)
    if policy.retries is not None:
        out["retries"] = _retries_json(policy.retries)
    if policy.circuit_breaker is not None:
        breaker = policy.circuit_breaker
        out["circuit_breaker"] = {key: getattr(breaker, key) for key in BREAKER_KEYS[:-1]
                                  if getattr(breaker, key) is not None}
        if breaker.retry_budget is not None:
            out["circuit_breaker"]["retry_budget"] = percent_json(breaker.retry_budget)
    if policy.outlier_detection != OutlierPolicy():
        outlier = policy.outlier_detection
        out["outlier_detection"] = {
            "consecutive_5xx": outlier.consecutive_5xx, "consecutive_gateway_failure": outlier.consecutive_gateway_failure,
            "interval": millis_text(outlier.interval_ms), "base_ejection_time": millis_text(outlier.base_ejection_time_ms),
            "max_ejection_percent": outlier.max_ejection_percent}
    if policy.routes:
        out["routes"] = [_route_json(rule) for rule in policy.routes]
    if policy.mirror is not None:
        out["mirror"] = {"to": policy.mirror.to, "percent": percent_json(policy.mirror.percent)}
    if policy.fault is not None:
        out["fault"] = fault_to_json(policy.fault)
    if policy.rate_limit is not None:
        out["rate_limit"] = {"requests_per_second": policy.rate_limit.requests_per_second,
                             "burst": policy.rate_limit.burst}
    if policy.mtls != "strict":
        out["mtls"] = policy.mtls
    if policy.authz != AuthzRules():
        out["authz"] = authz_to_json(policy.authz)
    return out


def _lb_json(lb: LoadBalancing) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": lb.policy}
    if lb.hash_on is not None:
        out["hash_on"] = "source_ip" if lb.hash_on.kind == "source_ip" else {lb.hash_on.kind: lb.hash_on.name}
    return out


def _retries_json(retries: Retries) -> dict[str, Any]:
    out: dict[str, Any] = {"attempts": retries.attempts}
    if retries.per_try_timeout_ms is not None:
        out["per_try_timeout"] = millis_text(retries.per_try_timeout_ms)
    if retries.on:
        out["on"] = list(retries.on)
    if retries.backoff is not None:
        out["backoff"] = {"base": millis_text(retries.backoff.base_ms), "max": millis_text(retries.backoff.max_ms)}
    return out


def _route_json(rule: RouteRule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.match is not None:
        match: dict[str, Any] = {}
        if rule.match.headers:
            match["headers"] = dict(rule.match.headers)
        if rule.match.cookies:
            match["cookies"] = dict(rule.match.cookies)
        if rule.match.path is not None:
            match["path"] = {rule.match.path.kind: rule.match.path.value}
        if rule.match.method is not None:
            match["method"] = rule.match.method
        out["match"] = match
    out["to"] = dict(rule.to)
    if rule.timeout_ms is not None:
        out["timeout"] = millis_text(rule.timeout_ms)
    if rule.retries is not None:
        out["retries"] = _retries_json(rule.retries)
    return out


def fault_to_json(fault: Fault) -> dict[str, Any]:
    """A fault in the inventory's syntax (also the `fault` of an override)."""
    out: dict[str, Any] = {}
    if fault.abort is not None:
        out["abort"] = {"status": fault.abort.status, "percent": percent_json(fault.abort.percent)}
    if fault.delay is not None:
        out["delay"] = {"duration": millis_text(fault.delay.duration_ms), "percent": percent_json(fault.delay.percent)}
    if fault.when_headers:
        out["when_headers"] = dict(fault.when_headers)
    return out


def policy_from_json(data: Any, facts: ServiceFacts | None = None) -> ServicePolicy:
    """The policy policy_to_json wrote (or any policy in the inventory's syntax); PolicyError listing every
    problem otherwise. With facts, it is checked against the service's versions and protocol too."""
    problems = Problems()
    policy = read_policy(Located(data, JSON_ORIGIN, "policy"), facts, problems)
    if problems.errors or policy is None:
        raise PolicyError(_messages(problems) or ["not a policy"])
    return policy


def override_to_json(override: TrafficOverride, set_by: str = "", at: str = "") -> dict[str, Any]:
    """The Consul KV value of a run-time override: split and fault (null when not overridden), the revision, and
    who set it when (informational)."""
    return {"split": dict(override.split) if override.split is not None else None,
            "fault": fault_to_json(override.fault) if override.fault is not None else None,
            "revision": override.revision, "set_by": set_by, "at": at}


def override_from_json(data: Any, facts: ServiceFacts | None = None) -> TrafficOverride:
    """The override of a KV value (override_to_json's shape); PolicyError listing every problem otherwise. With
    facts, it is checked against the service's versions and protocol too."""
    problems = Problems()
    override = _read_override(data, facts, problems)
    if problems.errors or override is None:
        raise PolicyError(_messages(problems) or ["not an override"], "traffic override")
    return override


def check_override(override: TrafficOverride, versions: tuple[str, ...], protocol: Protocol | None,
                   service: str = "the service") -> list[str]:
    """What is wrong with an override of a service that runs `versions` with `protocol`, in words (naming
    `service`); empty when it may be applied: the split's versions exist and its weights sum to 100, a fault's
    values are in range, and a TCP service takes neither (both are about HTTP requests)."""
    problems = Problems()
    _read_override(override_to_json(override), ServiceFacts(service, tuple(sorted(versions)), protocol), problems)
    return _messages(problems)


def _read_override(data: Any, facts: ServiceFacts | None, problems: Problems) -> TrafficOverride | None:
    root = Located(data, JSON_ORIGIN, "override")
    if not _mapping(root, OVERRIDE_KEYS, "traffic override", problems, '{"split": {"v1": 90, "v2": 10}}'):
        return None
    reader = _Reader(facts, problems)
    count = len(problems.errors)
    split: Any = None
    fault: Any = None
    for key in ("split", "fault"):
        spot = Located(data.get(key), JSON_ORIGIN, key)
        if spot.value is None:
            continue
        if facts is not None and facts.tcp:
            why = "a split chooses versions for HTTP requests" if key == "split" else TCP_REFUSED["fault"]
            problems.at(spot, f"{facts.service} is a TCP service (protocol tcp): {why}")
            continue
        if key == "split":
            split = reader.split(spot)
        else:
            fault = reader.fault(spot)
    revision = data.get("revision", "")
    for key in ("revision", "set_by", "at"):
        if not isinstance(data.get(key, ""), str):
            problems.at(Located(data[key], JSON_ORIGIN, key), f"expected a string, got {describe(data[key])}")
    if len(problems.errors) != count:
        return None
    return TrafficOverride(split=split, fault=fault, revision=revision)


def _messages(problems: Problems) -> list[str]:
    return [_without_origin(error) for error in problems.errors]


def _without_origin(error: InventoryError) -> str:
    text = f"{error.key}: {error.message}" if error.key else error.message
    return f"{text} ({error.hint})" if error.hint else text



def authz_override_to_json(override: AuthzOverride, set_by: str = "", at: str = "") -> dict[str, Any]:
    """The Consul KV value of a run-time deny (`mesh authz deny`): the sources denied, the revision, and who set
    it when (informational)."""
    return deny_override_to_json(override, set_by, at)


def authz_override_from_json(data: Any) -> AuthzOverride:
    """The run-time deny of a KV value (authz_override_to_json's shape), its sources sorted and unique;
    PolicyError listing every problem otherwise. Only the syntax is checked: check_authz_override checks the
    sources against the inventory."""
    problems = Problems()
    override = read_deny_override(data, problems)
    if problems.errors or override is None:
        raise PolicyError(_messages(problems) or ["not a run-time deny"], "authz override")
    return override


def check_authz_override(override: AuthzOverride, services: Collection[str], trust_domain: str) -> list[str]:
    """What is wrong with a run-time deny, in words; empty when it may be applied: every source is a service
    some host runs, its SPIFFE id in the trust domain, or `unauthenticated`."""
    problems = Problems()
    read_deny_override(authz_override_to_json(override), problems, trust_domain, tuple(services))
    return _messages(problems)
