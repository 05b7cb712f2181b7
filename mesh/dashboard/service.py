"""One controller's dashboard: its source of inputs (gather.py) and its loopback web server (server.py), started
and stopped together by the controller daemon. A port that cannot be bound is logged; the controller goes on.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import structlog

from mesh.catalog import ConsulAccess
from mesh.dashboard.gather import DashboardSource, consul_reader
from mesh.dashboard.server import LISTEN_ADDRESS, DashboardServer, Traces
from mesh.dashboard.view import ControllerReading, dashboard_view


class ControllerDashboard:
    """The running pair; `stop()` closes the server and ends the reads."""

    def __init__(self, source: DashboardSource, server: DashboardServer) -> None:
        self.source = source
        self.server = server

    def stop(self) -> None:
        self.server.stop()
        self.source.stop()


def start_dashboard(port: int, read: Callable[[], ControllerReading], access: ConsulAccess,
                    traces: Traces | None = None) -> ControllerDashboard | None:
    """Serve the dashboard on 127.0.0.1:port for the controller `read` copies; None (logged) when the port
    cannot be bound."""
    log = structlog.get_logger()
    source = DashboardSource(read, consul_reader(access))

    def identity() -> dict[str, object]:
        reading = read()
        return {"host": socket.gethostname(), "holder": reading.holder, "leader": reading.leading,
                "mesh_id": reading.spec.mesh_id}

    server = DashboardServer(port, lambda: dashboard_view(source.viewed()), traces, identity)
    try:
        server.start()
    except OSError as exc:
        log.error("dashboard_not_served", address=f"{LISTEN_ADDRESS}:{port}", error=str(exc))
        return None
    log.info("dashboard_serving", address=f"{LISTEN_ADDRESS}:{server.port}")
    return ControllerDashboard(source, server)
