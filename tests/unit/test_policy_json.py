"""The canonical JSON of a service policy and of a run-time override (the controller's spec and Consul KV):
every policy round-trips exactly through JSON text, bad data is a PolicyError listing its problems (never a
traceback), and check_override says in words what keeps an override from applying."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.inventory.policy import (
    GRPC_RETRY_CONDITIONS,
    HTTP_RETRY_CONDITIONS,
    NO_POLICY,
    Abort,
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
from mesh.inventory.services import (
    PolicyError,
    ServiceFacts,
    check_override,
    override_from_json,
    override_to_json,
    policy_from_json,
    policy_to_json,
)

VERSIONS = ("v1", "v2", "v3")

millis = st.integers(1, 86_400_000)
percent = st.one_of(st.integers(0, 100).map(float), st.integers(0, 1_000_000).map(lambda n: n / 10_000))
count = st.integers(1, 4_294_967_295)
header = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
header_value = st.from_regex(r"[A-Za-z0-9][ -~]{0,10}[A-Za-z0-9]|[A-Za-z0-9]", fullmatch=True)
cookie_value = st.from_regex(r"[A-Za-z0-9._=-]{1,12}", fullmatch=True)


def unique_pairs(values: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    return st.dictionaries(header, values, max_size=3).map(lambda d: tuple(d.items()))


@st.composite
def splits(draw: st.DrawFn) -> tuple[tuple[str, int], ...]:
    versions = draw(st.lists(st.sampled_from(VERSIONS), min_size=1, max_size=3, unique=True))
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=len(versions) - 1, max_size=len(versions) - 1)))
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
    return tuple(zip(versions, weights, strict=True))


@st.composite
def backoffs(draw: st.DrawFn) -> Backoff:
    base = draw(millis)
    return Backoff(base, draw(st.integers(base, 86_400_000)))


retries = st.builds(Retries, st.integers(0, 100), st.none() | millis,
                    st.lists(st.sampled_from(HTTP_RETRY_CONDITIONS + GRPC_RETRY_CONDITIONS), unique=True,
                             max_size=4).map(tuple),
                    st.none() | backoffs())
lbs = st.one_of(
    st.sampled_from(["round_robin", "least_request", "random"]).map(LoadBalancing),
    st.builds(LoadBalancing, st.sampled_from(["ring_hash", "maglev"]),
              st.one_of(st.just(HashOn("source_ip")), st.builds(HashOn, st.just("header"), header),
                        st.builds(HashOn, st.just("cookie"), st.from_regex(r"[A-Za-z0-9_]{1,10}", fullmatch=True)))),
)
paths = st.one_of(
    st.builds(PathMatch, st.sampled_from(["prefix", "exact"]), st.from_regex(r"/[a-z0-9/._-]{0,20}", fullmatch=True)),
    st.builds(PathMatch, st.just("regex"), st.sampled_from(["/api/v[0-9]+", "^/a(b|c)*$", "(?i)/orders/.*"])),
)
matches = st.builds(RouteMatch, unique_pairs(header_value), unique_pairs(cookie_value), st.none() | paths,
                    st.none() | st.sampled_from(["GET", "POST", "DELETE"])).filter(lambda m: m != RouteMatch())
faults = st.builds(Fault, st.none() | st.builds(Abort, st.integers(200, 599), percent),
                   st.none() | st.builds(Delay, millis, percent),
                   unique_pairs(header_value)).filter(lambda f: f.abort is not None or f.delay is not None)


@st.composite
def rate_limits(draw: st.DrawFn) -> RateLimit:
    rate = draw(st.integers(1, 1_000_000_000))
    return RateLimit(rate, draw(st.integers(rate, 1_000_000_000)))


policies = st.builds(
    ServicePolicy,
    lb=lbs,
    timeout_ms=st.none() | millis,
    retries=st.none() | retries,
    circuit_breaker=st.none() | st.builds(CircuitBreaker, st.none() | count, st.none() | count, st.none() | count,
                                          st.none() | count, st.none() | percent),
    outlier_detection=st.builds(OutlierPolicy, count, count, millis, millis, st.integers(0, 100)),
    routes=st.lists(st.builds(RouteRule, splits(), st.none() | matches, st.none() | millis, st.none() | retries),
                    max_size=3).map(tuple),
    mirror=st.none() | st.builds(Mirror, st.sampled_from(VERSIONS), percent),
    fault=st.none() | faults,
    rate_limit=st.none() | rate_limits(),
)


@settings(max_examples=300, deadline=None)
@given(policies)
def test_every_policy_round_trips_through_json_text(policy: ServicePolicy) -> None:
    data = policy_to_json(policy)
    assert policy_from_json(json.loads(json.dumps(data))) == policy
    assert policy_to_json(policy_from_json(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.builds(TrafficOverride, st.none() | splits(), st.none() | faults, st.text(max_size=20)),
       st.text(max_size=10), st.text(max_size=10))
def test_every_override_round_trips_through_json_text(override: TrafficOverride, set_by: str, at: str) -> None:
    data = json.loads(json.dumps(override_to_json(override, set_by, at)))
    assert override_from_json(data) == override
    assert (data["set_by"], data["at"]) == (set_by, at)


def test_the_empty_policy_is_the_empty_object_and_durations_are_milliseconds() -> None:
    assert policy_to_json(NO_POLICY) == {}
    assert policy_from_json({}) == NO_POLICY == policy_from_json(None)
    data = policy_to_json(ServicePolicy(timeout_ms=2000, mirror=Mirror("v2", 5.0), fault=Fault(delay=Delay(1500, 0.5))))
    assert data == {"timeout": "2000ms", "mirror": {"to": "v2", "percent": 5},
                    "fault": {"delay": {"duration": "1500ms", "percent": 0.5}}}


def test_the_override_value_has_the_kv_shape() -> None:
    override = TrafficOverride(split=(("v1", 90), ("v2", 10)), revision="r7")
    assert override_to_json(override, "alice@laptop", "2026-01-02T03:04:05Z") == {
        "split": {"v1": 90, "v2": 10}, "fault": None, "revision": "r7", "set_by": "alice@laptop",
        "at": "2026-01-02T03:04:05Z"}
    fault = TrafficOverride(fault=Fault(abort=Abort(503, 50.0), when_headers=(("x-test", "1"),)), revision="r8")
    assert override_to_json(fault)["fault"] == {"abort": {"status": 503, "percent": 50},
                                                "when_headers": {"x-test": "1"}}
    assert override_from_json({"split": None, "fault": None, "revision": ""}).empty


@pytest.mark.parametrize(("data", "fragment"), [
    ({"timeout": "2"}, "policy.timeout: expected a duration"),
    ({"routes": [{"to": {"v1": 60, "v2": 60}}]}, "policy.routes[0].to: expected weights that sum to 100, got 120"),
    ({"lb": {"policy": "maglev"}}, "policy.lb: maglev needs hash_on"),
    ({"mtls": "open"}, "policy.mtls: expected strict (only mTLS clients) or permissive"),
    ({"fault": {"abort": {"status": True}}}, "policy.fault.abort.status: expected an integer from 200 to 599, got True"),
    ({"retries": {"attempts": 1, "on": "5xx,bogus"}}, "policy.retries.on: expected a retry condition"),
    ("routes", "policy: expected a mapping"),
    ([], "policy: expected a mapping"),
    ({"routes": [{"to": {"": 100}}]}, "expected a version label"),
    ({"routes": [{"to": {"v1": 100}, "match": {"path": {"regex": "a{2,1}"}}}]}, "expected a regular expression"),
    ({"routes": [{"to": {"v1": 100}, "match": {"path": {"regex": "a++"}}}]}, "RE2 has no possessive"),
])
def test_bad_policy_json_is_a_policy_error_listing_its_problems(data: Any, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_json(data)
    assert isinstance(caught.value, MeshError)
    assert fragment in str(caught.value), str(caught.value)


def test_policy_json_is_checked_against_the_service_when_its_facts_are_given() -> None:
    data = {"routes": [{"to": {"v1": 90, "v3": 10}}], "rate_limit": {"requests_per_second": 5}}
    assert policy_from_json(data).routes[0].to == (("v1", 90), ("v3", 10))
    with pytest.raises(PolicyError) as caught:
        policy_from_json(data, ServiceFacts("api", ("v1", "v2"), "http"))
    assert caught.value.problems == ["policy.routes[0].to.v3: no instance of api runs version 'v3'; its versions: v1, v2"]
    with pytest.raises(PolicyError) as caught:
        policy_from_json({"rate_limit": {"requests_per_second": 5}}, ServiceFacts("db", ("v1",), "tcp"))
    assert "db is a TCP service (protocol tcp)" in str(caught.value)


@pytest.mark.parametrize(("data", "fragment"), [
    ({"split": {"v1": 90}}, "split: expected weights that sum to 100, got 90"),
    ({"split": {"v1": "ninety", "v2": 10}}, "split.v1: expected an integer from 0 to 100"),
    ({"split": [["v1", 100]]}, "split: expected versions and their weights"),
    ({"fault": {"abort": {"status": 503, "percent": 250}}}, "fault.abort.percent"),
    ({"fault": {}}, "fault: a fault needs abort, delay or both"),
    ({"revision": 7}, "revision: expected a string"),
    ({"spilt": {"v1": 100}}, "did you mean 'split'"),
    ("v1=100", "expected a mapping"),
    (None, "expected a mapping"),
])
def test_bad_override_json_is_a_policy_error(data: Any, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        override_from_json(data)
    assert fragment in str(caught.value), str(caught.value)


def test_check_override_says_what_keeps_it_from_applying() -> None:
    good = TrafficOverride(split=(("v1", 50), ("v2", 50)), fault=Fault(abort=Abort(503, 50.0)))
    assert check_override(good, ("v1", "v2"), "http", "api") == []
    assert check_override(TrafficOverride(split=(("v1", 90), ("v3", 10))), ("v2", "v1"), "http", "api") == [
        "split.v3: no instance of api runs version 'v3'; its versions: v1, v2"]
    assert check_override(TrafficOverride(split=(("v1", 90), ("v2", 20))), ("v1", "v2"), "grpc") == [
        "split: expected weights that sum to 100, got 110 (90 + 20)"]
    assert check_override(TrafficOverride(fault=Fault(abort=Abort(700, 5.0))), ("v1",), "http") == [
        "fault.abort.status: expected an integer from 200 to 599, got 700, out of range"]
    assert check_override(TrafficOverride(split=(("v1", 100),), fault=good.fault), ("v1",), "tcp", "db") == [
        "split: db is a TCP service (protocol tcp): a split chooses versions for HTTP requests",
        "fault: db is a TCP service (protocol tcp): faults are injected into HTTP requests"]
    assert check_override(TrafficOverride(revision="r1"), ("v1",), "tcp") == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["2s", "500ms", "5%", "v1", "source_ip", "GET", "/api", "(a)\\1", "ring_hash", "5xx"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["lb", "policy", "hash_on", "header", "timeout", "retries", "attempts", "on", "routes", "to",
                         "match", "headers", "path", "regex", "v1", "v2", "mirror", "percent", "fault", "abort",
                         "status", "delay", "duration", "rate_limit", "requests_per_second", "burst", "split",
                         "circuit_breaker", "retry_budget", "outlier_detection", "interval", "backoff", "base"]),
        inner, max_size=4),
    max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_any_json_gives_a_policy_or_a_policy_error(data: Any) -> None:
    for read in (policy_from_json, override_from_json,
                 lambda d: policy_from_json(d, ServiceFacts("db", ("v1",), "tcp"))):
        try:
            read(data)
        except PolicyError:
            pass
