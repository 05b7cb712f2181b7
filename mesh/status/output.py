"""Printing a StatusReport: a table (colours and box lines at a terminal; plain ASCII, no escape codes and no
wrapping when piped) with each problem on a line of its own, or JSON (`mesh status --json`). It must not read
hosts or judge.
"""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mesh.status.plaintext import WINDOW
from mesh.status.report import (
    CertificateStatus,
    CheckerStatus,
    HostStatus,
    ProxyStatus,
    ResourcesStatus,
    StatusReport,
    UpstreamStatus,
    WatcherStatus,
    XdsStatus,
)

COLUMNS = ("host", "proxy", "reachable", "envoy", "config", "resources", "certificate", "upstreams")
PIPED_WIDTH = 250  # a pipe has no width; wide enough that rows are not wrapped into several lines


def print_json(report: StatusReport, console: Console) -> None:
    """The report as one JSON document (keys: README, "mesh status --json")."""
    console.file.write(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")


def print_table(report: StatusReport, console: Console) -> None:
    """The table, the controllers and how long the fleet survives without them, then each problem (`host proxy:
    problem`), then Consul when it could not be read."""
    table = Table(title="mesh status", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")  # never "…": a narrow console folds a long cell
    for host in report.hosts:
        for cells, bad in _host_rows(host):
            table.add_row(*cells, style="red" if bad else None)
    console.print(table)
    if report.controller is not None:
        console.print(Text(f"controllers: {report.controller.describe()}"), soft_wrap=True)
    if report.survival is not None:
        console.print(Text(report.survival.describe()), soft_wrap=True)
    for service in report.permissive:
        console.print(Text(f"permissive {service.service} (access logs of the last "
                           f"{WINDOW.total_seconds() / 3600:g} h): "
                           f"{service.describe()}",
                           style="yellow" if service.clients else ""), soft_wrap=True)
    for what, problem in (item for host in report.hosts for item in host.all_problems()):
        console.print(Text(f"{what}: {problem}", style="red"), soft_wrap=True)
    if not report.consul.readable:
        console.print(Text(f"Consul: {report.consul.reason}", style="red"), soft_wrap=True)


Row = tuple[tuple[str | Text, ...], bool]  # the cells, and whether the row has a problem


def _host_rows(host: HostStatus) -> list[Row]:
    if not host.reachable:
        return [((host.host, "-", Text("no", style="red"), "", "", "", "", ""), True)]
    rows: list[Row] = [_proxy_row(host.host, proxy) for proxy in host.proxies]
    if host.sidecar_watcher is not None:
        rows.append(_watcher_row(host.host, host.sidecar_watcher))
    if host.checker is not None:
        rows.append(_checker_row(host.host, host.checker))
    if host.problems:
        rows.append(((host.host, "-", "yes", Text("not read", style="red"), "", "", "", ""), True))
    return rows


def _proxy_row(host: str, proxy: ProxyStatus) -> Row:
    envoy = proxy.envoy
    version = envoy.version or ""
    if proxy.runs_as == "sidecar":
        text = " ".join(part for part in ("sidecar", envoy.state, version, envoy.container_id or "") if part)
    else:
        text = " ".join(part for part in (envoy.state, version, f"pid {envoy.pid}" if envoy.pid else "") if part)
    config = proxy.config
    if config.differing_files:
        config_text = Text(f"differs ({len(config.differing_files)} files)", style="red")
    elif config.container_current is False:
        config_text = Text("not running it", style="red")
    else:
        config_text = Text(config.state, style="red" if config.newer_than_running else "")
    return ((host, proxy.proxy, "yes", Text(text, style="" if envoy.running else "red"), config_text,
             _ads(proxy.xds) if proxy.xds is not None else _resources(proxy.resources), _certificate(proxy.certificate), "; ".join(_upstream(item) for item in proxy.upstreams) or "-"),
            bool(proxy.problems))


def _watcher_row(host: str, watcher: WatcherStatus) -> Row:
    rules = Text("rules applied") if watcher.rules_applied else Text("rules differ", style="red")
    return (host, "sidecar watcher", "yes", f"watcher {watcher.state}", rules, "", "", ""), bool(watcher.problems)


def _checker_row(host: str, checker: CheckerStatus) -> Row:
    cells = (host, "health-checker", "yes", f"checker {checker.state}", "", "", _certificate(checker.certificate),
             "")
    return cells, bool(checker.problems)


def _resources(resources: ResourcesStatus | None) -> Text:
    """A files proxy: `in sync 3f2a1b0c`, `behind: host 12ab..., controller 34cd...`, or `no controller`."""
    if resources is None:
        return Text("")
    host = (resources.host_version or "none")[:8]
    if resources.state == "behind":
        return Text(f"behind: host {host}, controller {(resources.controller_version or '')[:8]}", style="red")
    if resources.state == "in sync":
        return Text(f"in sync {host}")
    return Text("no controller")


def _ads(xds: XdsStatus) -> Text:
    """An xds proxy's stream: `ADS synced (ctl1)`, `ADS NACKed: LDS (ctl1)` (red), `ADS stale: EDS, RDS (ctl1)`
    (yellow), `on files` (yellow), `no stream` (red), `ADS not read` (Consul could not be read)."""
    state = xds.state
    if state == "on files":
        return Text("on files", style="yellow")
    if state == "no stream":
        return Text("no stream", style="red")
    if state == "not read":
        return Text("ADS not read", style="yellow")
    by = f" ({xds.controller.rsplit(':', 1)[0]})" if xds.controller else ""
    if state == "synced":
        return Text(f"ADS synced{by}")
    if state == "nacked":
        return Text(f"ADS NACKed: {_types(xds, 'nacked')}{by}", style="red")
    return Text(f"ADS stale: {_types(xds, 'stale') or 'nothing sent yet'}{by}", style="yellow")


def _types(xds: XdsStatus, state: str) -> str:
    return ", ".join(item.type for item in xds.of_state(state))


def _certificate(certificate: CertificateStatus) -> Text:
    text = certificate.described + (f", serial {certificate.serial[:8]}" if certificate.serial else "")
    return Text(text, style="red" if certificate.state != "ok" else "")


def _upstream(item: UpstreamStatus) -> str:
    consul = "?" if item.consul_instances is None else f"{item.consul_passing}/{item.consul_instances}"
    if item.consul_drained:
        consul += f" ({item.consul_drained} drained)"
    envoy = "?" if item.envoy_hosts is None else f"{item.envoy_healthy}/{item.envoy_hosts}"
    return f"{item.service}: consul {consul}, envoy {envoy}"
