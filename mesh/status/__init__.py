"""`mesh status INVENTORY`: gather a typed report of every managed host (mesh.status.gather: reachable, per proxy
or sidecar Envoy running, config applied and running (an xds proxy: its ADS stream per resource type),
certificate, upstream health in Consul and in Envoy; the sidecar watcher and rules; the checker; Consul), then
print it as a table or as JSON (mesh.status.output). It only reads.
"""

from __future__ import annotations

import sys

from rich.console import Console

from mesh.hosts.connection import connect
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.status.gather import ConnectorFactory, gather_report
from mesh.status.output import PIPED_WIDTH, print_json, print_table
from mesh.status.report import StatusReport

__all__ = ["StatusReport", "gather_report", "status"]


def status(inventory_path: str, console: Console | None = None, connector_factory: ConnectorFactory = connect,
           as_json: bool = False) -> int:
    """Print the mesh's state; 0 healthy, 2 something unhealthy, 3 a host unreachable (1: Consul refused the
    token, raised as catalog.TokenRefused)."""
    mesh = check_inventory(load_inventory(inventory_path), inventory_path).mesh
    report = gather_report(mesh, connector_factory)
    out = console or _stdout_console()
    (print_json if as_json else print_table)(report, out)
    return report.exit_code


def _stdout_console() -> Console:
    """A console on stdout: a terminal's width there; piped, wide enough that each row stays on one line (a
    COLUMNS exported for a terminal would cut a pipe's lines)."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPED_WIDTH)
