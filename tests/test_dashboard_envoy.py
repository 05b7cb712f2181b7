"""What the dashboard scrapes, from real Envoys on loopback (no lab): FleetFetcher asks each proxy only for the
stats the dashboard reads (`?usedonly&filter=`), a small part of the full text, and the fleet's numbers from it
are those of the full text: web -> api (HTTP, some requests failing) and web -> db (TCP).

The mesh and its Envoys are test_telemetry_envoy's; the apps test_telemetry_fleet_envoy's."""

from __future__ import annotations

import http.server
import socketserver
from pathlib import Path

import pytest
from test_telemetry_envoy import WAIT_S, _Echo, serving, start_mesh, three_services
from test_telemetry_fleet_envoy import _Api, echo, get

from mesh.dashboard.gather import FleetFetcher
from mesh.telemetry.fleet import FleetNumbers, FleetSnapshot, fleet_numbers, scrape
from mesh.telemetry.scrape import DirectFetcher
from mesh.telemetry.targets import proxy_targets
from mesh.testing.loopback import eventually, stop_envoys

OK, FAILED, CONNECTIONS = 6, 2, 3


def counted(before: FleetSnapshot, after: FleetSnapshot) -> dict[str, float | None]:
    """Requests (connections) per edge and service over the interval, and the edges' error rates."""
    numbers: FleetNumbers = fleet_numbers(before, after)
    at = {(item.target.host, item.target.proxy): item.at for item in before.proxies}
    seconds = {item.target.service: item.at - at[(item.target.host, item.target.proxy)] for item in after.proxies}
    found: dict[str, float | None] = {}
    for edge in numbers.edges:
        found[f"{edge.source}->{edge.destination}"] = round(edge.numbers.rate * seconds[edge.source], 3)
        found[f"{edge.source}->{edge.destination} errors"] = edge.numbers.error_rate
    for service in numbers.services:
        found[service.service] = round(service.numbers.rate * seconds[service.service], 3)
    return found


def test_the_filtered_scrape_is_small_and_gives_the_same_numbers(tmp_path: Path) -> None:
    api_app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    db_app = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    api_app.daemon_threads = db_app.daemon_threads = True
    mesh = three_services(api_app.server_address[1], db_app.server_address[1])
    api_port, db_port = mesh.port_of("web", "api"), mesh.port_of("web", "db")
    targets, full, filtered = proxy_targets(mesh.mesh), DirectFetcher(), FleetFetcher()
    with serving(api_app), serving(db_app):
        envoys = start_mesh(mesh, tmp_path)
        try:
            eventually(lambda: get(api_port, "/") == 200, WAIT_S, "web reaches api", envoys["web"].log)
            eventually(lambda: echo(db_port) == b"ping\n", WAIT_S, "web reaches db", envoys["web"].log)
            before = scrape(targets, full), scrape(targets, filtered)
            assert not before[0].failures and not before[1].failures, before
            assert [get(api_port, "/") for _ in range(OK)] + [get(api_port, "/fail") for _ in range(FAILED)] == \
                [200] * OK + [500] * FAILED
            assert [echo(db_port) for _ in range(CONNECTIONS)] == [b"ping\n"] * CONNECTIONS
            sizes = {target.service: (len(full.fetch(target)), len(filtered.fetch(target))) for target in targets}

            def both() -> tuple[FleetSnapshot, FleetSnapshot] | None:
                found = scrape(targets, full), scrape(targets, filtered)  # Envoy flushes histograms every 5 s
                return found if all(edge.numbers.p99_ms for edge in fleet_numbers(before[1], found[1]).edges) \
                    else None

            after = eventually(both, WAIT_S, "p99 of both edges", envoys["web"].log)
        finally:
            stop_envoys(list(envoys.values()))
    from_full, from_filtered = counted(before[0], after[0]), counted(before[1], after[1])
    assert from_filtered == pytest.approx(from_full)  # the same numbers, summed in another order
    assert from_filtered["web->api"] == pytest.approx(OK + FAILED) and from_filtered["web->db"] == CONNECTIONS
    assert from_filtered["web->api errors"] == pytest.approx(FAILED / (OK + FAILED))
    assert all(small * 4 < whole for whole, small in sizes.values()), sizes  # a quarter of the text at most
