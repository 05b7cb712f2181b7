"""A proxy's tracing from `mesh_tracing`: every connection manager of app traffic traces (outbound HTTP listeners, the
inbound app chain and a permissive service's plaintext chain; never the health chain or the metrics listener),
with the spans' tags and the tracer that sends them to mesh's collector (every controller, mTLS, the controllers'
SPIFFE id) or to an outside Zipkin or OTLP collector; the access lines carry the trace id. Goldens in
tests/golden/envoy/tracing-*."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from golden_folders import check_golden_folder

from mesh.config import compute_proxy_config
from mesh.config.model import ProxyConfig
from mesh.config.tracing import SYSTEM_CA_BUNDLE, TRACE_CLUSTER, TRACE_PORT
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh, TracingSettings
from mesh.inventory.policy import ServicePolicy
from mesh.inventory.validate import build_mesh
from mesh.render import ProxyFiles, render_proxy_files

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "envoy"
INVENTORY = GOLDEN / "input" / "inventory.yaml"
MESH_COLLECTOR = TracingSettings("mesh", 100.0)
ZIPKIN_HTTPS = TracingSettings("zipkin", 12.5, "https://zipkin.example.internal:9411", "https",
                               "zipkin.example.internal", 9411, None)
OTLP_HTTP = TracingSettings("otlp", 5.0, "http://10.9.0.7:4318/otel/v1/traces", "http", "10.9.0.7", 4318,
                            "/otel/v1/traces")


def traced_mesh(tracing: TracingSettings | None, permissive: bool = False) -> Mesh:
    """The golden inventory's mesh (controller ctl1 at 10.0.0.3) with `mesh_tracing`, and api permissive."""
    mesh = build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))
    policies = MappingProxyType({"api": ServicePolicy(mtls="permissive")}) if permissive else mesh.policies
    return replace(mesh, settings=replace(mesh.settings, tracing=tracing), policies=policies)


def config(mesh: Mesh, host: str, service: str) -> ProxyConfig:
    return compute_proxy_config(mesh, next(w for w in mesh.workloads if (w.host, w.service) == (host, service)))


def resources(files: ProxyFiles, name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load(files.file(f"{files.proxy_dir}/xds/{name}").content)["resources"])


def managers(listener: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The HTTP connection managers of a listener, by filter chain name (`` for an unnamed one)."""
    return {chain.get("name", ""): flt["typed_config"] for chain in listener["filter_chains"]
            for flt in chain["filters"] if flt["name"] == "envoy.filters.network.http_connection_manager"}


def tags(manager: dict[str, Any]) -> dict[str, str]:
    return {tag["tag"]: tag["literal"]["value"] for tag in manager["tracing"]["custom_tags"]}


def test_no_mesh_tracing_no_tracer_and_the_trace_id_is_null() -> None:
    files = render_proxy_files(config(traced_mesh(None), "vm1", "web"))
    listeners = resources(files, "lds.yaml")
    assert all("tracing" not in manager for listener in listeners for manager in managers(listener).values())
    assert TRACE_CLUSTER not in [cluster["name"] for cluster in resources(files, "cds.yaml")]
    outbound = managers(next(item for item in listeners if item["name"] == "outbound-api"))[""]
    assert outbound["access_log"][0]["typed_config"]["log_format"]["json_format"]["trace_id"] == "%TRACE_ID%"


def test_every_app_connection_manager_traces_with_its_tags() -> None:
    files = render_proxy_files(config(traced_mesh(MESH_COLLECTOR, permissive=True), "vm2", "api"))
    by_name = {listener["name"]: listener for listener in resources(files, "lds.yaml")}
    inbound = managers(by_name["inbound"])
    assert set(inbound) == {"health", "app", "plaintext"}
    assert "tracing" not in inbound["health"]
    assert by_name["inbound"]["traffic_direction"] == "INBOUND"
    expected = {"mesh.service": "api", "mesh.version": "v1", "mesh.proxy": "api-9090", "mesh.host": "vm2",
                "mesh.instance": "api-vm2-9090", "mesh.direction": "inbound"}
    assert tags(inbound["app"]) == tags(inbound["plaintext"]) == expected
    pricing = managers(by_name["outbound-pricing"])[""]  # grpc: HTTP/2, traced too
    assert tags(pricing) == {**expected, "mesh.direction": "outbound", "mesh.upstream": "pricing"}
    assert by_name["outbound-pricing"]["traffic_direction"] == "OUTBOUND"
    assert "filter_chains" in by_name["outbound-db"] and not managers(by_name["outbound-db"])  # TCP: no spans
    assert "traffic_direction" not in by_name["outbound-db"]
    assert all("tracing" not in manager for manager in managers(by_name["metrics"]).values())
    zipkin = inbound["app"]["tracing"]["provider"]
    assert zipkin["name"] == "envoy.tracers.zipkin"
    assert {key: value for key, value in zipkin["typed_config"].items() if key != "@type"} == {
        "collector_cluster": TRACE_CLUSTER, "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", "collector_hostname": TRACE_CLUSTER, "trace_id_128bit": True,
        "shared_span_context": False, "trace_context_option": "USE_B3_WITH_W3C_PROPAGATION"}
    assert inbound["app"]["tracing"]["random_sampling"] == {"value": 100.0}
    assert inbound["app"]["request_id_extension"]["typed_config"]["pack_trace_reason"] is False


def test_meshs_collector_is_every_controller_with_mtls() -> None:
    mesh = traced_mesh(MESH_COLLECTOR)
    second = replace(mesh.controllers[0], name="ctl2", connection=replace(mesh.controllers[0].connection,
                                                                          address="10.0.0.4"))
    mesh = replace(mesh, hosts=(*mesh.hosts, second))
    files = render_proxy_files(config(mesh, "vm1", "web"))
    cluster = next(item for item in resources(files, "cds.yaml") if item["name"] == TRACE_CLUSTER)
    assert cluster["type"] == "STATIC"
    addresses = [(e["endpoint"]["address"]["socket_address"]["address"],
                  e["endpoint"]["address"]["socket_address"]["port_value"])
                 for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert addresses == [("10.0.0.3", TRACE_PORT), ("10.0.0.4", TRACE_PORT)]
    tls = cluster["transport_socket"]["typed_config"]
    context = tls["common_tls_context"]
    assert context["tls_certificate_sds_secret_configs"][0]["name"] == "proxy-cert"
    validation = context["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://golden.mesh/mesh/controller"}}]
    assert validation["validation_context_sds_secret_config"]["name"] == "mesh-ca"
    assert "health_checks" not in cluster  # spans are sent when there are some; nothing probes the receivers


def test_an_outside_https_zipkin_is_checked_against_the_hosts_cas() -> None:
    files = render_proxy_files(config(traced_mesh(ZIPKIN_HTTPS), "vm1", "web"))
    cluster = next(item for item in resources(files, "cds.yaml") if item["name"] == TRACE_CLUSTER)
    assert cluster["type"] == "STRICT_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"] == {"address": "zipkin.example.internal", "port_value": 9411}
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "zipkin.example.internal"
    assert tls["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "zipkin.example.internal"}}]}
    outbound = managers(next(item for item in resources(files, "lds.yaml") if item["name"] == "outbound-api"))[""]
    zipkin = outbound["tracing"]["provider"]["typed_config"]
    assert (zipkin["collector_endpoint"], zipkin["collector_hostname"]) == ("/api/v2/spans",
                                                                          "zipkin.example.internal:9411")
    assert outbound["tracing"]["random_sampling"] == {"value": 12.5}


def test_an_outside_otlp_collector_over_http() -> None:
    files = render_proxy_files(config(traced_mesh(OTLP_HTTP), "vm1", "web"))
    cluster = next(item for item in resources(files, "cds.yaml") if item["name"] == TRACE_CLUSTER)
    assert cluster["type"] == "STATIC" and "transport_socket" not in cluster
    outbound = managers(next(item for item in resources(files, "lds.yaml") if item["name"] == "outbound-api"))[""]
    provider = outbound["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["http_service"]["http_uri"] == {
        "uri": "http://10.9.0.7:4318/otel/v1/traces", "cluster": TRACE_CLUSTER, "timeout": "1s"}
    assert provider["typed_config"]["service_name"] == "web"


# --- goldens ---

GOLDENS = {
    "tracing-api-mesh-permissive": (lambda: traced_mesh(MESH_COLLECTOR, permissive=True), ("vm2", "api")),
    "tracing-web-zipkin-https": (lambda: traced_mesh(ZIPKIN_HTTPS), ("vm1", "web")),
    "tracing-web-otlp": (lambda: traced_mesh(OTLP_HTTP), ("vm1", "web")),
}


def golden_files(case: str) -> ProxyFiles:
    build, (host, service) = GOLDENS[case]
    return render_proxy_files(config(build(), host, service))


@pytest.mark.parametrize("case", GOLDENS)
def test_tracing_goldens(case: str, update_goldens: bool) -> None:
    files = golden_files(case)
    check_golden_folder(files, GOLDEN / case, update_goldens)


def test_controllers_named_by_host_name_are_resolved_by_envoy() -> None:
    mesh = traced_mesh(MESH_COLLECTOR)
    named = replace(mesh.controllers[0], connection=replace(mesh.controllers[0].connection, address="ctl1.golden"))
    mesh = replace(mesh, hosts=tuple(named if host.is_controller else host for host in mesh.hosts))
    tracer = config(mesh, "vm1", "web").tracer
    assert tracer is not None and tracer.discovery == "STRICT_DNS"
    assert [(endpoint.address, endpoint.port) for endpoint in tracer.endpoints] == [("ctl1.golden", TRACE_PORT)]


def test_an_outside_collector_at_an_ipv6_address() -> None:
    settings = TracingSettings("zipkin", 1.0, "https://[fd00::7]/spans", "https", "fd00::7", 443, "/spans")
    tracer = config(traced_mesh(settings), "vm1", "web").tracer
    assert tracer is not None and tracer.outside_tls is not None
    assert (tracer.hostname, tracer.endpoint, tracer.discovery) == ("[fd00::7]", "/spans", "STATIC")
    assert (tracer.outside_tls.server_name, tracer.outside_tls.san_type, tracer.outside_tls.san) == \
        ("", "IP_ADDRESS", "fd00::7")
    files = render_proxy_files(config(traced_mesh(settings), "vm1", "web"))
    cluster = next(item for item in resources(files, "cds.yaml") if item["name"] == TRACE_CLUSTER)
    assert "sni" not in cluster["transport_socket"]["typed_config"]  # no SNI with an IP address
