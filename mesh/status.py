"""`mesh status INVENTORY`: per proxy (a systemd Envoy on a VM, a sidecar container on a container host),
reachable, Envoy running and its version, config applied, certificate expiry, upstream instances healthy in
Consul and in Envoy; the sidecar watcher and reachability rules on container hosts; the checker on controllers.
It only reads.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from mesh import catalog, controller_env
from mesh.config import paths
from mesh.config.compute import compute_proxy_config, upstream_cluster_name
from mesh.containers.docker import container_state
from mesh.containers.reachability import RULES_PATH, WATCHER_UNIT
from mesh.containers.sidecar import files_hash, hashed_files, sidecar_name, sidecar_spec
from mesh.deploy.connection import Connector, RemoteError, connect
from mesh.deploy.errors import HostUnreachable, ModuleFailure
from mesh.deploy.hostcerts import CHECKER_CERT_PATH
from mesh.deploy.modules.facts import file_sha256
from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, MeshError
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh, Workload
from mesh.pki.expiry import WARN_REMAINING, Expiry, judge_pem
from mesh.render import render_envoy_config

ADMIN_TIMEOUT_S = 3


@dataclass
class Row:
    """One line of the table; problems make the exit code 2, unreachable 3."""

    host: str
    proxy: str
    cells: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unreachable: bool = False


def status(inventory_path: str, console: Console | None = None,
           connector_factory: Callable[[ManagedHost], Connector] = connect) -> int:
    """Print the mesh's state; 0 healthy, 2 something unhealthy, 3 a host unreachable."""
    mesh = check_inventory(load_inventory(inventory_path), inventory_path).mesh
    deployed = [host for host in mesh.hosts if host.workloads or host.is_controller]
    consul = _consul_health(mesh)
    with ThreadPoolExecutor(max_workers=20) as pool:
        per_host = list(pool.map(lambda host: _host_rows(mesh, host, consul, connector_factory), deployed))
    rows = [row for rows in per_host for row in rows]
    out = console or Console()
    _print(rows, out)
    for row in rows:
        for problem in row.problems:
            out.print(f"[red]{row.host} {row.proxy}: {problem}[/red]")
    if isinstance(consul, str):  # said once, also when no row would carry it
        out.print(f"[red]Consul: {consul}[/red]")
    if any(row.unreachable for row in rows):
        return EXIT_UNREACHABLE
    unhealthy = isinstance(consul, str) or any(row.problems for row in rows)
    return EXIT_HOST_FAILED if unhealthy else EXIT_OK


def _consul_health(mesh: Mesh) -> dict[str, list[catalog.InstanceHealth]] | str:
    """Every service's instances of this mesh id with their status, or the reason Consul could not be read.
    A refused token is no reading at all: it raises TokenRefused (exit 1), since Consul would answer empty."""
    if not mesh.settings.consul_url:
        return "mesh_consul_url is not set"
    try:
        return catalog.services_health(catalog.access_for(mesh), list(mesh.services), mesh.settings.id)
    except catalog.TokenRefused:
        raise
    except MeshError as exc:
        return str(exc)


def _host_rows(mesh: Mesh, host: ManagedHost, consul: dict[str, list[catalog.InstanceHealth]] | str,
               factory: Callable[[ManagedHost], Connector]) -> list[Row]:
    connector = factory(host)
    rows = [Row(host.name, paths.proxy_name(workload)) for workload in host.workloads]
    containers = host.kind == "container_host" and bool(host.workloads)
    if containers:
        rows.append(Row(host.name, "sidecar watcher"))
    if host.is_controller:
        rows.append(Row(host.name, "health-checker"))
    try:
        for row, workload in zip(rows, host.workloads, strict=False):
            if containers:
                _sidecar_row(mesh, host, workload, row, connector, consul)
            else:
                _proxy_row(mesh, workload, row, connector, consul)
        if containers:
            _watcher_row(connector, rows[len(host.workloads)])
        if host.is_controller:
            state = connector.run(f"systemctl is-active {controller_env.CHECKER_UNIT}").text()
            rows[-1].cells["envoy"] = f"checker {state}"
            if state != "active":
                rows[-1].problems.append(f"{controller_env.CHECKER_UNIT} is {state}")
            rows[-1].cells["certificate"] = _certificate(connector, CHECKER_CERT_PATH, rows[-1])
    except HostUnreachable as exc:
        for row in rows:
            row.unreachable = True
            row.cells = {"reachable": "[red]no[/red]"}
        rows[0].problems.append(f"unreachable: {exc.detail}")
    finally:
        connector.close()
    for row in rows:
        row.cells.setdefault("reachable", "yes")
    return rows


def _proxy_row(mesh: Mesh, workload: Workload, row: Row, connector: Connector,
               consul: dict[str, list[catalog.InstanceHealth]] | str) -> None:
    proxy = row.proxy
    state = connector.run(f"systemctl is-active {paths.envoy_unit_name(proxy)}").text()
    info = _admin_json(connector, proxy, "server_info")
    version = str(info.get("version", "?")).split("/")[1] if "/" in str(info.get("version", "")) else "?"
    row.cells["envoy"] = f"{state} {version}" if state == "active" else state
    if state != "active":
        row.problems.append(f"Envoy unit is {state}")
    cfg = compute_proxy_config(mesh, workload)
    applied = file_sha256(connector, cfg.config_path) == hashlib.sha256(render_envoy_config(cfg).encode()).hexdigest()
    row.cells["config"] = "applied" if applied else "[red]differs[/red]"
    if not applied:
        row.problems.append("the config on the host differs from the inventory's (run mesh deploy)")
    row.cells["certificate"] = _certificate(connector, paths.cert_path(proxy), row)
    row.cells["upstreams"] = _upstreams(mesh, workload, connector, consul, row)


def _sidecar_row(mesh: Mesh, host: ManagedHost, workload: Workload, row: Row, connector: Connector,
                 consul: dict[str, list[catalog.InstanceHealth]] | str) -> None:
    """A sidecar: its container running in its app container's namespace, Envoy's admin answering inside that
    namespace, its files the inventory's and the running container made from them (the config-hash label)."""
    proxy, name = row.proxy, sidecar_name(workload)
    try:
        state = container_state(connector, name)
        app = container_state(connector, str(workload.container))
    except ModuleFailure as exc:
        row.cells["envoy"] = "[red]docker ?[/red]"
        row.problems.append(str(exc))
        return
    pid = state.pid if state is not None and state.running else None
    if state is None:
        row.problems.append(f"no sidecar container {name} (run mesh deploy)")
    elif not state.running:
        row.problems.append(f"sidecar {name} is {state.status}")
    if app is None or not app.running:
        row.problems.append(f"app container {workload.container} is "
                            f"{'missing' if app is None else app.status}")
    elif state is not None and state.running and state.netns != app.netns:
        row.problems.append(f"{name} is not in the network namespace of {workload.container} (the watcher "
                            "restarts it)")
    info = _admin_json(connector, proxy, "server_info") if pid else {}
    version = str(info.get("version", "?")).split("/")[1] if "/" in str(info.get("version", "")) else "?"
    if pid and not info:
        row.problems.append(f"Envoy's admin on {paths.admin_socket_path(proxy)} (mounted into {name}) does not "
                            "answer")
    row.cells["envoy"] = f"sidecar {state.status if state else 'missing'} {version if info else ''}".strip()
    row.cells["config"] = _sidecar_config(mesh, host, workload, connector, state.config_hash if state else None,
                                          name, row)
    row.cells["certificate"] = _certificate(connector, paths.cert_path(proxy), row)
    row.cells["upstreams"] = _upstreams(mesh, workload, connector, consul, row, admin=pid is not None)


def _sidecar_config(mesh: Mesh, host: ManagedHost, workload: Workload, connector: Connector, label: str | None,
                    name: str, row: Row) -> str:
    proxy = paths.proxy_name(workload)
    cfg = compute_proxy_config(mesh, workload)
    digests = {path: file_sha256(connector, path) or "" for path in hashed_files(proxy)}
    if digests[cfg.config_path] != hashlib.sha256(render_envoy_config(cfg).encode()).hexdigest():
        row.problems.append("the config on the host differs from the inventory's (run mesh deploy)")
        return "[red]differs[/red]"
    image = connector.run(f"docker container inspect --format '{{{{.Config.Image}}}}' {shlex.quote(name)}").text()
    revision = sidecar_spec(host, workload, image, files_hash(digests, image)).revision
    if label != revision:
        row.problems.append(f"{name} does not run the current files (run mesh deploy)")
        return "[red]not running it[/red]"
    return "applied"


def _watcher_row(connector: Connector, row: Row) -> None:
    state = connector.run(f"systemctl is-active {WATCHER_UNIT}").text()
    rules = connector.run(f"{RULES_PATH} check").ok
    row.cells["envoy"] = f"watcher {state}"
    row.cells["config"] = "rules applied" if rules else "[red]rules differ[/red]"
    if state != "active":
        row.problems.append(f"{WATCHER_UNIT} is {state}")
    if not rules:
        row.problems.append(f"the reachability rules are not in place ({RULES_PATH} check failed; the watcher or "
                            "mesh deploy applies them)")


def _certificate(connector: Connector, path: str, row: Row) -> str:
    """The leaf at path: its expiry and remaining lifetime; a problem (exit 2) when it is missing, unreadable,
    expired or under WARN_REMAINING of its lifetime (the threshold of `mesh ca check`)."""
    try:
        seen = judge_pem(connector.get(path), datetime.now(UTC))
    except RemoteError as exc:
        row.problems.append(f"certificate {path} unreadable: {exc}")
        return "[red]unreadable[/red]"
    if seen.state in (Expiry.MISSING, Expiry.UNREADABLE):
        row.problems.append(f"certificate {path} is {seen.state.value} (run mesh deploy)")
        return f"[red]{seen.state.value}[/red]"
    text = seen.describe().removeprefix("expires ")
    if seen.state.bad:
        what = "expired" if seen.state is Expiry.EXPIRED else f"has under {WARN_REMAINING:.0%} of its lifetime left"
        row.problems.append(f"certificate {what} ({seen.describe()}): run mesh deploy to renew it")
        return f"[red]{text}[/red]"
    return text


def _upstreams(mesh: Mesh, workload: Workload, connector: Connector,
               consul: dict[str, list[catalog.InstanceHealth]] | str, row: Row, admin: bool = True) -> str:
    envoy = _envoy_health(connector, paths.proxy_name(workload)) if admin else {}
    parts = []
    deployed = {host.name for host in mesh.hosts}
    for upstream in workload.upstreams:
        flags = envoy.get(upstream_cluster_name(upstream.service), [])
        healthy_envoy = sum(flag == "healthy" for flag in flags)
        if isinstance(consul, str):
            consul_text = "consul ?"
            row.problems.append(f"Consul: {consul}")
        else:
            instances = [item for item in consul.get(upstream.service, []) if item.node in deployed]
            passing = sum(item.status == "passing" for item in instances)
            consul_text = f"consul {passing}/{len(instances)}"
            if passing < len(instances):
                row.problems.append(f"{upstream.service}: {len(instances) - passing} instance(s) critical in Consul")
        parts.append(f"{upstream.service}: {consul_text}, envoy {healthy_envoy}/{len(flags)}")
        if healthy_envoy == 0:
            row.problems.append(f"{upstream.service}: no healthy instance in Envoy")
    return "; ".join(parts) or "-"


def _admin(connector: Connector, proxy: str, path: str) -> str:
    """GET Envoy's admin path over its unix socket (root's to read: on a VM, and on a container host the folder
    mounted into the sidecar), with the host's curl over SSH."""
    url = f"http://localhost/{path}"
    result = connector.run(f"curl -s -m {ADMIN_TIMEOUT_S} --unix-socket "
                           f"{shlex.quote(paths.admin_socket_path(proxy))} {shlex.quote(url)}")
    return result.stdout.decode(errors="replace") if result.ok else ""


def _admin_json(connector: Connector, proxy: str, path: str) -> dict[str, object]:
    try:
        data = json.loads(_admin(connector, proxy, path) or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _envoy_health(connector: Connector, proxy: str) -> dict[str, list[str]]:
    """Cluster -> the health_flags of each of its hosts, from the admin /clusters text."""
    found: dict[str, list[str]] = {}
    for line in _admin(connector, proxy, "clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            found.setdefault(parts[0], []).append(parts[3])
    return found


def _print(rows: list[Row], console: Console) -> None:
    table = Table(title="mesh status")
    columns = ("host", "proxy", "reachable", "envoy", "config", "certificate", "upstreams")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(row.host, row.proxy, *(row.cells.get(column, "") for column in columns[2:]),
                      style="red" if row.problems else None)
    console.print(table)
