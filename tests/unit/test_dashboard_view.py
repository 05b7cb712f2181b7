"""The dashboard's JSON (mesh.dashboard.view.dashboard_view, pure): the graph of services and calls with the
fleet's numbers, every instance with its health, drain, push state and certificate, the splits callers apply and
the authorization denials, from frozen inputs shaped like the lab's."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dashboard_samples import lab_instances, lab_spec, reading, scrape_of, snapshot, target
from telemetry_samples import PromText

from mesh.dashboard.view import DashboardInputs, dashboard_view
from mesh.inventory.policy import AuthzOverride, TrafficOverride
from mesh.telemetry.fleet import fleet_numbers

NOW = datetime(2026, 12, 7, 1, 0, tzinfo=UTC).timestamp()
WEB_CALLER = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
API_CALLER = {"source_service": "api", "source_version": "v1", "destination_service": "db"}


def view(**fields: object) -> dict:
    inputs = DashboardInputs(**{"reading": reading(), "now": NOW, "instances": lab_instances(), **fields})
    found = dashboard_view(inputs)
    json.dumps(found)  # what the server sends: it must be JSON as it is
    return found


def by(items: list[dict], key: str) -> dict[str, dict]:
    return {item[key]: item for item in items}


def test_the_graph_has_every_service_with_its_protocol_and_every_declared_call() -> None:
    found = view()
    services = by(found["services"], "name")
    assert {name: item["protocol"] for name, item in services.items()} == {"web": "http", "api": "http",
                                                                          "db": "tcp"}
    assert services["api"]["versions"] == ["v1", "v2"] and services["api"]["instances"] == 2
    assert services["api"]["up"] == 2
    edges = {(edge["source"], edge["destination"]): edge for edge in found["edges"]}
    assert set(edges) == {("web", "api"), ("api", "db")}
    assert edges[("api", "db")]["protocol"] == "tcp" and edges[("web", "api")]["protocol"] == "http"
    assert edges[("web", "api")]["rps"] is None  # nothing measured yet: no number, not a zero


def test_edges_and_services_carry_the_fleets_numbers_between_two_scrapes() -> None:
    web = target("web-8080", "web", "vm1")
    api = target("api-9090", "api", "vm2")

    def web_text(ok: float) -> str:
        return (PromText()
                .counter("envoy_cluster_upstream_rq_xx", {**WEB_CALLER, "envoy_response_code_class": "2"}, ok)
                .counter("envoy_cluster_upstream_rq_xx", {**WEB_CALLER, "envoy_response_code_class": "5"}, ok / 10)
                .histogram("envoy_cluster_upstream_rq_time", WEB_CALLER, [4.0] * int(ok)).text())

    def api_text(connections: float) -> str:
        callee = {"destination_service": "api", "destination_version": "v1"}
        return (PromText()
                .counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "2"}, connections)
                .counter("envoy_cluster_upstream_cx_total", API_CALLER, connections).text())

    before = snapshot(scrape_of(web, web_text(0), 100.0), scrape_of(api, api_text(0), 100.0))
    after = snapshot(scrape_of(web, web_text(50), 110.0), scrape_of(api, api_text(50), 110.0))
    found = view(numbers=fleet_numbers(before, after), latest=after, scraping=True)
    edges = {(edge["source"], edge["destination"]): edge for edge in found["edges"]}
    assert edges[("web", "api")]["rps"] == 5.5  # (50 + 5) requests in 10 s
    assert edges[("web", "api")]["error_rate"] == round(5 / 55, 4)
    assert edges[("web", "api")]["p99_ms"] is not None
    assert edges[("api", "db")]["rps"] == 5.0  # TCP: connections per second
    assert by(found["services"], "name")["api"]["rps"] == 5.0
    assert found["numbers"]["interval_s"] == 10.0 and found["numbers"]["scraping"] is True


def test_every_instance_has_its_version_kind_host_health_and_certificate() -> None:
    not_after = NOW + 1800
    found = view(reading=reading(certificates={("dock1", "api-api-v2-1"): not_after}))
    instances = by(found["instances"], "id")
    assert set(instances) == {"web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"}
    container = instances["api-dock1-api-v2-1"]
    assert (container["service"], container["version"], container["kind"], container["host"],
            container["container"]) == ("api", "v2", "container", "dock1", "api-v2-1")
    assert container["health"] == "passing" and container["drained"] is False
    assert container["cert_expires_in_s"] == 1800
    assert instances["web-vm1-8080"]["kind"] == "vm" and instances["web-vm1-8080"]["cert_expires_in_s"] is None
    assert instances["db-vm2-5432"]["address"] == "10.77.0.12:21001"


def test_a_drained_instance_shows_drained_and_its_service_counts_it_down() -> None:
    found = view(instances=lab_instances(drained="api-vm2-9090"))
    drained = by(found["instances"], "id")["api-vm2-9090"]
    assert drained["drained"] is True and drained["health"] == "critical"
    assert "mesh drain" in drained["health_output"]
    api = by(found["services"], "name")["api"]
    assert (api["up"], api["instances"]) == (1, 2)


def test_consul_not_read_yet_is_unknown_and_an_instance_consul_lacks_is_not_registered() -> None:
    assert {item["health"] for item in view(instances=None)["instances"]} == {"unknown"}
    missing = view(instances=tuple(i for i in lab_instances() if i.service_id != "db-vm2-5432"))
    assert by(missing["instances"], "id")["db-vm2-5432"]["health"] == "not registered"


def test_an_instance_consul_lists_and_the_spec_does_not_is_shown_too() -> None:
    spec = lab_spec()
    from dataclasses import replace

    spec = replace(spec, hosts=spec.hosts[:2])  # dock1 left the spec; Consul still lists it
    found = view(reading=reading(spec))
    stray = by(found["instances"], "id")["api-dock1-api-v2-1"]
    assert (stray["service"], stray["host"], stray["version"], stray["sync"]) == ("api", "dock1", "v2", "unknown")


def test_sync_says_whether_each_proxy_runs_the_controllers_files() -> None:
    keys = {("vm1", "web-8080"): "a" * 64, ("vm2", "api-9090"): "b" * 64, ("vm2", "db-5432"): "c" * 64}
    found = view(reading=reading(wanted=keys, on_hosts={("vm1", "web-8080"): "a" * 64,
                                                        ("vm2", "api-9090"): "old" * 10,
                                                        ("vm2", "db-5432"): "c" * 64,
                                                        ("dock1", "api-api-v2-1"): None},
                                 refused=frozenset({("vm2", "db-5432")}), pushed_at={("vm1", "web-8080"): NOW - 5}))
    sync = {item["id"]: item["sync"] for item in found["instances"]}
    assert sync == {"web-vm1-8080": "in sync", "api-vm2-9090": "pending", "db-vm2-5432": "refused",
                    "api-dock1-api-v2-1": "unreachable"}
    standby = view(reading=reading(leading=False))
    assert {item["sync"] for item in standby["instances"]} == {"standby"}
    assert standby["controller"] == {"host": "ctl1", "holder": "ctl1:4242", "leader": False, "consul_stale_s": 0.0,
                                     "plan_digest": "abcdef012345", "hosts_behind": []}


def test_splits_show_the_versions_and_the_routes_callers_apply() -> None:
    plain = view()["splits"]
    assert plain == [{"service": "api", "versions": ["v1", "v2"], "source": "none", "revision": None,
                      "routes": [], "fault": None}]
    override = TrafficOverride(split=(("v1", 90), ("v2", 10)), revision="r-1")
    split = view(reading=reading(overrides={"api": override}))["splits"][0]
    assert split["source"] == "override" and split["revision"] == "r-1"
    assert split["routes"] == [{"match": None, "to": [{"version": "v1", "weight": 90},
                                                      {"version": "v2", "weight": 10}]}]
    policy = {"routes": [{"match": {"headers": {"x-canary": "1"}}, "to": {"v2": 100}}, {"to": {"v1": 100}}]}
    routed = view(reading=reading(lab_spec({"api": policy})))["splits"][0]
    assert routed["source"] == "inventory"
    assert [route["match"] for route in routed["routes"]] == ["header x-canary=1", None]
    assert routed["routes"][0]["to"] == [{"version": "v2", "weight": 100}]


def test_denials_list_run_time_denies_and_what_the_rbac_filters_refused() -> None:
    db = target("db-5432", "db", "vm2", protocol="tcp")
    api = target("api-9090", "api", "vm2")
    text_api = (PromText()
                .counter("envoy_http_rbac_denied", {"envoy_rbac_http_prefix": "mesh_authz_deny_"}, 3)
                .counter("envoy_http_rbac_denied", {"envoy_rbac_http_prefix": "mesh_authz_allow_"}, 4)
                .counter("envoy_http_rbac_shadow_denied", {"envoy_rbac_http_prefix": "mesh_authz_allow_"}, 50)
                .counter("envoy_http_rbac_allowed", {"envoy_rbac_http_prefix": "mesh_authz_allow_"}, 70).text())
    text_db = PromText().counter("envoy_rbac_denied", {"envoy_rbac_prefix": "mesh_authz_deny"}, 2).text()
    latest = snapshot(scrape_of(api, text_api, 1.0), scrape_of(db, text_db, 1.0))
    found = view(reading=reading(denies={"db": AuthzOverride(("web",), "a-1"), "api": AuthzOverride((), "a-0")}),
                 latest=latest)
    assert found["denials"]["denies"] == [{"service": "db", "deny_from": ["web"], "revision": "a-1"}]
    assert found["denials"]["rbac"] == [{"service": "api", "denied": 7}, {"service": "db", "denied": 2}]
    assert by(found["services"], "name")["api"]["denied"] == 7
