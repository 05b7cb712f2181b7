"""`mesh top`: the fleet's numbers (fleet.py) as a terminal table of services and edges, refreshed every
interval; `once` prints one table and returns.

It owns the table and the refresh loop; it must not compute numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mesh.errors import EXIT_OK, EXIT_UNREACHABLE
from mesh.telemetry.fleet import (
    EdgeNumbers,
    FleetNumbers,
    FleetSnapshot,
    Numbers,
    ServiceNumbers,
    fleet_numbers,
    scrape,
)
from mesh.telemetry.scrape import Fetcher
from mesh.telemetry.targets import ProxyTarget

DEFAULT_INTERVAL = 5.0  # Envoy flushes its histograms every 5 s: a shorter interval often sees no latency
LATENCY_WINDOW = 10.0  # while refreshing, p99 is taken over at least this long (two of Envoy's flushes)


def _rate(value: float) -> str:
    return f"{value:.2f}/s" if value < 100 else f"{value:.0f}/s"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms")


def _cells(numbers: Numbers) -> tuple[str, str, str]:
    return _rate(numbers.rate), _share(numbers.error_rate), _ms(numbers.p99_ms)


def _versions(table: Table, label: str, versions: Mapping[str, Numbers]) -> None:
    for version, numbers in versions.items():
        table.add_row(Text(f"  {label} {version}", style="dim"), "", *_cells(numbers), style="dim")


def _numbers_table(title: str, first: str) -> Table:
    """An empty table: what each row is, its protocol, then rate, errors and p99 (right-aligned)."""
    table = Table(title=title, title_justify="left", expand=False)
    for column in (first, "protocol"):
        table.add_column(column)
    for column in ("rate", "errors", "p99"):
        table.add_column(column, justify="right")
    return table


def services_table(numbers: FleetNumbers) -> Table:
    table = _numbers_table("services (as their proxies received)", "service")
    for service in numbers.services:
        table.add_row(service.service, service.protocol, *_cells(service.numbers))
        if len(service.by_version) > 1:
            _versions(table, "version", service.by_version)
    return table


def edges_table(numbers: FleetNumbers) -> Table:
    table = _numbers_table("edges (as callers measured them)", "source -> destination")
    for edge in numbers.edges:
        table.add_row(f"{edge.source} -> {edge.destination}", edge.protocol, *_cells(edge.numbers))
        if len(edge.by_source_version) > 1:
            _versions(table, "from", edge.by_source_version)
        if edge.by_destination_version:
            _versions(table, "to", edge.by_destination_version)
    return table


def render(numbers: FleetNumbers, via: str) -> RenderableType:
    """The two tables, then a line per proxy that did not answer (named by host and proxy)."""
    parts: list[RenderableType] = [services_table(numbers), edges_table(numbers)]
    footer = Text(f"over {numbers.interval:.1f} s, metrics read {via}; errors: 5xx share (HTTP), connect "
                  f"failures (TCP); p99: request latency (HTTP), connection length (TCP)", style="dim")
    parts.append(footer)
    for failure in numbers.failures:
        target = failure.target
        parts.append(Text(f"{target.host} {target.proxy}: no metrics: {failure.error}", style="red"))
    return Group(*parts)


def _p99_of(numbers: Numbers, longer: Numbers | None) -> Numbers:
    if numbers.rate <= 0 or longer is None or longer.p99_ms is None:
        return numbers
    return replace(numbers, p99_ms=longer.p99_ms)


def _versions_p99(versions: Mapping[str, Numbers], longer: Mapping[str, Numbers]) -> dict[str, Numbers]:
    return {name: _p99_of(value, longer.get(name)) for name, value in versions.items()}


def steadier_p99(numbers: FleetNumbers, longer: FleetNumbers) -> FleetNumbers:
    """numbers, with each p99 taken from `longer` (the same fleet over a longer window) where there were
    requests: Envoy publishes its histograms every 5 s, so a short interval often sees no latency at all."""
    services = {service.service: service for service in longer.services}
    edges = {(edge.source, edge.destination): edge for edge in longer.edges}
    none_service = ServiceNumbers("", "", Numbers(0.0, None, None))
    none_edge = EdgeNumbers("", "", "", Numbers(0.0, None, None))
    return replace(
        numbers,
        services=tuple(replace(item, numbers=_p99_of(item.numbers, same.numbers),
                               by_version=_versions_p99(item.by_version, same.by_version))
                       for item in numbers.services
                       for same in (services.get(item.service, none_service),)),
        edges=tuple(replace(item, numbers=_p99_of(item.numbers, same.numbers),
                            by_source_version=_versions_p99(item.by_source_version, same.by_source_version),
                            by_destination_version=_versions_p99(item.by_destination_version,
                                                                 same.by_destination_version))
                    for item in numbers.edges for same in (edges.get((item.source, item.destination), none_edge),)))


def _taken(snapshot: FleetSnapshot) -> float:
    return min((proxy.at for proxy in snapshot.proxies), default=0.0)


def top(targets: tuple[ProxyTarget, ...], fetcher: Fetcher, console: Console, interval: float = DEFAULT_INTERVAL,
        once: bool = False, sleep: Callable[[float], None] = time.sleep) -> int:
    """Show the table until Ctrl-C (0), or once after two scrapes `interval` apart: 0, or 3 when no proxy
    answered at all."""
    before = scrape(targets, fetcher)
    if once:
        sleep(interval)
        numbers = fleet_numbers(before, scrape(targets, fetcher))
        console.print(render(numbers, fetcher.via))
        answered = len(targets) - len(numbers.failures)
        return EXIT_UNREACHABLE if targets and answered == 0 else EXIT_OK
    waiting = Text(f"reading {len(targets)} proxies {fetcher.via} every {interval:g} s ...")
    try:
        history = [before]
        with Live(waiting, console=console, auto_refresh=False, screen=False) as live:
            while True:
                sleep(interval)
                after: FleetSnapshot = scrape(targets, fetcher)
                numbers = fleet_numbers(history[-1], after)
                window = [old for old in history if _taken(after) - _taken(old) >= LATENCY_WINDOW]
                if window:
                    numbers = steadier_p99(numbers, fleet_numbers(window[-1], after))
                history = [*history[len(window) - 1 if window else 0:], after]
                live.update(render(numbers, fetcher.via), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK
