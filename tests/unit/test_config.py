"""The pure proxy config computation: names, endpoints, TLS identities, health checks, consistency.

Input is the golden inventory (tests/golden/envoy/input/inventory.yaml); no Envoy runs here.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_render import golden_mesh, workload

from mesh.config import ConfigError, InconsistentConfig, compute_proxy_config, consistent
from mesh.config.model import Endpoint, EndpointMetadata, ProxyConfig


def config(host: str, service: str) -> ProxyConfig:
    mesh = golden_mesh()
    return compute_proxy_config(mesh, workload(mesh, (host, service)))


def test_names_paths_and_admin() -> None:
    cfg = config("vm2", "db")
    assert (cfg.proxy, cfg.node_id, cfg.base_id) == ("db-5432", "db-vm2-5432", 21001)
    assert cfg.config_path == "/etc/mesh/proxies/db-5432/envoy.yaml"
    # Behind the `tls` link, swapped to a new folder with a new key (paths.tls_link).
    assert cfg.secrets.certificate.private_key == "/etc/mesh/proxies/db-5432/tls/key.pem"
    assert cfg.secrets.certificate.certificate_chain == "/etc/mesh/proxies/db-5432/tls/cert.pem"
    assert cfg.secrets.trust_bundle.trusted_ca == "/etc/mesh/proxies/db-5432/ca.pem"  # a copy per proxy
    # admin_port (19001) opens nothing: admin is a socket in the proxy's folder, 0600.
    assert (cfg.admin.socket_path, cfg.admin.mode) == ("/etc/mesh/proxies/db-5432/admin/admin.sock", 0o600)


def test_an_admin_socket_path_too_long_for_a_unix_socket_is_refused() -> None:
    mesh = golden_mesh()
    long = dataclasses.replace(workload(mesh, ("vm2", "db")), service="d" * 90)
    with pytest.raises(ConfigError, match="admin socket path .* is longer than a unix socket allows"):
        compute_proxy_config(mesh, long)


def test_inbound_requires_the_trust_domain_and_has_a_health_chain() -> None:
    inbound = config("vm1", "web").inbound
    assert (inbound.address, inbound.port, inbound.cluster) == ("0.0.0.0", 21000, "local-app")
    assert inbound.tls.spiffe_id_prefix == "spiffe://golden.mesh/"
    assert (inbound.health.server_name, inbound.health.path) == ("health.golden.mesh", "/mesh/health")
    assert (inbound.health.cluster, inbound.health.min_healthy_percent) == ("local-app", 100)


def test_local_app_is_checked_as_the_inventory_says() -> None:
    web = config("vm1", "web").cluster("local-app")
    assert web.endpoints == (Endpoint("127.0.0.1", 8080),)
    assert (web.health_check.kind, web.health_check.http_path, web.health_check.interval_ms) == ("http", "/healthz", 5000)
    db = config("vm2", "db").cluster("local-app").health_check
    assert (db.kind, db.interval_ms, db.timeout_ms) == ("tcp", 3000, 5000)
    pricing = config("vm3", "pricing").cluster("local-app")
    assert pricing.health_check.kind == "grpc" and pricing.http2


def test_upstream_cluster_lists_every_instance_with_mtls_to_its_identity() -> None:
    cfg = config("vm1", "web")
    api = cfg.cluster("upstream-api")
    assert api.endpoints == (Endpoint("10.0.0.12", 21000, EndpointMetadata("api", "v1", "api-vm2-9090", "vm2")),
                             Endpoint("10.0.0.13", 21000, EndpointMetadata("api", "v2", "api-vm3-9090", "vm3")))
    assert api.discovery == "STATIC" and cfg.cluster("upstream-report").discovery == "STRICT_DNS"
    assert api.tls is not None
    assert (api.tls.server_name, api.tls.peer_spiffe_id) == ("api", "spiffe://golden.mesh/svc/api")
    check = api.health_check
    assert (check.kind, check.http_path, check.tls_server_name) == ("http", "/mesh/health", "health.golden.mesh")
    assert check.interval_ms <= 1000 and check.unhealthy_threshold <= 3
    assert api.outlier_detection is not None and api.outlier_detection.base_ejection_time_ms == 10_000


def test_outbound_listeners_follow_the_upstream_protocol() -> None:
    cfg = config("vm2", "api")
    db, pricing = cfg.outbound
    assert (db.address, db.port, db.protocol, db.cluster, db.route) == (
        "127.0.0.1", 19102, "tcp", "upstream-db", None)
    assert (pricing.port, pricing.protocol) == (19103, "grpc") and pricing.route is not None
    (only,) = pricing.route.routes
    assert 1 <= only.retry_policy.num_retries <= 2 and "connect-failure" in only.retry_policy.retry_on
    assert cfg.cluster("upstream-pricing").http2 and not cfg.cluster("upstream-db").http2
    assert cfg.cluster("upstream-db").endpoints == (
        Endpoint("10.0.0.12", 21001, EndpointMetadata("db", "v1", "db-vm2-5432", "vm2")),)


def test_stat_names_say_who_calls_whom_and_the_callee_knows_its_callers() -> None:
    web, api = config("vm1", "web"), config("vm3", "api")  # api on vm3 is version v2
    assert web.cluster("upstream-api").stat_name == web.outbound[0].stat_prefix == "outbound|web|v1|api"
    assert api.cluster("local-app").stat_name == api.inbound.stat_prefix == "inbound|api|v2"
    assert [(c.service, c.header, c.suffix) for c in api.inbound.callers] == [
        ("web", "x-forwarded-client-cert", ";URI=spiffe://golden.mesh/svc/web")]
    assert web.inbound.callers == ()  # nobody calls web
    # the mesh's IP literal addresses are internal (vm4's address is a name)
    assert api.inbound.internal_cidrs == ("10.0.0.3/32", "10.0.0.11/32", "10.0.0.12/32", "10.0.0.13/32")
    assert web.outbound[0].route is not None
    assert dict(web.outbound[0].route.routes[0].request_headers) == {"x-mesh-source-service": "web", "x-mesh-source-version": "v1",
                                                     "x-mesh-source-instance": "web-vm1-8080"}
    assert web.metrics is not None and (web.metrics.port, web.metrics.path) == (20000, "/stats/prometheus")


def test_access_log_fields_are_the_designed_ones() -> None:
    web, db = config("vm1", "web"), config("vm2", "db")
    outbound = dict(web.outbound[0].access_log.fields)
    assert outbound["mesh"] == "access" and outbound["direction"] == "outbound" and outbound["mtls"] is True
    assert outbound["destination_identity"] == "%UPSTREAM_PEER_URI_SAN%"
    assert outbound["destination_version"] == "%METADATA(UPSTREAM_HOST:mesh:version)%"
    assert outbound["request_id"] == "%REQ(X-REQUEST-ID)%" and outbound["status"] == "%RESPONSE_CODE%"
    tcp_inbound = dict(db.inbound.access_log.fields)
    assert tcp_inbound["protocol"] == "tcp" and tcp_inbound["source_identity"] == "%DOWNSTREAM_PEER_URI_SAN%"
    assert "request_id" not in tcp_inbound and "source_service" not in tcp_inbound
    assert tcp_inbound["destination_instance"] == "db-vm2-5432" == tcp_inbound["proxy"]


def test_no_upstreams_means_only_the_inbound_side() -> None:
    cfg = config("vm4", "report")
    assert cfg.outbound == () and [c.name for c in cfg.clusters] == ["local-app"]


def test_computation_is_pure_and_repeatable() -> None:
    assert config("vm1", "web") == config("vm1", "web")


def test_consistent_accepts_computed_configs() -> None:
    mesh = golden_mesh()
    for each in mesh.workloads:
        consistent(compute_proxy_config(mesh, each))


def test_consistent_refuses_a_dangling_cluster_or_secret() -> None:
    cfg = config("vm1", "web")
    with pytest.raises(InconsistentConfig, match="'upstream-api'"):
        consistent(dataclasses.replace(cfg, clusters=tuple(c for c in cfg.clusters if c.name != "upstream-api")))
    renamed = dataclasses.replace(cfg.secrets, trust_bundle=dataclasses.replace(cfg.secrets.trust_bundle, name="x"))
    with pytest.raises(InconsistentConfig, match="trust bundle secret 'mesh-ca'"):
        consistent(dataclasses.replace(cfg, secrets=renamed))


def test_consistent_refuses_two_listeners_on_one_port() -> None:
    cfg = config("vm1", "web")
    clash = dataclasses.replace(cfg.outbound[0], port=cfg.inbound.port)
    with pytest.raises(InconsistentConfig, match=f"port {cfg.inbound.port} appears 2 times"):
        consistent(dataclasses.replace(cfg, outbound=(clash, *cfg.outbound[1:])))


def test_grpc_health_needs_an_http2_app() -> None:
    mesh = golden_mesh()
    report = workload(mesh, ("vm4", "report"))
    grpc_checked = dataclasses.replace(report, health=dataclasses.replace(report.health, kind="grpc"))
    with pytest.raises(ConfigError, match="report-8000: health {grpc: true} needs protocol grpc or http2"):
        compute_proxy_config(mesh, grpc_checked)


def test_instances_must_agree_on_the_protocol() -> None:
    mesh = golden_mesh()
    vm3 = mesh.host("vm3")
    odd_api = dataclasses.replace(vm3.workloads[0], protocol="http2")
    hosts = tuple(dataclasses.replace(h, workloads=(odd_api, *h.workloads[1:])) if h.name == "vm3" else h
                  for h in mesh.hosts)
    odd = dataclasses.replace(mesh, hosts=hosts)
    with pytest.raises(ConfigError, match="upstream 'api': its instances disagree on the protocol"):
        compute_proxy_config(odd, workload(odd, ("vm1", "web")))
