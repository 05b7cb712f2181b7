"""Reading a proxy's metrics: HTTP GET /stats/prometheus straight or over a tunnel's socket, errors as
FetchError, and the fetcher chosen (the first controller that answers SSH, else direct)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from telemetry_samples import telemetry_mesh

from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost
from mesh.telemetry.scrape import DirectFetcher, FetchError, TunnelFetcher, fetcher_for
from mesh.telemetry.targets import ProxyTarget, proxy_targets
from mesh.testing.fake_connector import FakeConnector, FakeFleet

METRICS = "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n" + "".join(
    f"# TYPE envoy_c{n} counter\nenvoy_c{n}{{envoy_cluster_name=\"c\"}} {n}\n" for n in range(6000))  # ~250 KB
CHUNK = 0xF000  # Envoy's admin sends 60 KiB chunks


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked answers, as Envoy streams its stats
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.seen.append(self.path)
        if self.path != "/stats/prometheus":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # as Envoy answers a request that says so
        self.end_headers()
        for start in range(0, len(METRICS), CHUNK):
            part = METRICS[start:start + CHUNK]
            self.wfile.write(f"{len(part):x}\r\n{part}\r\n".encode())
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def local_target(port: int) -> ProxyTarget:
    return replace(proxy_targets(telemetry_mesh())[0], address="127.0.0.1", port=port)


def test_direct_reads_the_metrics_path(server: int) -> None:
    assert DirectFetcher().fetch(local_target(server)) == METRICS
    assert Handler.seen[-1] == "/stats/prometheus"


def test_a_refused_or_wrong_answer_is_a_fetch_error(server: int) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    with pytest.raises(FetchError, match=rf"^127\.0\.0\.1:{closed}: .*refused"):
        DirectFetcher().fetch(local_target(closed))


class Channel:
    """A paramiko channel's calls, over a socket: recv gives at most 1000 bytes, as a channel gives what came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, size: int) -> bytes:
        return self.sock.recv(min(size, 1000))

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()


class Tunnels:
    """open_tunnel as SSHConnector's: here a channel to the local server, whatever the target."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.asked: list[tuple[str, int]] = []
        self.closed = False

    def open_tunnel(self, address: str, port: int) -> Channel:
        self.asked.append((address, port))
        if self.port is None:
            raise ConnectionRefusedError(f"ctl1 cannot connect to {address}:{port}: Connection refused")
        return Channel(socket.create_connection(("127.0.0.1", self.port)))

    def close(self) -> None:
        self.closed = True


def test_through_a_tunnel_the_controller_connects_to_the_target(server: int) -> None:
    tunnels = Tunnels(server)
    target = proxy_targets(telemetry_mesh())[3]
    fetcher = TunnelFetcher(tunnels, "ctl1")
    assert fetcher.fetch(target) == METRICS
    assert tunnels.asked == [("fd00::20", 20000)]
    assert fetcher.via == "through ctl1"
    fetcher.close()
    assert tunnels.closed


def test_a_tunnel_the_controller_cannot_open_is_a_fetch_error() -> None:
    target = proxy_targets(telemetry_mesh())[0]
    with pytest.raises(FetchError, match=r"^10\.77\.0\.11:20000: ctl1 cannot connect to 10\.77\.0\.11:20000"):
        TunnelFetcher(Tunnels(None), "ctl1").fetch(target)


class TunnelConnector(FakeConnector):
    def open_tunnel(self, address: str, port: int) -> socket.socket:
        raise AssertionError("not in this test")


def test_the_first_controller_that_answers_carries_the_scrapes() -> None:
    fleet = FakeFleet()
    mesh = telemetry_mesh()
    ctl2 = ManagedHost("ctl2", "vm", mesh.hosts[0].connection, is_controller=True)
    mesh = replace(mesh, hosts=(*mesh.hosts, ctl2))
    fleet.host("ctl1").unreachable = "cannot connect to 10.77.0.3:22: timed out"

    def factory(host: ManagedHost) -> TunnelConnector:
        return TunnelConnector(fleet.host(host.name))

    assert fetcher_for(mesh, factory).via == "through ctl2"
    fleet.host("ctl2").unreachable = "cannot connect: timed out"
    assert isinstance(fetcher_for(mesh, factory), DirectFetcher)


def test_without_a_controller_the_scrapes_are_direct() -> None:
    mesh = telemetry_mesh()
    mesh = replace(mesh, hosts=tuple(host for host in mesh.hosts if not host.is_controller))

    def factory(host: ManagedHost) -> FakeConnector:
        raise HostUnreachable(host.name, "not asked")

    assert fetcher_for(mesh, factory).via == "direct"
