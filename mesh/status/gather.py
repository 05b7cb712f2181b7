"""Gathering the status report: Consul once from this machine (services' health, the controllers' lock,
published state and ADS streams), then every managed host in parallel, each over one connection with all its
reads in one batch (mesh.status.reads), judged into a StatusReport. It only reads; it must not print.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime

from mesh import catalog
from mesh.errors import MeshError
from mesh.hosts.connection import Connector
from mesh.hosts.errors import HostUnreachable, RemoteError
from mesh.inventory.model import ManagedHost, Mesh
from mesh.status import reads
from mesh.status.batch import run_batch
from mesh.status.controllers import ControllerView, read_controllers
from mesh.status.expected import ExpectedProxy, expected_proxies
from mesh.status.judge import ConsulHealth, containers, judge_checker, judge_proxy, judge_watcher
from mesh.status.plaintext import READ as PLAINTEXT_READ
from mesh.status.plaintext import WINDOW as PLAINTEXT_WINDOW
from mesh.status.plaintext import plaintext_reads, plaintext_seen
from mesh.status.report import ConsulStatus, HostStatus, StatusReport

ConnectorFactory = Callable[[ManagedHost], Connector]
READ_TIMEOUT_S = 60.0  # all of one host's reads; Envoy's admin answers within reads.ADMIN_TIMEOUT_S each
MAX_PARALLEL_HOSTS = 20


def gather_report(mesh: Mesh, connector_factory: ConnectorFactory) -> StatusReport:
    """The status of every host with workloads and every controller. A token Consul refuses raises
    catalog.TokenRefused (exit 1): Consul would answer empty lists, which would look like an empty catalog."""
    deployed = [host for host in mesh.hosts if host.workloads or host.is_controller]
    expected = {host.name: expected_proxies(mesh, host) for host in deployed}  # a config error stops here
    consul, health = _consul(mesh)
    controller = read_controllers(mesh) if consul.readable else None
    inventory_hosts = frozenset(host.name for host in mesh.hosts)

    def one(host: ManagedHost) -> HostStatus:
        return gather_host(host, expected[host.name], health, inventory_hosts, connector_factory,
                           controller=controller)

    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_HOSTS) as pool:
        hosts = tuple(pool.map(one, deployed))
    return StatusReport(consul, hosts, controller.status if controller is not None else None)


def gather_host(host: ManagedHost, proxies: tuple[ExpectedProxy, ...], consul: ConsulHealth,
                inventory_hosts: frozenset[str], connector_factory: ConnectorFactory,
                now: datetime | None = None, controller: ControllerView | None = None) -> HostStatus:
    """One host: connect once, run every read in one batch, judge the answers."""
    sidecar_host = host.kind == "container_host" and bool(proxies)
    when = now or datetime.now(UTC)
    commands = reads.host_commands(proxies, sidecar_host, host.is_controller)
    commands.update(plaintext_reads(host, proxies, when - PLAINTEXT_WINDOW))
    connector: Connector | None = None
    try:
        connector = connector_factory(host)
        readings = run_batch(connector, commands, READ_TIMEOUT_S)
    except HostUnreachable as exc:
        return HostStatus(host.name, host.kind, False, exc.detail, (), None, None, (f"unreachable: {exc.detail}",))
    except RemoteError as exc:
        return HostStatus(host.name, host.kind, True, None, (), None, None, (f"cannot read the host: {exc}",))
    finally:
        if connector is not None:
            connector.close()
    seen = containers(readings[reads.CONTAINERS]) if sidecar_host else {}
    statuses = tuple(replace(judge_proxy(host, proxy, readings, consul, inventory_hosts, seen, when, controller),
                             plaintext=plaintext_seen(proxy, readings.get(f"{proxy.proxy} {PLAINTEXT_READ}")))
                     for proxy in proxies)
    return HostStatus(host.name, host.kind, True, None, statuses,
                      judge_watcher(readings) if sidecar_host else None,
                      judge_checker(readings, when) if host.is_controller else None, ())


def _consul(mesh: Mesh) -> tuple[ConsulStatus, ConsulHealth]:
    """Every service's instances of this mesh id with their status, or the reason Consul could not be read."""
    if not mesh.settings.consul_url:
        return ConsulStatus(False, "mesh_consul_url is not set"), None
    try:
        health = catalog.services_health(catalog.access_for(mesh), list(mesh.services), mesh.settings.id)
    except catalog.TokenRefused:
        raise
    except MeshError as exc:
        return ConsulStatus(False, str(exc)), None
    return ConsulStatus(True, None), health
