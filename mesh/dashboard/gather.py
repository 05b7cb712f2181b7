"""What a controller reads for the dashboard, and only while someone looks: `DashboardSource`.

Each poll of the page (`viewed`) answers at once from what is known; it also keeps a refresher thread alive that,
while some page polled within VIEWED_WITHIN_S, reads Consul's instances (health, drain check) and scrapes every
proxy's metrics (directly: controllers are allowed sources of every metrics port) at most every REFRESH_S, shared
by every viewer. With no page open the thread ends and nothing is read. The fleet's numbers are
mesh.telemetry.fleet's, between the last two scrapes.

It owns when to read and what is kept; what the page shows is view.py's. The controller's own state comes from
Controller.dashboard_reading (copied under its lock by `controller_reading`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

import structlog

from mesh import catalog
from mesh.catalog import ConsulAccess
from mesh.controller.pusher import Pusher
from mesh.controller.snapshot import Snapshot
from mesh.controller.spec import ControllerSpec
from mesh.dashboard.view import ControllerReading, DashboardInputs, Instance, instance_id, service_protocols
from mesh.errors import MeshError
from mesh.inventory.policy import AuthzOverride, TrafficOverride
from mesh.telemetry.fleet import FleetNumbers, FleetSnapshot, fleet_numbers, scrape
from mesh.telemetry.scrape import FETCH_TIMEOUT, Fetcher, http_get
from mesh.telemetry.targets import METRICS_PATH, ProxyTarget

VIEWED_WITHIN_S = 30.0  # a page that polled this recently keeps the reads going
REFRESH_S = 5.0  # at most one scrape of every proxy (and one Consul read) this often, whatever the viewers
STALE_AFTER_S = 3 * REFRESH_S  # an older scrape is no base for a rate (the page was closed meanwhile)

ReadInstances = Callable[[ControllerSpec], tuple[Instance, ...]]
# The Envoy stats mesh.telemetry.fleet's numbers and view.py's RBAC counts are made of (Envoy's own names, before
# tag extraction: `cluster.outbound|web|v1|api.upstream_rq_2xx`, `http.inbound|api|v1.rbac.mesh_authz_deny_denied`).
STATS_FILTER = ("(upstream_rq_[1-5]xx|upstream_rq_[0-9]{3}|upstream_rq_time|downstream_rq_[1-5]xx|downstream_rq_time"
                "|upstream_cx_total|upstream_cx_connect_fail|upstream_cx_length_ms|rbac\\.)")


def scrape_targets(spec: ControllerSpec) -> tuple[ProxyTarget, ...]:
    """Every proxy of the spec that says where its metrics are (ProxySpec.metrics `ADDRESS:PORT`). Pure."""
    protocols = service_protocols(spec)
    found = []
    for host in spec.hosts:
        for proxy in host.proxies:
            if not proxy.metrics:
                continue
            address, _, port = proxy.metrics.rpartition(":")
            found.append(ProxyTarget(proxy=proxy.name, service=proxy.service, version=proxy.version,
                                     host=host.name, kind="container" if proxy.kind == "container" else "vm",
                                     address=address.strip("[]"), port=int(port),
                                     instance=instance_id(host, proxy),
                                     protocol="tcp" if protocols.get(proxy.service) == "tcp" else "http"))
    return tuple(found)


class FleetFetcher:
    """A proxy's metrics straight from the controller (an allowed source of every metrics port), only the stats
    the dashboard reads and only those Envoy used (`?usedonly&filter=`): about a tenth of the full text, and so of
    the controller's work to parse it every REFRESH_S while a page is open."""

    via = "direct"

    def __init__(self, timeout: float = FETCH_TIMEOUT) -> None:
        self.timeout = timeout
        self.path = f"{METRICS_PATH}?{urlencode({'usedonly': '', 'filter': STATS_FILTER})}"

    def fetch(self, target: ProxyTarget) -> str:
        return http_get(target, timeout=self.timeout, path=self.path)

    def close(self) -> None:
        pass


def consul_instances(access: ConsulAccess, services: Iterable[str], mesh_id: str) -> tuple[Instance, ...]:
    """Every instance of these services this mesh id registered, with its worst check and drain check."""
    found = catalog.services_health(access, sorted(services), mesh_id)
    return tuple(Instance(item.service_id, item.service, item.node, item.address, item.port, item.status,
                          item.output, item.drained, str(item.meta.get("version", "")))
                 for items in found.values() for item in items)


def consul_reader(access: ConsulAccess) -> ReadInstances:
    return lambda spec: consul_instances(access, service_protocols(spec), spec.mesh_id)


def controller_reading(spec: ControllerSpec, holder: str, leading: bool, consul_stale_s: float, pusher: Pusher,
                       snapshot: Snapshot, behind: Iterable[str], overrides: Mapping[str, TrafficOverride] | None,
                       denies: Mapping[str, AuthzOverride] | None) -> ControllerReading:
    """A frozen copy of the controller's state (call under its lock; the push threads change the pusher's maps:
    a copy that races one of them is simply taken again)."""
    for attempt in range(5):
        try:
            certificates = {(name, identity): cert.not_after.timestamp()
                            for name, link in list(pusher.links.items()) if link.state is not None
                            for identity, cert in list(link.state.certs.items()) if cert is not None}
            return ControllerReading(
                spec=spec, holder=holder, leading=leading, consul_stale_s=consul_stale_s,
                wanted=MappingProxyType(pusher.wanted_versions(snapshot)),
                on_hosts=MappingProxyType(pusher.host_versions()),
                pushed_at=MappingProxyType(dict(pusher.pushed_at)), refused=frozenset(pusher.refused),
                behind=tuple(behind), certificates=MappingProxyType(certificates),
                overrides=MappingProxyType(dict(overrides or {})), denies=MappingProxyType(dict(denies or {})))
        except RuntimeError:  # "dictionary changed size during iteration"
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class DashboardSource:
    """The dashboard's inputs for one controller: `viewed()` per poll of the page (see the module docstring)."""

    def __init__(self, read: Callable[[], ControllerReading], instances: ReadInstances,
                 fetcher: Fetcher | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, viewed_within_s: float = VIEWED_WITHIN_S,
                 refresh_s: float = REFRESH_S, background: bool = True) -> None:
        self.read = read
        self.read_instances = instances
        self.fetcher = fetcher or FleetFetcher()
        self.clock, self.wall = clock, wall
        self.viewed_within_s, self.refresh_s = viewed_within_s, refresh_s
        self.background = background
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_view = float("-inf")
        self.last_refresh = float("-inf")
        self.instances: tuple[Instance, ...] | None = None
        self.consul_error: str | None = None
        self.consul_read_at: float | None = None
        self.snapshots: list[tuple[float, FleetSnapshot]] = []  # (clock, snapshot): the last two
        self.numbers: FleetNumbers | None = None
        self.refreshes = 0  # how many reads were made (tests)
        self.log = structlog.get_logger()

    def viewed(self) -> DashboardInputs:
        """A page polled: what is known now; the reads go on (or start again) for VIEWED_WITHIN_S."""
        with self.lock:
            self.last_view = self.clock()
            if self.background and not self.stopped.is_set() and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self._run, name="dashboard-refresh", daemon=True)
                self.thread.start()
        return self.inputs()

    def inputs(self) -> DashboardInputs:
        reading = self.read()
        with self.lock:
            latest = self.snapshots[-1][1] if self.snapshots else None
            return DashboardInputs(reading=reading, now=self.wall(), instances=self.instances,
                                   consul_error=self.consul_error, consul_read_at=self.consul_read_at,
                                   numbers=self.numbers, latest=latest, scraping=self._watched())

    def _watched(self) -> bool:
        return self.clock() - self.last_view < self.viewed_within_s

    def _run(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                if not self._watched():
                    self.thread = None
                    return
                due = self.last_refresh + self.refresh_s - self.clock()
            if due <= 0:
                try:
                    self.refresh()
                except Exception as exc:
                    self.log.exception("dashboard_refresh_failed", error=str(exc))
                    with self.lock:
                        self.last_refresh = self.clock()
                continue
            self.stopped.wait(due)

    def refresh(self) -> None:
        """One read of Consul's instances and one scrape of every proxy; the numbers between this scrape and the
        previous one (when it is recent enough to be a base)."""
        with self.lock:
            self.last_refresh = self.clock()
            self.refreshes += 1
        spec = self.read().spec
        try:
            instances: tuple[Instance, ...] | None = self.read_instances(spec)
            error = None
        except (MeshError, OSError) as exc:
            instances, error = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        snapshot = scrape(scrape_targets(spec), self.fetcher)
        now = self.clock()
        with self.lock:
            if instances is not None:
                self.instances, self.consul_read_at = instances, self.wall()
            self.consul_error = error
            kept = [(at, before) for at, before in self.snapshots[-1:] if now - at <= STALE_AFTER_S]
            self.numbers = fleet_numbers(kept[0][1], snapshot) if kept else None
            self.snapshots = [*kept, (now, snapshot)]

    def stop(self) -> None:
        self.stopped.set()
        thread = self.thread
        if thread is not None:
            thread.join(timeout=10)

    def state(self) -> dict[str, Any]:
        """What the source holds, for logs and tests."""
        with self.lock:
            return {"refreshes": self.refreshes, "watched": self._watched(), "snapshots": len(self.snapshots)}
