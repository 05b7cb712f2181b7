"""The fleet's numbers from real Envoys on loopback (no lab): web calls api (HTTP, some requests fail) and db
(TCP); `scrape` reads every proxy's metrics port and `fleet_numbers` gives the edges' and services' rates, error
rates and p99, with api's version as the inventory writes it (2.0.1, though Envoy's stat names say 2_0_1).

The mesh and its Envoys are test_telemetry_envoy's (helper B's real-Envoy test of the same stats)."""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
from pathlib import Path
from typing import Any

import pytest
from test_telemetry_envoy import WAIT_S, _Echo, serving, start_mesh, three_services

from mesh.telemetry.fleet import FleetNumbers, FleetSnapshot, fleet_numbers, scrape
from mesh.telemetry.scrape import DirectFetcher
from mesh.telemetry.targets import proxy_targets
from mesh.testing.loopback import eventually, stop_envoys

OK, FAILED, CONNECTIONS = 8, 2, 3


class _Api(http.server.BaseHTTPRequestHandler):
    """200, or 500 on /fail."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def get(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping\n")
        return conn.recv(100)


def interval(before: FleetSnapshot, after: FleetSnapshot, service: str) -> float:
    at = {scrape.target.service: scrape.at for scrape in before.proxies}
    return next(scrape.at - at[service] for scrape in after.proxies if scrape.target.service == service)


def test_rates_error_rates_and_p99_of_real_envoys(tmp_path: Path) -> None:
    api_app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    db_app = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    api_app.daemon_threads = db_app.daemon_threads = True
    mesh = three_services(api_app.server_address[1], db_app.server_address[1])
    api_port, db_port = mesh.port_of("web", "api"), mesh.port_of("web", "db")
    targets, fetcher = proxy_targets(mesh.mesh), DirectFetcher()
    with serving(api_app), serving(db_app):
        envoys = start_mesh(mesh, tmp_path)
        try:
            eventually(lambda: get(api_port, "/") == 200, WAIT_S, "web reaches api", envoys["web"].log)
            eventually(lambda: echo(db_port) == b"ping\n", WAIT_S, "web reaches db", envoys["web"].log)
            before = scrape(targets, fetcher)
            assert not before.failures, before.failures
            assert [get(api_port, "/") for _ in range(OK)] + [get(api_port, "/fail") for _ in range(FAILED)] == \
                [200] * OK + [500] * FAILED
            assert [echo(db_port) for _ in range(CONNECTIONS)] == [b"ping\n"] * CONNECTIONS

            def measured() -> tuple[FleetSnapshot, FleetNumbers] | None:
                after = scrape(targets, fetcher)
                numbers = fleet_numbers(before, after)
                edges = {(edge.source, edge.destination): edge for edge in numbers.edges}
                done = [edges.get(("web", "api")), edges.get(("web", "db"))]
                # Envoy publishes histograms at its stats flush (every 5 s): wait for the p99s
                return (after, numbers) if all(edge and edge.numbers.p99_ms for edge in done) else None

            after, numbers = eventually(measured, WAIT_S, "p99 of both edges", envoys["web"].log)
        finally:
            stop_envoys(list(envoys.values()))
    assert not numbers.failures
    edges = {(edge.source, edge.destination): edge for edge in numbers.edges}
    assert set(edges) == {("web", "api"), ("web", "db")}

    web_api = edges[("web", "api")]
    seconds = interval(before, after, "web")
    assert web_api.protocol == "http"
    assert web_api.numbers.rate * seconds == pytest.approx(OK + FAILED)
    assert web_api.numbers.error_rate == pytest.approx(FAILED / (OK + FAILED))
    assert web_api.numbers.p99_ms is not None and 0 < web_api.numbers.p99_ms < 1000
    assert list(web_api.by_source_version) == ["v1"]
    assert list(web_api.by_destination_version) == ["2.0.1"]  # the callee's count, per its version
    at_api = web_api.by_destination_version["2.0.1"]
    assert at_api.rate * interval(before, after, "api") == pytest.approx(OK + FAILED)
    assert at_api.error_rate == pytest.approx(FAILED / (OK + FAILED))

    web_db = edges[("web", "db")]
    assert web_db.protocol == "tcp"
    assert web_db.numbers.rate * seconds == pytest.approx(CONNECTIONS)
    assert web_db.numbers.error_rate == 0.0

    services = {service.service: service for service in numbers.services}
    api = services["api"]
    assert api.numbers.rate * interval(before, after, "api") == pytest.approx(OK + FAILED)
    assert api.numbers.error_rate == pytest.approx(FAILED / (OK + FAILED))
    assert list(api.by_version) == ["2.0.1"]
    db = services["db"]
    assert (db.protocol, list(db.by_version)) == ("tcp", ["v3"])
    assert db.numbers.rate * interval(before, after, "db") == pytest.approx(CONNECTIONS)
    assert services["web"].numbers.rate == 0.0  # nobody calls web
