"""`mesh dashboard` (mesh.dashboard.command) with fakes for Consul's lock and the SSH channels: it picks the
controller holding the lock, checks a dashboard answers there, forwards a local port to it (each connection a
channel of its own, both ways), prints the URL, opens the browser unless told not to, and exits 0 when stopped;
errors are clear and carry mesh's exit codes."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dashboard_samples import reading
from fleet_samples import FLEET_INVENTORY

from mesh.cli import run
from mesh.dashboard.command import (
    Forwarder,
    active_controller,
    lock_holder,
    probe,
    run_dashboard,
)
from mesh.dashboard.server import DashboardServer
from mesh.dashboard.view import DashboardInputs, dashboard_view
from mesh.errors import EXIT_UNREACHABLE, MeshError, UsageError
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh

TWO_CONTROLLERS = FLEET_INVENTORY.replace("        ctl1: {ansible_host: 10.77.0.3}\n",
                                          "        ctl1: {ansible_host: 10.77.0.3}\n"
                                          "        ctl2: {ansible_host: 10.77.0.4}\n")


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    path = tmp_path / "inventory.yml"
    path.write_text(TWO_CONTROLLERS)
    return check_inventory(load_inventory(str(path)), str(path)).mesh


@pytest.fixture
def dashboard() -> Any:
    """A real dashboard server on loopback (what the controller runs), reached by the fake SSH channels."""
    server = DashboardServer(0, lambda: dashboard_view(DashboardInputs(reading(), now=0.0)), None,
                             lambda: {"host": "ctl2", "leader": True}, poll_interval=0.02).start()
    yield server
    server.stop()


class FakeTunnels:
    """open_tunnel as SSHConnector's: a TCP connection made "on the controller" (here: to the test's server)."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.opened: list[tuple[str, int]] = []

    def opener(self, host: ManagedHost, web_port: int) -> Callable[[], Any]:
        self.host = host.name

        def open_channel() -> Any:
            self.opened.append(("127.0.0.1", web_port))
            if self.port is None:
                raise ConnectionRefusedError(f"{host.name} cannot connect to 127.0.0.1:{web_port}: refused")
            return socket.create_connection(("127.0.0.1", self.port), timeout=5)

        return open_channel


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_the_lock_names_the_active_controllers_host() -> None:
    assert lock_holder(json.dumps({"holder": "ctl2:4242"}), "session-1") == "ctl2"
    assert lock_holder(json.dumps({"holder": "ctl2:4242"}), None) is None  # released: nobody holds it
    assert lock_holder(b"garbage", "session-1") is None


def test_the_active_controller_is_the_inventorys_host_of_that_name(mesh: Mesh) -> None:
    assert active_controller(mesh.controllers, "ctl2").name == "ctl2"
    assert active_controller(mesh.controllers, "ctl1.lab.example").name == "ctl1"
    with pytest.raises(MeshError, match="no controller holds the controllers' lock") as none:
        active_controller(mesh.controllers, None)
    assert none.value.exit_code == 1 and "mesh status" in str(none.value)
    with pytest.raises(MeshError, match=r"runs on 'ctl9', which is none of the inventory's mesh_controllers "
                                        r"\(ctl1, ctl2\)"):
        active_controller(mesh.controllers, "ctl9")
    with pytest.raises(MeshError, match="no mesh_controllers"):
        active_controller((), "ctl1")


def test_it_forwards_to_the_lock_holders_dashboard_prints_the_url_and_exits_0(mesh: Mesh, dashboard: Any) -> None:
    tunnels = FakeTunnels(dashboard.port)
    printed: list[str] = []
    opened: list[str] = []
    seen: dict[str, Any] = {}

    def wait() -> None:  # the user's browser, then Ctrl-C
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", printed[0]).group(1))  # type: ignore[union-attr]
        seen["page"] = get(port, "/")
        seen["api"] = [get(port, "/api/dashboard") for _ in range(3)]  # connection after connection

    code = run_dashboard(mesh, holder=lambda _mesh: "ctl2", opener=tunnels.opener, web_port=9191,
                         echo=printed.append, open_browser=opened.append, wait=wait)
    assert code == 0
    assert len(printed) == 1 and printed[0].startswith("dashboard: http://127.0.0.1:")
    assert printed[0].endswith("/ (through ctl2; Ctrl-C to close)")
    assert opened == [printed[0].split(" ")[1]]
    assert tunnels.host == "ctl2" and set(tunnels.opened) == {("127.0.0.1", 9191)}
    assert seen["page"][0] == 200 and b"<svg" in seen["page"][1]
    assert all(status == 200 and json.loads(body)["controller"]["host"] == "ctl1"
               for status, body in seen["api"])


def test_no_browser_opens_none_and_a_given_port_is_used(mesh: Mesh, dashboard: Any) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    printed: list[str] = []
    run_dashboard(mesh, port, browser=False, holder=lambda _mesh: "ctl1",
                  opener=FakeTunnels(dashboard.port).opener, echo=printed.append,
                  open_browser=lambda url: pytest.fail("a browser was opened"), wait=lambda: None)
    assert printed == [f"dashboard: http://127.0.0.1:{port}/ (through ctl1; Ctrl-C to close)"]


def test_a_controller_that_serves_no_dashboard_is_named_before_any_url(mesh: Mesh) -> None:
    printed: list[str] = []
    with pytest.raises(MeshError, match=r"ctl1 answers SSH, but nothing listens on its 127.0.0.1:9191") as error:
        run_dashboard(mesh, holder=lambda _mesh: "ctl1", opener=FakeTunnels(None).opener, echo=printed.append,
                      wait=lambda: None)
    assert error.value.exit_code == 1 and printed == []


def test_an_unreachable_controller_host_exits_3(mesh: Mesh) -> None:
    def opener(host: ManagedHost, port: int) -> Callable[[], Any]:
        def open_channel() -> Any:
            raise HostUnreachable(host.name, "cannot connect to 10.77.0.3:22: timed out")
        return open_channel

    with pytest.raises(HostUnreachable) as error:
        run_dashboard(mesh, holder=lambda _mesh: "ctl1", opener=opener, wait=lambda: None)
    assert error.value.exit_code == EXIT_UNREACHABLE


def test_a_local_port_in_use_is_a_usage_error(dashboard: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(UsageError, match=f"--port {taken.getsockname()[1]}: cannot listen"):
            Forwarder(lambda: socket.create_connection(("127.0.0.1", dashboard.port)), taken.getsockname()[1])


def test_a_channel_that_cannot_be_opened_closes_that_connection_and_is_reported_once() -> None:
    warnings: list[str] = []
    attempts: list[int] = []

    def refused() -> Any:
        attempts.append(1)
        raise ConnectionRefusedError("ctl1 cannot connect to 127.0.0.1:9191: refused")

    forwarder = Forwarder(refused, warn=warnings.append).start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", forwarder.port), timeout=5) as conn:
                conn.settimeout(5)
                assert conn.recv(10) == b""  # closed at once
    finally:
        forwarder.close()
    assert len(attempts) == 3 and len(warnings) == 1 and "refused" in warnings[0]


def test_bytes_go_both_ways_over_each_connections_own_channel() -> None:
    ends: list[socket.socket] = []

    def echo_channel() -> Any:
        mine, theirs = socket.socketpair()
        ends.append(theirs)

        def echo() -> None:
            with theirs:
                while data := theirs.recv(1024):
                    theirs.sendall(data.upper())

        threading.Thread(target=echo, daemon=True).start()
        return mine

    forwarder = Forwarder(echo_channel).start()
    try:
        for word in (b"first", b"second"):
            with socket.create_connection(("127.0.0.1", forwarder.port), timeout=5) as conn:
                conn.sendall(word)
                assert conn.recv(100) == word.upper()
    finally:
        forwarder.close()
    assert len(ends) == 2


def test_probe_refuses_something_else_listening_there() -> None:
    def not_a_dashboard() -> Any:
        mine, theirs = socket.socketpair()

        def answer() -> None:
            with theirs:
                theirs.recv(1024)
                theirs.sendall(b"HTTP/1.0 404 Not Found\r\n\r\nnope")

        threading.Thread(target=answer, daemon=True).start()
        return mine

    with pytest.raises(MeshError, match="is not mesh's dashboard"):
        probe(not_a_dashboard, "ctl1", 9191)


def test_the_cli_names_an_unreadable_consul_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(FLEET_INVENTORY)  # its Consul is http://127.0.0.1:1: nothing answers
    assert run(["dashboard", "-i", str(path), "--no-browser"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "127.0.0.1:1" in err and "Traceback" not in err
