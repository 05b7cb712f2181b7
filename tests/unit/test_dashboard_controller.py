"""The controller's side of the dashboard: Controller.dashboard_reading (what it knows, copied under its lock) and
the loopback web server run() starts on spec.web_port and its shutdown closes (fake hosts, lock and Consul)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from test_controller_loop import START, FakeLeader, make_loop

from mesh.dashboard.view import DashboardInputs, dashboard_view


def test_the_reading_of_a_leader_has_each_proxys_push_state_and_certificate(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.at(0.0)
    loop.at(0.06)  # the first round: the host's state read
    reading = loop.controller.dashboard_reading()
    key = ("vm1", loop.proxy)
    assert reading.leading is True and reading.holder == "ctl-test" and reading.spec is loop.controller.spec
    assert reading.on_hosts[key] is not None and reading.wanted[key]
    assert reading.certificates[key] == (START + timedelta(days=1)).timestamp()
    view = dashboard_view(DashboardInputs(reading, now=START.timestamp()))
    (instance,) = view["instances"]
    assert instance["sync"] in ("in sync", "pending") and instance["cert_expires_in_s"] == 86400
    assert view["controller"]["leader"] is True


def test_a_standby_says_so_and_has_no_push_state(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, FakeLeader(leading=False))
    loop.at(0.0)
    reading = loop.controller.dashboard_reading()
    assert reading.leading is False and not reading.certificates
    view = dashboard_view(DashboardInputs(reading, now=START.timestamp()))
    assert [item["sync"] for item in view["instances"]] == ["standby"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_run_serves_the_dashboard_on_the_loopback_web_port_and_shutdown_closes_it(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    controller = loop.controller
    port = free_port()
    controller.spec = replace(controller.spec, web_port=port)
    controller.options = replace(controller.options, serve_metrics=True)  # the spec's metrics_port is 0: none
    runner = threading.Thread(target=controller.run, daemon=True)
    runner.start()
    try:
        for _ in range(100):
            if controller.dashboard is not None:
                break
            threading.Event().wait(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/api/controller")
        answer = json.loads(conn.getresponse().read())
        conn.close()
        assert answer["holder"] == "ctl-test" and answer["mesh_id"] == controller.spec.mesh_id
    finally:
        controller.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # closed with the controller
