"""`mesh logs`, `mesh metrics targets` and `mesh top`: thin click commands over mesh.telemetry.

They parse options, load the inventory, call one function, print, and return the exit code.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import click

from mesh.cli_inventory import fleet_inventory, inventory_option
from mesh.errors import MeshError
from mesh.inventory.model import Mesh


def load_mesh(inventory_option: str | None) -> Mesh:
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    path = fleet_inventory(None, inventory_option)
    return check_inventory(load_inventory(path), path).mesh


@click.command("logs")
@inventory_option
@click.option("--service", default=None, metavar="SERVICE",
              help="Only lines whose source or destination service is SERVICE.")
@click.option("--host", default=None, metavar="HOST", help="Only the proxies on HOST (an inventory host name).")
@click.option("--since", default="10m", show_default=True, metavar="TIME",
              help="Lines of requests started since: 30s, 5m, 2h, 1d ago, or an ISO time (UTC unless it says).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (a few seconds behind, to merge "
              "them in time order) until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, as the proxies wrote it.")
@click.pass_context
def logs_command(ctx: click.Context, inventory_option: str | None, service: str | None, host: str | None,
                 since: str, follow: bool, as_json: bool) -> None:
    """Print the proxies' access lines (one per HTTP request or TCP connection, caller and callee side), read
    over SSH from each host (a VM's journal, a container host's sidecar logs) and merged in time order.

    `source_service` is always the one the caller's certificate names. Hosts that cannot be read are named on
    stderr after the lines: exit 3 when one was unreachable, 2 when a read failed there; bad options exit 5."""
    from mesh.telemetry.accesslog import AccessLine, LineFilter, line_json, parse_since, readable
    from mesh.telemetry.logs import follow as follow_logs
    from mesh.telemetry.logs import gather, select_logs

    try:
        start = parse_since(since, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    mesh = load_mesh(inventory_option)
    selected = select_logs(mesh, service=service, host=host)
    keep = LineFilter(since=start, service=service)

    def emit(line: AccessLine) -> None:
        click.echo(line_json(line) if as_json else readable(line))

    def warn(message: str) -> None:
        click.echo(f"ERROR: {message}", err=True)

    if follow:
        got = follow_logs(selected, start, keep, emit, warn)
        ctx.exit(got.exit_code)
    got = gather(selected, start, keep)
    for line in got.lines:
        emit(line)
    for name, why in {**got.failed, **got.unreachable}.items():
        warn(f"{name}: {why}")
    ctx.exit(got.exit_code)


@click.group("metrics")
def metrics() -> None:
    """Where the proxies serve their Prometheus metrics."""


@metrics.command("targets")
@inventory_option
@click.option("-o", "--out", "out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON to this file (atomically: Prometheus never reads half of it) instead of stdout.")
def metrics_targets(inventory_option: str | None, out: Path | None) -> None:
    """Print a Prometheus file_sd JSON naming every proxy's metrics port (GET /stats/prometheus), labelled with
    mesh_id, mesh_service, mesh_version, mesh_proxy, mesh_instance, mesh_host and mesh_kind. Only the hosts of
    mesh_metrics_scrapers and the controllers may connect to these ports."""
    from mesh.telemetry.targets import file_sd, proxy_targets

    mesh = load_mesh(inventory_option)
    text = json.dumps(file_sd(proxy_targets(mesh), mesh.settings.id), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomically(out, text)


def write_atomically(path: Path, text: str) -> None:
    """A temp file in the same folder, then renamed over path."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as exc:
        raise MeshError(f"cannot write {path}: {exc.strerror or exc}") from None


@click.command("top")
@inventory_option
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.5, max=3600), metavar="SECONDS",
              help="Seconds between two reads of every proxy's metrics (Envoy updates latencies every 5 s).")
@click.option("--once", is_flag=True, help="Print one table, after two reads one interval apart, and exit.")
@click.pass_context
def top_command(ctx: click.Context, inventory_option: str | None, interval: float, once: bool) -> None:
    """Per service and per edge (caller -> callee): requests (or TCP connections) per second, error rate (5xx;
    TCP connect failures) and p99 latency (TCP: connection length), read from every proxy's metrics port through
    the first controller that answers SSH (else from this machine), refreshed every interval until Ctrl-C
    (exit 0). Rates are over the last interval; while refreshing, p99 is over at least 10 s, as Envoy publishes
    latencies every 5 s. Proxies that do not answer are named under the table. With --once, exit 3 when none
    answered."""
    from rich.console import Console

    from mesh.telemetry.scrape import fetcher_for
    from mesh.telemetry.targets import proxy_targets
    from mesh.telemetry.top import top

    mesh = load_mesh(inventory_option)
    fetcher = fetcher_for(mesh)
    try:
        ctx.exit(top(proxy_targets(mesh), fetcher, Console(), interval=interval, once=once))
    finally:
        fetcher.close()
