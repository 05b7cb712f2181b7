"""A service's traffic policy as Envoy config (mesh.config.traffic, compute.py, the templates): each policy field
shows up where Envoy reads it in the rendered resources; per-version clusters and their endpoints; zone
priorities per caller; run-time overrides; one route rendered alone equals the proxy's file. Goldens of a proxy
with a rich policy and of one with zones are in tests/golden/envoy/traffic-*.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from golden_folders import check_golden_folder

from mesh.config import InconsistentConfig, compute_proxy_config
from mesh.config.model import Percent, ProxyConfig, RouteInputs
from mesh.config.traffic import (
    cookie_regex,
    endpoint_priority,
    outbound_route,
    percent,
    prioritized,
    version_cluster_name,
)
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Protocol, Upstream, Workload
from mesh.inventory.policy import (
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
from mesh.render import ProxyFiles, render_proxy_files, render_route_file

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "envoy"
TRUST_DOMAIN = "traffic.mesh"

# api: v1 on h-api1 (zone a), v2 on h-api2 (zone b), v1 on h-api3 (zone c, another region); web calls it
RICH_API = ServicePolicy(
    lb=LoadBalancing("ring_hash", HashOn("header", "x-user")),
    timeout_ms=2_500,
    retries=Retries(attempts=3, per_try_timeout_ms=500, on=("5xx", "reset", "unavailable"), backoff=Backoff(25, 250)),
    circuit_breaker=CircuitBreaker(max_connections=100, max_pending_requests=10, max_requests=200, max_retries=3,
                                   retry_budget=20.0),
    outlier_detection=OutlierPolicy(consecutive_5xx=3, consecutive_gateway_failure=1, interval_ms=500,
                                    base_ejection_time_ms=5_000, max_ejection_percent=100),
    routes=(
        RouteRule(to=(("v2", 100),), match=RouteMatch(headers=(("x-canary", "yes"),))),
        RouteRule(to=(("v2", 100),), match=RouteMatch(cookies=(("group", "beta.1"),))),
        RouteRule(to=(("v1", 100),), match=RouteMatch(path=PathMatch("exact", "/slow"), method="POST"),
                  timeout_ms=300, retries=Retries(attempts=0)),
        RouteRule(to=(("v2", 100),), match=RouteMatch(path=PathMatch("regex", "/items/[0-9]+"))),
        RouteRule(to=(("v1", 90), ("v2", 10)), match=RouteMatch(path=PathMatch("prefix", "/shop"))),
    ),
    mirror=Mirror("v2", 12.5),
    fault=Fault(abort=Abort(503, 50.0), delay=Delay(200, 0.5), when_headers=(("x-test", "1"),)),
    rate_limit=RateLimit(requests_per_second=100, burst=150),
)


def traffic_mesh(policies: dict[str, ServicePolicy] | None = None, zones: bool = True) -> Mesh:
    """web (h-web, zone a of r1) calls api (http) and db (tcp); api runs v1 in zones a and c (r2), v2 in zone b."""
    def workload(host: str, service: str, port: int, version: str = "v1", protocol: Protocol = "http",
                 upstreams: tuple[Upstream, ...] = ()) -> Workload:
        return Workload(host, 0, service, port, TRUST_DOMAIN, version=version, protocol=protocol, upstreams=upstreams)

    placed = [
        ("h-web", "10.1.0.1", "a", "r1", workload("h-web", "web", 8080, upstreams=(Upstream("api", 19001),
                                                                                      Upstream("db", 19002)))),
        ("h-api1", "10.1.0.2", "a", "r1", workload("h-api1", "api", 9090)),
        ("h-api2", "10.1.0.3", "b", "r1", workload("h-api2", "api", 9090, version="v2")),
        ("h-api3", "10.2.0.4", "c", "r2", workload("h-api3", "api", 9090)),
        ("h-db", "10.1.0.5", "a", "r1", workload("h-db", "db", 5432, protocol="tcp")),
    ]
    hosts = tuple(ManagedHost(name, "vm", Connection(address), (w,), zone=zone if zones else None,
                              region=region if zones else None) for name, address, zone, region, w in placed)
    services: dict[str, tuple[Workload, ...]] = {}
    for *_, w in placed:
        services[w.service] = (*services.get(w.service, ()), w)
    return Mesh(MeshSettings(trust_domain=TRUST_DOMAIN), hosts, (), MappingProxyType(services),
                policies=MappingProxyType(policies or {}))


def web_config(mesh: Mesh, overrides: dict[str, TrafficOverride] | None = None) -> ProxyConfig:
    web = next(w for w in mesh.workloads if w.service == "web")
    return compute_proxy_config(mesh, web, MappingProxyType(overrides or {}))


def api_config(mesh: Mesh) -> ProxyConfig:
    return compute_proxy_config(mesh, next(w for w in mesh.workloads if w.host == "h-api1"))


def resources(files: ProxyFiles, name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load(files.file(f"{files.proxy_dir}/xds/{name}").content)["resources"])


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def addresses(assignment: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    """(priority, zone, address) of each endpoint of a ClusterLoadAssignment."""
    return [(group.get("priority", 0), (group.get("locality") or {}).get("zone"),
             item["endpoint"]["address"]["socket_address"]["address"])
            for group in assignment["endpoints"] for item in group["lb_endpoints"]]


# --- names and small pure functions ---

def test_a_version_has_its_own_cluster_only_when_the_service_runs_two_or_more() -> None:
    assert version_cluster_name("api", "v2", ("v1", "v2")) == "upstream-api.v2"
    assert version_cluster_name("api", "v1", ("v1",)) == "upstream-api"
    cfg = web_config(traffic_mesh())
    assert [c.name for c in cfg.clusters] == ["local-app", "upstream-api", "upstream-api.v1", "upstream-api.v2",
                                              "upstream-db"]
    assert [(c.service, c.version) for c in cfg.clusters[1:]] == [("api", None), ("api", "v1"), ("api", "v2"),
                                                                  ("db", None)]
    assert cfg.cluster("upstream-api.v2").stat_name == "outbound|web|v1|api|v2"
    assert cfg.cluster("upstream-api").stat_name == "outbound|web|v1|api"


def test_endpoint_priority_is_the_callers_zone_then_region_then_the_rest() -> None:
    assert endpoint_priority("a", "r1", "a", "r1") == 0
    assert endpoint_priority("a", "r1", "b", "r1") == 1
    assert endpoint_priority("a", "r1", "a", "r2") == 2  # a zone of the same name in another region
    assert endpoint_priority("a", "r1", "c", "r2") == 2
    assert endpoint_priority("a", None, "a", "r9") == 0
    assert endpoint_priority("a", None, "b", None) == 2
    assert endpoint_priority(None, "r1", "b", "r1") == 1 and endpoint_priority(None, "r1", None, "r2") == 2
    assert endpoint_priority(None, None, "a", "r1") == 0  # a caller that says neither: one priority
    assert prioritized([1, 2, 1]) == (0, 1, 0) and prioritized([2, 0]) == (1, 0) and prioritized([]) == ()


def test_percentages_become_fractional_percents() -> None:
    assert percent(50) == Percent(50, "HUNDRED") and percent(100.0) == Percent(100, "HUNDRED")
    assert percent(12.5) == Percent(125_000, "MILLION") and percent(0.01) == Percent(100, "MILLION")


def test_the_cookie_regex_matches_the_cookie_alone() -> None:
    pattern = re.compile(cookie_regex("group", "beta.1"))  # Envoy's safe_regex must match the whole header
    for header in ("group=beta.1", "a=1; group=beta.1", "group=beta.1;b=2", "a=1;group=beta.1; b=2"):
        assert pattern.fullmatch(header), header
    for header in ("group=beta-1", "mygroup=beta.1", "group=beta.12", "a=group=beta.1x"):
        assert not pattern.fullmatch(header), header


def test_route_inputs_round_trip_through_json() -> None:
    inputs = RouteInputs("outbound-api", "api", "grpc", ("v1", "v2"), (("x-mesh-source-service", "web"),))
    assert RouteInputs.from_json(yaml.safe_load(yaml.safe_dump(inputs.to_json()))) == inputs
    with pytest.raises(ValueError, match="protocol"):
        RouteInputs.from_json({**inputs.to_json(), "protocol": "udp"})
    with pytest.raises(ValueError, match="not route inputs"):
        RouteInputs.from_json({"route_name": "x"})


# --- without a policy: today's behaviour ---

def test_without_a_policy_one_route_to_every_instance_with_the_default_retries() -> None:
    files = render_proxy_files(web_config(traffic_mesh(zones=False)))
    (route,) = resources(files, "rds.outbound-api.yaml")
    (entry,) = route["virtual_hosts"][0]["routes"]
    assert entry["match"] == {"prefix": "/"}
    assert entry["route"]["cluster"] == "upstream-api" and "timeout" not in entry["route"]
    assert entry["route"]["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset"
    assert entry["route"]["retry_policy"]["num_retries"] == 2
    assert "typed_per_filter_config" not in entry and "request_mirror_policies" not in entry["route"]
    clusters = by_name(resources(files, "cds.yaml"))
    assert clusters["upstream-api"]["lb_policy"] == "ROUND_ROBIN" and "circuit_breakers" not in clusters["upstream-api"]
    assert clusters["upstream-api"]["outlier_detection"]["consecutive_5xx"] == 5
    # the filters are always there, so a policy change is a route change only (no listener drain)
    listeners = by_name(resources(files, "lds.yaml"))
    outbound = listeners["outbound-api"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in outbound] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    app_chain = next(c for c in listeners["inbound"]["filter_chains"] if c["name"] == "app")
    inbound = app_chain["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in inbound] == ["mesh.authz.deny", "mesh.authz.allow", "envoy.filters.http.local_ratelimit",
                                            "envoy.filters.http.router"]
    assert set(inbound[2]["typed_config"]) == {"@type", "stat_prefix"}  # no bucket: disabled
    (assignment,) = resources(files, "eds.upstream-api.yaml")
    assert assignment["policy"] == {"overprovisioning_factor": 140}
    assert [group.get("priority", 0) for group in assignment["endpoints"]] == [0]


def test_a_policy_changes_no_listener() -> None:
    plain = render_proxy_files(web_config(traffic_mesh()))
    rich = render_proxy_files(web_config(traffic_mesh({"api": RICH_API})))
    lds = f"{plain.proxy_dir}/xds/lds.yaml"
    assert plain.file(lds) == rich.file(lds) and plain.bootstrap == rich.bootstrap


# --- each policy field ---

def rich_files() -> ProxyFiles:
    return render_proxy_files(web_config(traffic_mesh({"api": RICH_API})))


def test_lb_circuit_breaker_and_outlier_detection_go_on_every_cluster_of_the_service() -> None:
    clusters = by_name(resources(rich_files(), "cds.yaml"))
    for name in ("upstream-api", "upstream-api.v1", "upstream-api.v2"):
        cluster = clusters[name]
        assert cluster["lb_policy"] == "RING_HASH"
        assert cluster["circuit_breakers"] == {"thresholds": [{
            "priority": "DEFAULT", "max_connections": 100, "max_pending_requests": 10, "max_requests": 200,
            "max_retries": 3, "retry_budget": {"budget_percent": {"value": 20.0}}}]}
        assert cluster["outlier_detection"] == {
            "consecutive_5xx": 3, "consecutive_gateway_failure": 1, "enforcing_consecutive_gateway_failure": 100,
            "interval": "0.5s", "base_ejection_time": "5s", "max_ejection_percent": 100}
    assert clusters["upstream-db"]["lb_policy"] == "ROUND_ROBIN"  # db's policy is its own


def test_routes_in_order_with_their_matches_then_a_catch_all() -> None:
    (route,) = resources(rich_files(), "rds.outbound-api.yaml")
    routes = route["virtual_hosts"][0]["routes"]
    assert [r["match"] for r in routes] == [
        {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "yes"}}]},
        {"prefix": "/", "headers": [{"name": "cookie",
                                     "string_match": {"safe_regex": {"regex": r"(.*;\s*)?group=beta\.1(;.*)?"}}}]},
        {"path": "/slow", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        {"safe_regex": {"regex": "/items/[0-9]+"}},
        {"prefix": "/shop"},
        {"prefix": "/"},
    ]
    targets = [r["route"].get("cluster") or r["route"]["weighted_clusters"]["clusters"] for r in routes]
    assert targets == ["upstream-api.v2", "upstream-api.v2", "upstream-api.v1", "upstream-api.v2",
                       [{"name": "upstream-api.v1", "weight": 90}, {"name": "upstream-api.v2", "weight": 10}],
                       "upstream-api"]
    for r in routes:  # the caller's identity on every route
        assert [h["header"]["key"] for h in r["request_headers_to_add"]] == [
            "x-mesh-source-service", "x-mesh-source-version", "x-mesh-source-instance"]


def test_timeouts_and_retries_with_per_route_overrides() -> None:
    (route,) = resources(rich_files(), "rds.outbound-api.yaml")
    routes = [r["route"] for r in route["virtual_hosts"][0]["routes"]]
    assert [r["timeout"] for r in routes] == ["2.5s", "2.5s", "0.3s", "2.5s", "2.5s", "2.5s"]
    service_retries = routes[0]["retry_policy"]
    assert service_retries["retry_on"] == "5xx,reset,unavailable" and service_retries["num_retries"] == 3
    assert service_retries["per_try_timeout"] == "0.5s"
    assert service_retries["retry_back_off"] == {"base_interval": "0.025s", "max_interval": "0.25s"}
    assert service_retries["host_selection_retry_max_attempts"] == 3
    assert service_retries["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    slow = routes[2]["retry_policy"]  # its own: no retries, on the default conditions
    assert (slow["num_retries"], slow["retry_on"]) == (0, "connect-failure,refused-stream,reset")
    assert "per_try_timeout" not in slow and "retry_back_off" not in slow


def test_grpc_routes_have_no_timeout_unless_the_policy_says_one() -> None:
    inputs = RouteInputs("outbound-api", "api", "grpc", ("v1",))
    assert outbound_route(inputs, ServicePolicy()).routes[0].timeout_ms == 0
    assert outbound_route(inputs, ServicePolicy(timeout_ms=700)).routes[0].timeout_ms == 700
    assert outbound_route(replace(inputs, protocol="http"), ServicePolicy()).routes[0].timeout_ms is None


def test_hashing_mirror_and_fault_are_on_every_route() -> None:
    (route,) = resources(rich_files(), "rds.outbound-api.yaml")
    for r in route["virtual_hosts"][0]["routes"]:
        assert r["route"]["hash_policy"] == [{"header": {"header_name": "x-user"}}]
        assert r["route"]["request_mirror_policies"] == [{
            "cluster": "upstream-api.v2",
            "runtime_fraction": {"default_value": {"numerator": 125_000, "denominator": "MILLION"}}}]
        assert r["typed_per_filter_config"] == {"envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {"fixed_delay": "0.2s", "percentage": {"numerator": 5000, "denominator": "MILLION"}},
            "abort": {"http_status": 503, "percentage": {"numerator": 50, "denominator": "HUNDRED"}},
            "headers": [{"name": "x-test", "string_match": {"exact": "1"}}]}}


@pytest.mark.parametrize(("hash_on", "expected"), [
    (HashOn("cookie", "session"), {"cookie": {"name": "session"}}),
    (HashOn("source_ip"), {"connection_properties": {"source_ip": True}}),
])
def test_hash_on_cookie_or_source_ip(hash_on: HashOn, expected: dict[str, Any]) -> None:
    policy = ServicePolicy(lb=LoadBalancing("maglev", hash_on))
    files = render_proxy_files(web_config(traffic_mesh({"api": policy})))
    (route,) = resources(files, "rds.outbound-api.yaml")
    assert route["virtual_hosts"][0]["routes"][0]["route"]["hash_policy"] == [expected]
    assert by_name(resources(files, "cds.yaml"))["upstream-api"]["lb_policy"] == "MAGLEV"


def test_a_tcp_service_with_ring_hash_hashes_the_calling_address() -> None:
    policy = ServicePolicy(lb=LoadBalancing("ring_hash", HashOn("source_ip")))
    files = render_proxy_files(web_config(traffic_mesh({"db": policy})))
    listener = by_name(resources(files, "lds.yaml"))["outbound-db"]
    tcp = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp["hash_policy"] == [{"source_ip": {}}] and tcp["cluster"] == "upstream-db"
    assert by_name(resources(files, "cds.yaml"))["upstream-db"]["lb_policy"] == "RING_HASH"
    assert not any(path.endswith("rds.outbound-db.yaml") for path in (f.path for f in files.files))
    least = render_proxy_files(web_config(traffic_mesh({"db": ServicePolicy(lb=LoadBalancing("least_request"))})))
    assert "hash_policy" not in by_name(resources(least, "lds.yaml"))["outbound-db"]["filter_chains"][0][
        "filters"][0]["typed_config"]
    assert by_name(resources(least, "cds.yaml"))["upstream-db"]["lb_policy"] == "LEAST_REQUEST"


def test_the_rate_limit_is_the_callees_own_on_its_inbound_app_route() -> None:
    files = render_proxy_files(api_config(traffic_mesh({"api": RICH_API})))
    (app_route,) = resources(files, "rds.inbound.yaml")
    (entry,) = app_route["virtual_hosts"][0]["routes"]
    limit = entry["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    assert limit["token_bucket"] == {"max_tokens": 150, "tokens_per_fill": 100, "fill_interval": "1s"}
    assert limit["filter_enabled"]["default_value"] == limit["filter_enforced"]["default_value"] == {
        "numerator": 100, "denominator": "HUNDRED"}
    # web's own inbound route has none (only its authorization): the policy is api's
    (web_route,) = resources(rich_files(), "rds.inbound.yaml")
    assert set(web_route["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"]) == {"mesh.authz.deny",
                                                                                          "mesh.authz.allow"}


# --- endpoints: versions and zones ---

def test_version_clusters_hold_that_versions_instances_by_the_callers_priorities() -> None:
    files = render_proxy_files(web_config(traffic_mesh()))
    (every,) = resources(files, "eds.upstream-api.yaml")
    (v1,) = resources(files, "eds.upstream-api.v1.yaml")
    (v2,) = resources(files, "eds.upstream-api.v2.yaml")
    assert addresses(every) == [(0, "a", "10.1.0.2"), (1, "b", "10.1.0.3"), (2, "c", "10.2.0.4")]
    assert addresses(v1) == [(0, "a", "10.1.0.2"), (1, "c", "10.2.0.4")]  # renumbered: no gap
    assert addresses(v2) == [(0, "b", "10.1.0.3")]
    assert every["endpoints"][2]["locality"] == {"region": "r2", "zone": "c"}
    assert {item["metadata"]["filter_metadata"]["mesh"]["version"] for group in v1["endpoints"]
            for item in group["lb_endpoints"]} == {"v1"}
    assert every["policy"] == {"overprovisioning_factor": 140}


def test_without_zones_every_endpoint_is_one_priority_and_locality() -> None:
    files = render_proxy_files(web_config(traffic_mesh(zones=False)))
    (every,) = resources(files, "eds.upstream-api.yaml")
    assert addresses(every) == [(0, None, "10.1.0.2"), (0, None, "10.1.0.3"), (0, None, "10.2.0.4")]
    assert len(every["endpoints"]) == 1 and "locality" not in every["endpoints"][0]


# --- overrides and the controller's route ---

def test_an_override_replaces_the_catch_all_split_and_the_fault() -> None:
    override = TrafficOverride(split=(("v1", 50), ("v2", 50)), fault=Fault(abort=Abort(500, 10.0)), revision="r7")
    cfg = web_config(traffic_mesh({"api": RICH_API}), {"api": override})
    api = next(listener for listener in cfg.outbound if listener.service == "api")
    assert api.route is not None
    last = api.route.routes[-1]
    assert [(c.name, c.weight) for c in last.clusters] == [("upstream-api.v1", 50), ("upstream-api.v2", 50)]
    assert len(api.route.routes) == len(RICH_API.routes) + 1
    assert last.fault is not None and (last.fault.abort_status, last.fault.delay_ms, last.fault.headers) == (
        500, None, ())
    # an override of another service changes nothing here
    assert web_config(traffic_mesh({"api": RICH_API}), {"db": override}) == web_config(traffic_mesh({"api": RICH_API}))


def test_a_split_of_one_version_at_100_is_a_plain_cluster() -> None:
    inputs = RouteInputs("outbound-api", "api", "http", ("v1", "v2"))
    route = outbound_route(inputs, ServicePolicy(routes=(RouteRule(to=(("v1", 0), ("v2", 100))),)))
    assert [(c.name, c.weight) for entry in route.routes for c in entry.clusters] == [("upstream-api.v2", 100)]


@pytest.mark.parametrize("policy", [ServicePolicy(), RICH_API], ids=["no-policy", "rich"])
def test_one_route_rendered_alone_is_the_proxys_file_byte_for_byte(policy: ServicePolicy) -> None:
    cfg = web_config(traffic_mesh({"api": policy}))
    files = render_proxy_files(cfg)
    (api,) = [listener for listener in cfg.outbound if listener.service == "api"]
    assert api.route_inputs is not None
    path = f"{files.proxy_dir}/xds/rds.{api.route_inputs.route_name}.yaml"
    # what the controller does: the inputs from spec.json and the policy give the same file
    inputs = RouteInputs.from_json(api.route_inputs.to_json())
    alone = render_route_file(cfg.proxy, path, outbound_route(inputs, policy))
    assert alone == files.file(path)


def test_a_route_to_a_version_nobody_runs_is_refused() -> None:
    policy = ServicePolicy(routes=(RouteRule(to=(("v9", 100),)),))
    with pytest.raises(InconsistentConfig, match="upstream-api.v9"):
        render_proxy_files(web_config(traffic_mesh({"api": policy})))


# --- goldens ---

@pytest.mark.parametrize(("case", "mesh", "who"), [
    ("traffic-web-rich-policy", lambda: traffic_mesh({"api": RICH_API, "db": ServicePolicy(
        lb=LoadBalancing("ring_hash", HashOn("source_ip")))}), "h-web"),
    ("traffic-api-rate-limit", lambda: traffic_mesh({"api": RICH_API}, zones=False), "h-api2"),
    ("traffic-web-zones", lambda: traffic_mesh(), "h-web"),
], ids=["rich-policy", "rate-limit", "zones"])
def test_traffic_goldens(case: str, mesh: Any, who: str, update_goldens: bool) -> None:
    built = mesh()
    files = render_proxy_files(compute_proxy_config(built, next(w for w in built.workloads if w.host == who)))
    check_golden_folder(files, GOLDEN / case, update_goldens)


def test_an_outbound_listener_reads_the_route_named_as_itself() -> None:
    cfg = web_config(traffic_mesh())
    api = cfg.outbound[0]
    assert api.route is not None
    renamed = replace(cfg, outbound=(replace(api, route=replace(api.route, name="elsewhere")), *cfg.outbound[1:]))
    with pytest.raises(InconsistentConfig, match="reads route 'outbound-api', not 'elsewhere'"):
        render_proxy_files(renamed)


def test_durations_are_written_exactly_however_long() -> None:
    policy = ServicePolicy(timeout_ms=1_234_567, retries=Retries(attempts=1, per_try_timeout_ms=1_000_000_001))
    (route,) = resources(render_proxy_files(web_config(traffic_mesh({"api": policy}))), "rds.outbound-api.yaml")
    entry = route["virtual_hosts"][0]["routes"][0]["route"]
    assert (entry["timeout"], entry["retry_policy"]["per_try_timeout"]) == ("1234.567s", "1000000.001s")
