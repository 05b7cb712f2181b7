"""`mesh trace`: one request's path across every hop with the time spent in each, from mesh's collector (the
controllers' traces API) or rebuilt from the proxies' access lines; or the last N traces.

It parses the options, chooses the source, asks it (sources.py), and prints the view (view.py); the exit code
says what was found: 0 found, 2 nothing found, 1 nothing found while a controller or host could not be read,
5 a usage error.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

import click

from mesh.cli_inventory import inventory_option
from mesh.errors import EXIT_ERROR, EXIT_HOST_FAILED, EXIT_OK, UsageError
from mesh.hosts.connection import connect
from mesh.inventory.model import Mesh
from mesh.traces.sources import Collector, ConnectorFactory, Read, by_request, read_lines, uses_collector
from mesh.traces.view import (
    Containers,
    Placement,
    Trace,
    group_traces,
    hop_trace,
    hops_from_lines,
    newest_first,
    render_json,
    render_text,
)

ID_PATTERN = re.compile(r"[!-~]{1,200}")  # printable ASCII, no space: what an x-request-id or a trace id can be
MAX_LAST = 200
AGO = re.compile(r"\d+[smhd]")


@dataclass(frozen=True)
class Query:
    """What `mesh trace` looks for: one request or trace id, or the last N traces (of a service)."""

    wanted: str | None
    last: int | None
    service: str | None
    since: datetime
    since_text: str
    from_logs: bool

    def window(self) -> str:
        """`in the last 1h`, or `since 2026-12-07T00:00:00Z`: how far back the access logs were read."""
        return f"in the last {self.since_text}" if AGO.fullmatch(self.since_text.strip()) else f"since {self.since_text}"

    def searched(self) -> str:
        if self.wanted is not None:
            return f"request or trace {self.wanted}"
        return f"the last {self.last} traces" + (f" of {self.service}" if self.service else "")


@dataclass
class Found:
    """The traces found, what went wrong on the way (warnings), and the exit code."""

    traces: list[Trace]
    searched: str
    warnings: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # where it was looked for, for the message of nothing found
    incomplete: bool = False  # a controller or a host could not be read

    def nothing_found(self) -> str:
        return f"no trace of {self.searched} in {' nor in '.join(self.places)}"

    @property
    def exit_code(self) -> int:
        if self.traces:
            return EXIT_OK
        return EXIT_ERROR if self.incomplete else EXIT_HOST_FAILED


def check_id(text: str) -> str:
    """The id as given when it is a printable token; a usage error (exit 5) otherwise."""
    if ID_PATTERN.fullmatch(text):
        return text
    shown = ascii(text[:60]) + ("..." if len(text) > 60 else "")
    raise UsageError(f"{shown} is not a request id or trace id",
                     "an id is 1 to 200 printable ASCII characters without spaces")


def placement(mesh: Mesh) -> tuple[Placement, Containers]:
    """Where each proxy runs, by its access lines' `proxy` (the Consul id): its host and app container; and the
    app container by (host, proxy name or Consul id), for the spans' `mesh.proxy` tag."""
    from mesh.config import paths

    places: dict[str, tuple[str, str | None]] = {}
    containers: dict[tuple[str, str], str] = {}
    for host in mesh.hosts:
        for workload in host.workloads:
            places[workload.consul_id] = (host.name, workload.container)
            if workload.container:
                containers[(host.name, workload.consul_id)] = workload.container
                containers[(host.name, paths.proxy_name(workload))] = workload.container
    return places, containers


def find(mesh: Mesh, query: Query, factory: ConnectorFactory = connect) -> Found:
    """The traces the query names: from mesh's collector when mesh_tracing uses it (and not --from-logs), else,
    or when the collector holds nothing of it, rebuilt from the access lines."""
    found = Found([], query.searched())
    if uses_collector(mesh) and not query.from_logs:
        collector = Collector.of(mesh, factory)
        found.places.append(f"the collector ({', '.join(collector.names)})")
        try:
            found.traces = _from_collector(collector, query)
        finally:
            collector.close()
        for name, why in collector.got.problems.items():
            found.warnings.append(f"controller {name}: {why}")
        if found.traces:
            return found
        found.incomplete = bool(collector.got.problems)
        names = ", ".join(collector.names)
        if not collector.got.holds:
            found.warnings.append(f"no controller's collector answered ({names}): reading the access logs")
        elif query.wanted is not None:
            found.warnings.append(f"the collector ({names}) holds no trace of {query.wanted}: reading the access "
                                  "logs")
        else:
            of = f" of {query.service}" if query.service else ""
            found.warnings.append(f"the collector ({names}) holds no traces{of} {query.window()}: reading the "
                                  "access logs")
    read = read_lines(mesh, query.since, query.wanted, query.service if query.wanted is None else None, factory)
    found.places.append(f"the access logs of {', '.join(read.hosts)} {query.window()}")
    for name, why in read.problems.items():
        found.warnings.append(f"{name}: {why}")
    found.incomplete = found.incomplete or bool(read.problems)
    found.traces = _from_lines(mesh, read, query)
    return found


def _from_collector(collector: Collector, query: Query) -> list[Trace]:
    if query.wanted is not None:
        return group_traces(collector.lookup(query.wanted))
    assert query.last is not None
    since_us = int(query.since.timestamp() * 1_000_000)
    chosen = [trace for trace in group_traces(collector.last(query.last, query.service))
              if trace.start_us >= since_us][:query.last]
    collector.complete(trace.trace_id for trace in chosen if trace.trace_id)
    ids = {trace.trace_id for trace in chosen}
    return [trace for trace in group_traces(collector.got.spans) if trace.trace_id in ids]


def _from_lines(mesh: Mesh, read: Read, query: Query) -> list[Trace]:
    places, _ = placement(mesh)
    if query.wanted is not None:
        spans = hops_from_lines(read.lines, places)
        return [hop_trace(spans)] if spans else []
    traces = []
    for lines in by_request(read.lines).values():
        spans = hops_from_lines(lines, places)
        if spans and (query.service is None or any(span.service == query.service for span in spans)):
            traces.append(hop_trace(spans))
    assert query.last is not None
    return newest_first(traces)[:query.last]


@click.command("trace")
@click.argument("wanted", metavar="[ID]", required=False)
@inventory_option
@click.option("--last", type=click.IntRange(1, MAX_LAST), default=None, metavar="N",
              help="The last N traces, newest first (instead of an ID).")
@click.option("--service", default=None, metavar="SERVICE", help="With --last: only traces with a span of SERVICE.")
@click.option("--since", default="1h", show_default=True, metavar="TIME",
              help="How far back the access logs are read, and the oldest trace --last shows: 30s, 5m, 2h, 1d, or "
                   "an ISO time.")
@click.option("--from-logs", is_flag=True, help="Rebuild the hops from the access logs even when a collector runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the traces (spans and tree) as JSON.")
@click.pass_context
def trace_command(ctx: click.Context, wanted: str | None, inventory_option: str | None, last: int | None,
                  service: str | None, since: str, from_logs: bool, as_json: bool) -> None:
    """Show a request's path across every hop: ID is its request id (x-request-id, as the caller sent it or as
    Envoy made it) or its trace id (32 hex digits). One line per span, in tree order: service, direction, host
    (and container), method and path, status, total time, self time (not spent in the spans below), and the
    start after the trace's start.

    The spans come from mesh's collector (every controller, through SSH) when `mesh_tracing` uses it; without a
    collector (or with an outside one, or --from-logs, or when the collector holds nothing of the request) the
    hops are rebuilt from the proxies' access lines. Controllers and hosts that cannot be read are named on
    stderr. Exit 0 found; 2 nothing found; 1 nothing found while a controller or host could not be read; 5 bad
    options."""
    from mesh.telemetry.accesslog import parse_since
    from mesh.telemetry.commands import load_mesh

    if (wanted is None) == (last is None):
        raise UsageError("give a request or trace ID, or --last N" if wanted is None
                         else "give an ID or --last N, not both")
    if service is not None and last is None:
        raise UsageError("--service goes with --last", "an ID names its request already")
    if wanted is not None:
        wanted = check_id(wanted)
    try:
        start = parse_since(since, datetime.now(UTC))
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    mesh = load_mesh(inventory_option)
    if service is not None:
        services = sorted({workload.service for workload in mesh.workloads})
        if service not in services:
            from mesh.suggest import did_you_mean

            raise UsageError(f"no service {service!r} in the inventory", did_you_mean(service, services))
    query = Query(wanted, last, service, start, since, from_logs)
    found = find(mesh, query)
    _, containers = placement(mesh)
    if as_json:  # indented for a person at a terminal, compact when piped (as mesh's other --json)
        document = render_json(found.traces, found.searched, found.warnings)
        click.echo(json.dumps(document, indent=2 if sys.stdout.isatty() else None, ensure_ascii=False))
    elif found.traces:
        click.echo(render_text(found.traces, containers), nl=False)
    for warning in found.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    if not found.traces:
        click.echo(f"ERROR: {found.nothing_found()}", err=True)
    ctx.exit(found.exit_code)

