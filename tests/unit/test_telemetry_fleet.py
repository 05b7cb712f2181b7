"""The fleet's numbers between two scrapes: rates per second, error rates (5xx; TCP connect failures), p99 from
bucket deltas, per edge, per service and per version, from Envoy-like Prometheus text (design 3.3's names)."""

from __future__ import annotations

import pytest
from telemetry_samples import PromText, telemetry_mesh

from mesh.telemetry.fleet import (
    FleetSnapshot,
    Numbers,
    ProxyScrape,
    fleet_numbers,
    p99,
    parse_metrics,
    scrape,
)
from mesh.telemetry.scrape import FetchError
from mesh.telemetry.targets import ProxyTarget, proxy_targets

WEB_CALLER = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
API_CALLER = {"source_service": "api", "source_version": "v1", "destination_service": "db"}
API_V2_CALLER = {"source_service": "api", "source_version": "v2", "destination_service": "db"}


def targets() -> dict[str, ProxyTarget]:
    return {f"{t.host}/{t.proxy}": t for t in proxy_targets(telemetry_mesh())}


def web(ok: float, failed: float, latencies: list[float]) -> str:
    return (PromText()
            .counter("envoy_cluster_upstream_rq_xx", {**WEB_CALLER, "envoy_response_code_class": "2"}, ok)
            .counter("envoy_cluster_upstream_rq_xx", {**WEB_CALLER, "envoy_response_code_class": "5"}, failed)
            .counter("envoy_cluster_upstream_rq_total", WEB_CALLER, ok + failed)
            .counter("envoy_cluster_upstream_cx_total", WEB_CALLER, 3)
            .histogram("envoy_cluster_upstream_rq_time", WEB_CALLER, latencies).text())


def api(version: str, ok: float, failed: float, latencies: list[float], db_connections: float,
        db_failures: float) -> str:
    callee = {"destination_service": "api", "destination_version": version}
    caller = API_CALLER if version == "v1" else API_V2_CALLER
    return (PromText()
            .counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "2"}, ok)
            .counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "5"}, failed)
            .counter("envoy_vhost_vcluster_upstream_rq_xx",
                     {"source_service": "web", **callee, "envoy_response_code_class": "2"}, ok)
            .counter("envoy_vhost_vcluster_upstream_rq_xx",
                     {"source_service": "web", **callee, "envoy_response_code_class": "5"}, failed)
            .counter("envoy_cluster_upstream_cx_total", caller, db_connections)
            .counter("envoy_cluster_upstream_cx_connect_fail", caller, db_failures)
            .counter("envoy_cluster_upstream_cx_total", callee, 2)  # its own app cluster: not an edge
            .histogram("envoy_http_downstream_rq_time", callee, latencies)
            .histogram("envoy_vhost_vcluster_upstream_rq_time", {"source_service": "web", **callee}, latencies)
            .histogram("envoy_cluster_upstream_cx_length_ms", caller, [40.0] * int(db_connections)).text())


def db(connections: float, failures: float) -> str:
    callee = {"destination_service": "db", "destination_version": "v1"}
    return (PromText().counter("envoy_cluster_upstream_cx_total", callee, connections)
            .counter("envoy_cluster_upstream_cx_connect_fail", callee, failures)
            .counter("envoy_tcp_downstream_cx_total", callee, connections)
            .histogram("envoy_cluster_upstream_cx_length_ms", callee, [7.0] * int(connections)).text())


def snapshot(at: float, texts: dict[str, str], errors: dict[str, str] | None = None) -> FleetSnapshot:
    found = targets()
    proxies = [ProxyScrape(found[key], at, parse_metrics(text)) for key, text in texts.items()]
    proxies += [ProxyScrape(found[key], at, error=why) for key, why in (errors or {}).items()]
    return FleetSnapshot(tuple(proxies))


BEFORE = snapshot(1000.0, {
    "vm1/web-8080": web(100, 0, [3.0] * 100),
    "vm2/api-9090": api("v1", 60, 0, [2.0] * 60, 60, 0),
    "dock1/api-api-v2-1": api("v2", 40, 0, [4.0] * 40, 40, 0),
    "vm2/db-5432": db(100, 0),
})
# ten seconds later: web sent 20 more (2 of them 5xx): 12 answered by api v1 (0 failed), 8 by v2 (2 failed)
AFTER = snapshot(1010.0, {
    "vm1/web-8080": web(118, 2, [3.0] * 100 + [2.0] * 10 + [20.0] * 8 + [800.0] * 2),
    "vm2/api-9090": api("v1", 72, 0, [2.0] * 72, 72, 0),
    "dock1/api-api-v2-1": api("v2", 46, 2, [4.0] * 46 + [600.0] * 2, 48, 0),
    "vm2/db-5432": db(120, 0),
})


def test_an_edge_has_its_callers_rate_error_rate_and_p99() -> None:
    numbers = fleet_numbers(BEFORE, AFTER)
    edges = {(edge.source, edge.destination): edge for edge in numbers.edges}
    assert set(edges) == {("web", "api"), ("api", "db")}
    web_api = edges[("web", "api")]
    assert web_api.protocol == "http"
    assert web_api.numbers.rate == pytest.approx(2.0)
    assert web_api.numbers.error_rate == pytest.approx(0.1)
    # 20 requests: 10 <= 5 ms, 8 in (10, 25], 2 in (500, 1000]; the 19.8th is in (500, 1000], 0.9 of the way
    assert web_api.numbers.p99_ms == pytest.approx(500 + 500 * 0.9)
    assert web_api.by_source_version == {"v1": web_api.numbers}
    assert edges[("api", "db")].protocol == "tcp"  # db's workloads say so


def test_an_http_edge_is_split_by_destination_version_as_the_callees_measured() -> None:
    web_api = next(edge for edge in fleet_numbers(BEFORE, AFTER).edges if edge.destination == "api")
    assert set(web_api.by_destination_version) == {"v1", "v2"}
    v1, v2 = web_api.by_destination_version["v1"], web_api.by_destination_version["v2"]
    assert (v1.rate, v1.error_rate) == (pytest.approx(1.2), 0.0)
    assert (v2.rate, v2.error_rate) == (pytest.approx(0.8), pytest.approx(0.25))
    assert v1.p99_ms == pytest.approx(0.5 * 0.0 + 1 + 4 * (0.99 * 12 - 0) / 12)  # all 12 in (1, 5]
    assert v2.p99_ms is not None and 500 < v2.p99_ms <= 1000


def test_per_source_numbers_come_from_response_codes_when_envoy_gives_no_classes() -> None:
    def text(ok: float, failed: float, unknown: float) -> str:
        callee = {"destination_service": "api", "destination_version": "v1"}
        per_code = "envoy_vhost_vcluster_upstream_rq"
        return (PromText()
                .counter(per_code, {"source_service": "web", **callee, "envoy_response_code": "200"}, ok)
                .counter(per_code, {"source_service": "web", **callee, "envoy_response_code": "503"}, failed)
                .counter("envoy_vhost_vcluster_upstream_rq_total", {"source_service": "web", **callee}, ok + failed)
                .counter(per_code, {"source_service": "other", **callee, "envoy_response_code": "200"}, unknown)
                .text())

    before = snapshot(1000.0, {"vm2/api-9090": text(10, 0, 0), "vm1/web-8080": ""})
    after = snapshot(1002.0, {"vm2/api-9090": text(16, 2, 5), "vm1/web-8080": ""})
    edges = fleet_numbers(before, after).edges
    assert [(edge.source, edge.destination) for edge in edges] == [("web", "api")]  # Envoy's catch-all `other`: no
    v1 = edges[0].by_destination_version["v1"]
    assert (v1.rate, v1.error_rate) == (pytest.approx(4.0), pytest.approx(0.25))


def test_a_tcp_edge_counts_connections_and_connect_failures() -> None:
    before = snapshot(1000.0, {"vm2/api-9090": api("v1", 0, 0, [], 10, 1)})
    after = snapshot(1004.0, {"vm2/api-9090": api("v1", 0, 0, [], 18, 3)})
    api_db = next(edge for edge in fleet_numbers(before, after).edges if edge.destination == "db")
    assert api_db.protocol == "tcp"  # no db proxy read: no request stats on this edge say so
    assert api_db.numbers.rate == pytest.approx(2.0)  # 8 connections in 4 s
    assert api_db.numbers.error_rate == pytest.approx(0.25)  # 2 of them failed to connect
    assert api_db.numbers.p99_ms == pytest.approx(25 + 25 * (0.99 * 8 - 0) / 8)  # connection length, (25, 50]
    assert api_db.by_destination_version == {}  # a TCP connection names no caller on the callee's side


def test_a_service_has_what_its_proxies_received_per_version() -> None:
    services = {service.service: service for service in fleet_numbers(BEFORE, AFTER).services}
    assert set(services) == {"web", "api", "db"}
    assert services["web"].numbers == Numbers(0.0, None, None)  # nobody calls web through the mesh
    api_numbers = services["api"]
    assert api_numbers.numbers.rate == pytest.approx(2.0)
    assert api_numbers.numbers.error_rate == pytest.approx(0.1)
    assert api_numbers.by_version["v2"].error_rate == pytest.approx(0.25)
    db_numbers = services["db"]
    assert (db_numbers.protocol, db_numbers.numbers.rate, db_numbers.numbers.error_rate) == ("tcp", 2.0, 0.0)
    assert db_numbers.numbers.p99_ms == pytest.approx(5 + 5 * 0.99)  # all in (5, 10]


def test_no_request_means_no_error_rate_and_no_p99() -> None:
    # the histogram still moves: Envoy publishes it at its stats flush, after the requests were counted
    same = fleet_numbers(BEFORE, snapshot(1010.0, {"vm1/web-8080": web(100, 0, [3.0] * 110)}))
    web_api = next(edge for edge in same.edges if edge.destination == "api")
    assert web_api.numbers == Numbers(0.0, None, None)


def test_a_restarted_envoy_counts_from_zero() -> None:
    after = snapshot(1010.0, {"vm1/web-8080": web(5, 0, [3.0] * 5)})  # counters below the earlier ones
    web_api = next(edge for edge in fleet_numbers(BEFORE, after).edges if edge.destination == "api")
    assert web_api.numbers.rate == pytest.approx(0.5)


def test_a_version_with_a_dot_is_named_as_the_inventory_writes_it() -> None:
    found = {f"{t.host}/{t.proxy}": t for t in proxy_targets(telemetry_mesh(api_version="2.1"))}
    callee = {"destination_service": "api", "destination_version": "2_1"}  # Envoy's stat names have no dots

    def text(ok: float) -> str:
        return PromText().counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "2"},
                                  ok).text()

    before = FleetSnapshot((ProxyScrape(found["dock1/api-api-v2-1"], 0.0, parse_metrics(text(1))),))
    after = FleetSnapshot((ProxyScrape(found["dock1/api-api-v2-1"], 1.0, parse_metrics(text(4))),))
    api_numbers = next(s for s in fleet_numbers(before, after).services if s.service == "api")
    assert list(api_numbers.by_version) == ["2.1"] and api_numbers.by_version["2.1"].rate == 3.0


def test_a_proxy_that_did_not_answer_is_left_out_and_named() -> None:
    after = snapshot(1010.0, {"vm1/web-8080": web(118, 2, [3.0] * 120)},
                     errors={"vm2/api-9090": "10.77.0.12:20000: timed out"})
    numbers = fleet_numbers(BEFORE, after)
    assert [(f.target.proxy, f.error) for f in numbers.failures] == [("api-9090", "10.77.0.12:20000: timed out")]
    assert numbers.interval == 10.0
    assert next(s for s in numbers.services if s.service == "api").numbers.rate == 0.0


@pytest.mark.parametrize(("buckets", "expected"), [
    ({}, None),
    ({1.0: 0.0, float("inf"): 0.0}, None),
    ({1.0: 100.0, float("inf"): 100.0}, 0.99),  # all in the first bucket, (0, 1]
    ({10.0: 50.0, 20.0: 100.0, float("inf"): 100.0}, 10 + 10 * (99 - 50) / 50),
    ({10.0: 50.0, 20.0: 98.0, float("inf"): 100.0}, 20.0),  # in +Inf: the highest finite bound
])
def test_p99_interpolates_in_its_bucket(buckets: dict[float, float], expected: float | None) -> None:
    assert p99(buckets) == (pytest.approx(expected) if expected is not None else None)


class Fetcher:
    via = "direct"

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def fetch(self, target: ProxyTarget) -> str:
        if target.proxy not in self.texts:
            raise FetchError(f"{target.endpoint}: connection refused")
        return self.texts[target.proxy]

    def close(self) -> None:
        pass


def test_scrape_reads_every_proxy_and_keeps_each_ones_error() -> None:
    fleet = scrape(proxy_targets(telemetry_mesh()),
                   Fetcher({"web-8080": web(1, 0, [1.0]), "db-5432": "this is { not prometheus"}))
    by_proxy = {item.target.proxy: item for item in fleet.proxies}
    assert by_proxy["web-8080"].error is None and by_proxy["web-8080"].samples
    assert by_proxy["api-9090"].error == "10.77.0.12:20000: connection refused"
    assert (by_proxy["db-5432"].error or "").startswith("not Prometheus text")
    assert {item.target.proxy for item in fleet.failures} == {"api-9090", "api-api-v2-1", "db-5432"}
