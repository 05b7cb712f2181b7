"""What mesh's proxies report, with real Envoys on loopback (no lab): `web` calls `api` (HTTP) and `db` (TCP).

One HTTP request with a known x-request-id and one TCP connection; then (a) the caller's and the callee's JSON
access lines carry the id, identities, services, versions and instances; (b) each proxy's metrics port serves
Prometheus text that prometheus_client parses, with the request under mesh's labels; (c) the metrics port answers
nothing of the admin API but `GET /stats/prometheus`.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mesh.config import compute_proxy_config
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.render import ProxyFiles, render_proxy_files, validate_proxy_files
from mesh.testing.loopback import (
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    proxy_config_in,
    start_proxy,
    stop_envoys,
)

TRUST_DOMAIN = "loop.mesh"
ADDRESSES = {"web": "127.0.0.2", "api": "127.0.0.3", "db": "127.0.0.4"}
VERSIONS = {"web": "v1", "api": "2.0.1", "db": "v3"}  # api's '.' is written '_' in stat names (labels too)
REQUEST_ID = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
WAIT_S = 30.0


# --- the apps: api answers with the headers it saw, db echoes ---

class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = json.dumps({name.lower(): value for name, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# --- the mesh ---

@dataclass(frozen=True)
class ThreeServices:
    mesh: Mesh
    workloads: dict[str, Workload]

    def port_of(self, caller: str, upstream: str) -> int:
        return next(u.local_port for u in self.workloads[caller].upstreams if u.service == upstream)


def three_services(api_port: int, db_port: int) -> ThreeServices:
    def workload(service: str, port: int, **extra: Any) -> Workload:
        address = ADDRESSES[service]
        return Workload(f"h-{service}", 0, service, port, TRUST_DOMAIN, version=VERSIONS[service],
                        proxy_port=free_port(address), admin_port=free_port(), metrics_port=free_port(address), **extra)

    second = datetime.timedelta(seconds=1)
    workloads = {
        "web": workload("web", free_port(), upstreams=(Upstream("api", free_port()), Upstream("db", free_port()))),
        "api": workload("api", api_port, health=Health("http", "/healthz", second, second)),
        "db": workload("db", db_port, protocol="tcp", health=Health("tcp", None, second, second)),
    }
    hosts = tuple(ManagedHost(w.host, "vm", Connection(ADDRESSES[name]), (w,)) for name, w in workloads.items())
    services = MappingProxyType({w.service: (w,) for w in workloads.values()})
    return ThreeServices(Mesh(MeshSettings(trust_domain=TRUST_DOMAIN), hosts, (), services), workloads)


def start_mesh(mesh: ThreeServices, folder: Path) -> dict[str, RunningEnvoy]:
    identities = issue_identities(folder / "state", TRUST_DOMAIN, tuple(mesh.workloads.values()))
    files: dict[str, ProxyFiles] = {}
    for name, workload in mesh.workloads.items():
        cfg = proxy_config_in(compute_proxy_config(mesh.mesh, workload), folder / name, ADDRESSES[name])
        files[name] = render_proxy_files(cfg)
        validate_proxy_files(files[name], identities[name].root)
        lay_out_proxy(files[name], identities[name])
    envoys: dict[str, RunningEnvoy] = {}
    try:
        for (name, proxy_files), base_id in zip(files.items(), free_base_ids(len(files)), strict=True):
            envoys[name] = start_proxy(name, proxy_files, base_id)
    except BaseException:
        stop_envoys(list(envoys.values()))
        raise
    return envoys


# --- reading what the proxies report ---

def access_lines(envoy: RunningEnvoy) -> list[dict[str, Any]]:
    """The JSON access lines in an Envoy's output (its log holds its own warnings too)."""
    found = []
    for line in envoy.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and item.get("mesh") == "access":
                found.append(item)
    return found


def the_line(envoy: RunningEnvoy, **wanted: Any) -> dict[str, Any] | None:
    lines = [line for line in access_lines(envoy) if all(line.get(k) == v for k, v in wanted.items())]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


def metrics_request(workload: Workload, method: str, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(ADDRESSES[workload.service], workload.metrics_port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def samples(workload: Workload) -> list[tuple[str, str, dict[str, str], float]]:
    """(family, sample name, labels, value) of everything a proxy's metrics port serves, as prometheus_client reads it:
    a counter's samples are named `<family>_total` (Envoy's `envoy_cluster_upstream_rq{envoy_response_code=..}` and
    `envoy_cluster_upstream_rq_total` both read as family envoy_cluster_upstream_rq, samples ..._rq_total: the
    per-code ones are those with an envoy_response_code label)."""
    status, text = metrics_request(workload, "GET", "/stats/prometheus")
    assert status == 200, text[:500]
    return [(family.name, sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def flushed(found: list[tuple[str, str, dict[str, str], float]], name: str, labels: dict[str, str]) \
        -> list[tuple[str, str, dict[str, str], float]] | None:
    """`found` once a sample `name` with these labels counts something (else None: not flushed yet)."""
    return found if any(sample == name and labels.items() <= have.items() and v >= 1
                        for _family, sample, have, v in found) else None


def value(found: list[tuple[str, str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called `name` that carry at least these labels."""
    matching = [v for _family, sample, have, v in found if sample == name and labels.items() <= have.items()]
    assert matching, f"no sample {name} with {labels}: " + str(sorted({s for _f, s, _l, _v in found})[:400])
    return sum(matching)


# --- the test ---

def test_one_request_and_one_connection_are_logged_and_counted_under_mesh_labels(tmp_path: Path) -> None:
    api_app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    db_app = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    api_app.daemon_threads = db_app.daemon_threads = True
    mesh = three_services(api_app.server_address[1], db_app.server_address[1])
    web, api, db = (mesh.workloads[name] for name in ("web", "api", "db"))
    with serving(api_app), serving(db_app):
        envoys = start_mesh(mesh, tmp_path)
        try:
            # the HTTP request, with an id and a forged caller header the caller's Envoy must overwrite
            def call_api() -> dict[str, str] | None:
                connection = http.client.HTTPConnection("127.0.0.1", mesh.port_of("web", "api"), timeout=10)
                try:
                    connection.request("GET", "/orders/7?x=1", headers={"x-request-id": REQUEST_ID,
                                                                        "x-mesh-source-service": "forged",
                                                                        "user-agent": "telemetry-test"})
                    response = connection.getresponse()
                    body = response.read()
                    return json.loads(body) if response.status == 200 else None
                finally:
                    connection.close()

            seen_by_api = eventually(call_api, WAIT_S, "web reaches api", envoys["web"].log)

            def echo_db() -> bytes:
                with socket.create_connection(("127.0.0.1", mesh.port_of("web", "db")), timeout=10) as conn:
                    conn.sendall(b"ping\n")
                    return conn.recv(100)

            assert eventually(echo_db, WAIT_S, "web reaches db", envoys["web"].log) == b"ping\n"
            assert seen_by_api["x-request-id"] == REQUEST_ID
            assert seen_by_api["x-mesh-source-service"] == "web"

            # (a) the access lines: caller and callee of the HTTP hop, both ends of the TCP connection
            caller = eventually(lambda: the_line(envoys["web"], request_id=REQUEST_ID, direction="outbound"),
                                WAIT_S, "web's outbound line", envoys["web"].log)
            callee = eventually(lambda: the_line(envoys["api"], request_id=REQUEST_ID, direction="inbound"),
                                WAIT_S, "api's inbound line", envoys["api"].log)
            web_id, api_id, db_id = (f"spiffe://{TRUST_DOMAIN}/svc/{name}" for name in ("web", "api", "db"))
            hop = {"source_identity": web_id, "destination_identity": api_id, "source_service": "web",
                   "source_version": "v1", "source_instance": web.consul_id, "destination_service": "api",
                   "destination_version": "2.0.1", "destination_instance": api.consul_id, "protocol": "http",
                   "method": "GET", "path": "/orders/7?x=1", "status": 200, "mtls": True,
                   "user_agent": "telemetry-test"}
            for line, proxy in ((caller, web.consul_id), (callee, api.consul_id)):
                assert {key: line.get(key) for key in hop} == hop, line
                assert line["proxy"] == proxy
                assert isinstance(line["bytes_sent"], int) and line["bytes_sent"] > 0
                assert isinstance(line["duration_ms"], int)
                assert line["time"].endswith("Z") and datetime.datetime.fromisoformat(line["time"][:-1])
                assert line["response_flags"] == "-"  # Envoy's "no flag"
            assert caller["upstream_host"] == f"{ADDRESSES['api']}:{api.proxy_port}"
            assert callee["upstream_host"] == f"127.0.0.1:{api.port}"
            # (web's Envoy connects from 127.0.0.1 here: on loopback the kernel picks that source address)
            assert callee["source_address"].startswith("127.0.0.") and caller["source_address"].startswith("127.0.0.1:")

            tcp_out = eventually(lambda: the_line(envoys["web"], protocol="tcp", direction="outbound"), WAIT_S,
                                 "web's TCP line", envoys["web"].log)
            tcp_in = eventually(lambda: the_line(envoys["db"], protocol="tcp", direction="inbound"), WAIT_S,
                                "db's TCP line", envoys["db"].log)
            connection = {"source_identity": web_id, "destination_identity": db_id, "destination_service": "db",
                          "mtls": True, "bytes_received": 5, "bytes_sent": 5}
            for line in (tcp_out, tcp_in):
                assert {key: line.get(key) for key in connection} == connection, line
                assert "request_id" not in line and isinstance(line["duration_ms"], int)
            assert {key: tcp_out[key] for key in ("source_service", "source_version", "source_instance",
                                                  "destination_version", "destination_instance")} \
                == {"source_service": "web", "source_version": "v1", "source_instance": web.consul_id,
                    "destination_version": "v3", "destination_instance": db.consul_id}
            assert tcp_in.get("source_service") is None and tcp_in["destination_instance"] == db.consul_id

            # (b) Prometheus text with mesh's labels (histograms show at Envoy's next stats flush, every 5 s)
            edge = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
            callee_labels = {"destination_service": "api", "destination_version": "2_0_1"}
            at_web = eventually(lambda: flushed(samples(web), "envoy_cluster_upstream_rq_time_count", edge), WAIT_S,
                                "web's latency histogram counts the request", envoys["web"].log)
            at_api = eventually(lambda: flushed(samples(api), "envoy_vhost_vcluster_upstream_rq_time_count",
                                                {**callee_labels, "source_service": "web"}), WAIT_S,
                                "api's latency histogram counts the request", envoys["api"].log)
            at_db = samples(db)
            families = {family for family, _sample, _labels, _value in at_web}
            assert {"envoy_cluster_upstream_rq", "envoy_cluster_upstream_rq_xx", "envoy_cluster_upstream_rq_time",
                    "envoy_cluster_upstream_cx", "envoy_cluster_upstream_cx_connect_fail"} <= families
            assert value(at_web, "envoy_cluster_upstream_rq_total", **edge, envoy_response_code="200") >= 1
            assert value(at_web, "envoy_cluster_upstream_rq_xx_total", **edge, envoy_response_code_class="2") >= 1
            assert value(at_web, "envoy_cluster_upstream_rq_time_count", **edge) >= 1
            assert value(at_web, "envoy_cluster_upstream_rq_time_bucket", **edge, le="+Inf") >= 1
            tcp_edge = {"source_service": "web", "source_version": "v1", "destination_service": "db"}
            assert value(at_web, "envoy_cluster_upstream_cx_total", **tcp_edge) >= 1
            assert value(at_web, "envoy_cluster_upstream_cx_rx_bytes_total", **tcp_edge) >= 5
            assert value(at_web, "envoy_cluster_upstream_cx_tx_bytes_total", **tcp_edge) >= 5
            assert value(at_web, "envoy_cluster_upstream_cx_connect_fail_total", **tcp_edge) == 0
            assert value(at_web, "envoy_http_downstream_rq_xx_total", source_service="web", destination_service="api",
                         envoy_response_code_class="2") >= 1
            assert value(at_web, "envoy_tcp_downstream_cx_total", source_service="web", destination_service="db") >= 1

            assert value(at_api, "envoy_http_downstream_rq_xx_total", **callee_labels, envoy_response_code_class="2") >= 1
            assert value(at_api, "envoy_http_downstream_rq_time_bucket", **callee_labels, le="+Inf") >= 1
            assert value(at_api, "envoy_vhost_vcluster_upstream_rq_total", **callee_labels, source_service="web",
                         envoy_response_code="200") >= 1
            assert value(at_api, "envoy_vhost_vcluster_upstream_rq_time_bucket", **callee_labels,
                         source_service="web", le="+Inf") >= 1
            assert value(at_api, "envoy_cluster_upstream_rq_total", **callee_labels, envoy_response_code="200") >= 1
            assert value(at_db, "envoy_tcp_downstream_cx_total", destination_service="db",
                         destination_version="v3") >= 1

            # (c) nothing of the admin API but GET /stats/prometheus
            for method, path in (("GET", "/config_dump"), ("GET", "/quitquitquit"), ("POST", "/quitquitquit"),
                                 ("GET", "/stats"), ("POST", "/stats/prometheus"), ("GET", "/clusters"),
                                 ("GET", "/stats/prometheus/../config_dump"), ("GET", "/")):
                status, _body = metrics_request(web, method, path)
                assert status == 404, (method, path, status)
            assert all(envoy.process.poll() is None for envoy in envoys.values())
            assert envoys["web"].admin("/ready").strip() == "LIVE"
        finally:
            stop_envoys(list(envoys.values()))
