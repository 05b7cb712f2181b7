"""The typed report `mesh status` gathers: per host reachable or why not; per proxy (a systemd Envoy on a VM or a
sidecar container) Envoy, its config (files and what runs), the resource version it runs against the
controller's (an xds proxy: its ADS stream per
resource type), certificate and upstreams; the sidecar watcher; the checker; Consul; the controllers, and how long
the fleet survives without them. Frozen data, its exit code and its JSON form; it must not read hosts or print.

The JSON keys are the field names below (README, "mesh status --json"); a new key may be added, none renamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE

ConfigState = Literal["applied", "differs", "files newer than running"]
Owed = Literal["restart", "reload"]
SyncState = Literal["in sync", "behind", "no controller"]
Running = Literal["xds", "files"]
XdsState = Literal["synced", "stale", "nacked", "on files", "no stream", "not read"]


@dataclass(frozen=True)
class EnvoyState:
    """The Envoy of one proxy: its unit (VM) or container (sidecar), and what its admin API said."""

    state: str  # the unit's ActiveState (active, failed...) or the container's status (running, exited, missing)
    running: bool
    version: str | None  # Envoy's version from /server_info ("1.40.0"); None when admin did not answer
    pid: int | None  # the unit's MainPID (VM)
    container_id: str | None  # the sidecar container's id (12 digits)
    admin_answers: bool


@dataclass(frozen=True)
class FileDifference:
    """A file mesh renders whose content on the host is not the inventory's."""

    path: str
    reason: Literal["missing", "content differs"]


@dataclass(frozen=True)
class RunningDrift:
    """Something the files on the host say that the running Envoy does not: a restart or a reload is owed (or
    Envoy refused the file). running/on_disk are the two values compared (a hash, a version, a serial)."""

    what: str  # "bootstrap", a resource file relative to the proxy folder ("xds/cds.yaml"), or "certificate"
    running: str | None  # None: Envoy has nothing of it loaded
    on_disk: str | None
    owed: Owed

    def describe(self) -> str:
        running = _short(self.running) if self.running is not None else "nothing"
        if self.what == "bootstrap":
            return f"bootstrap {_short(self.on_disk)} on disk, {running} running (a restart is owed)"
        if self.what == "certificate":
            return f"certificate serial {_short(self.on_disk)} on disk, Envoy serves {running}"
        if self.what.startswith("xds/eds."):
            return f"{self.what} endpoints {self.on_disk} on disk, {running} loaded (not reloaded, or refused)"
        return f"{self.what} version {_short(self.on_disk)} on disk, {running} loaded (not reloaded, or refused)"


@dataclass(frozen=True)
class ConfigStatus:
    """The proxy's files on the host against the inventory's, and the running Envoy against those files."""

    differing_files: tuple[FileDifference, ...]
    newer_than_running: tuple[RunningDrift, ...]
    running_compared: bool  # False: Envoy's admin did not answer, nothing running was compared
    container_current: bool | None = None  # a sidecar: runs the current spec (its label); None on a VM

    @property
    def state(self) -> ConfigState:
        if self.differing_files or self.container_current is False:
            return "differs"
        if self.newer_than_running:
            return "files newer than running"
        return "applied"


@dataclass(frozen=True)
class CertificateStatus:
    """One leaf certificate on a host: its expiry and serial (hex) on disk, and the serials Envoy serves."""

    path: str
    state: str  # mesh.pki.expiry.Expiry values: ok, under 1/3 left, EXPIRED, missing, unreadable
    serial: str | None
    not_after: datetime | None
    remaining_seconds: int | None
    lifetime_left: float | None  # the part of the lifetime still ahead, 1.0 to 0.0
    described: str  # "2026-12-07 05:00 UTC, 23h 59m left (99%)", or the state
    served_serials: tuple[str, ...] | None = None  # None: not asked (the checker) or Envoy's admin did not answer


@dataclass(frozen=True)
class UpstreamStatus:
    """One upstream service of a proxy: instances passing in Consul (of this mesh, on inventory hosts) and hosts
    healthy in Envoy's cluster."""

    service: str
    consul_passing: int | None  # None: Consul could not be read
    consul_instances: int | None
    envoy_healthy: int | None  # None: Envoy's admin did not answer
    envoy_hosts: int | None
    consul_drained: int | None = None  # instances `mesh drain` holds out (counted in consul_instances)


@dataclass(frozen=True)
class ResourcesStatus:
    """The resource version (mesh.controller.protocol.resource_version of its xds files) a proxy's host has,
    against the one the active controller published for it."""

    host_version: str | None  # None: no xds file could be read
    controller_version: str | None  # None: no active controller, or it has no version for this proxy
    pushed_at: datetime | None  # when the controller last pushed to this proxy

    @property
    def state(self) -> SyncState:
        if self.controller_version is None:
            return "no controller"
        return "in sync" if self.host_version == self.controller_version else "behind"


@dataclass(frozen=True)
class XdsTypeStatus:
    """One resource type of a proxy's ADS stream, as the controller serving it publishes it (istioctl
    proxy-status's columns): `synced` (the proxy ACKed the version sent), `nacked` (it refused it: `error` is
    Envoy's message; it keeps running the version it ACKed before), `stale` (in flight, or not ACKed yet)."""

    type: str  # LDS, CDS, EDS, RDS, SDS, ECDS
    state: str  # synced | stale | nacked
    sent: str | None  # the version the controller sent last (a content hash)
    acked: str | None  # the version the proxy ACKed last
    error: str | None  # Envoy's NACK message


@dataclass(frozen=True)
class XdsStatus:
    """An xds proxy's delivery (mesh_delivery: xds): which bootstrap its Envoy runs (`running`, from /server_info's
    node.metadata.mesh_delivery; None when the admin did not answer) and the ADS stream a controller publishes
    for its node id (`controller`: whose stream, None when none publishes one)."""

    node_id: str  # the proxy's Envoy node.id (its Consul service ID)
    running: Running | None
    controller: str | None  # the holder (`host:pid`) of the controller whose stream it is
    types: tuple[XdsTypeStatus, ...]
    connected_since: datetime | None = None
    peer: str | None = None  # the stream's peer address as the controller saw it
    streams_read: bool = True  # False: the controllers' publications could not be read (Consul)

    @property
    def state(self) -> XdsState:
        """`on files`: Envoy started from its files (no controller answered at its start; the controllers move it
        back to ADS); `no stream`: no controller publishes a stream for it; else the worst of its types."""
        if self.running == "files":
            return "on files"
        if not self.streams_read:
            return "not read"
        if self.controller is None:
            return "no stream"
        states = {item.state for item in self.types}
        if "nacked" in states:
            return "nacked"
        return "stale" if "stale" in states or not states else "synced"

    def of_state(self, state: str) -> tuple[XdsTypeStatus, ...]:
        return tuple(item for item in self.types if item.state == state)


@dataclass(frozen=True)
class PlaintextClient:
    """A client that called a permissive service without mTLS: its address, its requests (or connections) in
    the window read (mesh.status.plaintext.WINDOW) and the start of its last one."""

    address: str
    count: int
    last_seen: datetime | None


@dataclass(frozen=True)
class PlaintextSeen:
    """What one permissive proxy's access log says of plaintext clients (problem: why it could not be read)."""

    clients: tuple[PlaintextClient, ...]
    problem: str | None = None


@dataclass(frozen=True)
class PermissiveService:
    """A service in `mtls: permissive` and the plaintext clients its proxies saw, merged by address; `unread`
    names the proxies whose log could not be read (`host proxy: why`)."""

    service: str
    clients: tuple[PlaintextClient, ...]
    unread: tuple[str, ...]

    def describe(self) -> str:
        if not self.clients:
            text = ("no plaintext clients seen: safe to switch to strict" if not self.unread
                    else "no plaintext clients seen by the proxies read")
        else:
            text = "plaintext clients: " + "; ".join(
                f"{client.address} ({client.count}, last {_when(client.last_seen)})" for client in self.clients)
        return text + (f" (not read: {', '.join(self.unread)})" if self.unread else "")


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value is not None else "?"


@dataclass(frozen=True)
class ProxyStatus:
    proxy: str
    service: str
    runs_as: Literal["systemd", "sidecar"]
    envoy: EnvoyState
    config: ConfigStatus
    certificate: CertificateStatus
    upstreams: tuple[UpstreamStatus, ...]
    problems: tuple[str, ...]
    resources: ResourcesStatus | None = None
    plaintext: PlaintextSeen | None = None  # None: the service is strict (no plaintext chain)
    xds: XdsStatus | None = None  # None: a files proxy (mesh_delivery: files)


@dataclass(frozen=True)
class WatcherStatus:
    """mesh-sidecars.service and the reachability rules of a container host."""

    state: str
    rules_applied: bool
    problems: tuple[str, ...]


@dataclass(frozen=True)
class CheckerStatus:
    """The health checker of a controller."""

    state: str
    certificate: CertificateStatus
    problems: tuple[str, ...]


@dataclass(frozen=True)
class HostStatus:
    host: str
    kind: str  # vm, container_host (mesh_host_kind)
    reachable: bool
    unreachable_reason: str | None
    proxies: tuple[ProxyStatus, ...]
    sidecar_watcher: WatcherStatus | None
    checker: CheckerStatus | None
    problems: tuple[str, ...]  # the host's own (reading failed); its parts' problems are theirs

    def all_problems(self) -> list[tuple[str, str]]:
        """(what, problem) for the host and each of its parts."""
        found = [(self.host, problem) for problem in self.problems]
        found += [(f"{self.host} {proxy.proxy}", problem) for proxy in self.proxies for problem in proxy.problems]
        for name, part in (("sidecar watcher", self.sidecar_watcher), ("health-checker", self.checker)):
            if part is not None:
                found += [(f"{self.host} {name}", problem) for problem in part.problems]
        return found


@dataclass(frozen=True)
class ConsulStatus:
    readable: bool
    reason: str | None  # why it could not be read


@dataclass(frozen=True)
class ControllerStatus:
    """The controllers as Consul shows them: the lock's holder and the state the active one publishes."""

    active: bool  # the lock has a session and the state was published within ACTIVE_WITHIN_S
    holder: str | None  # `host:pid` of the active controller (from its published state)
    lock_held: bool
    updated_at: datetime | None  # when the state was last published
    consul_stale_s: float | None  # how long the controller's view of Consul is out of date
    plan_digest: str | None
    hosts_behind: tuple[str, ...]
    reason: str | None  # why no controller is active (or why Consul could not say)

    def describe(self) -> str:
        if not self.active:
            return f"none active ({self.reason})" if self.reason else "none active"
        stale = f", Consul view {self.consul_stale_s:g}s stale" if self.consul_stale_s else ""
        behind = f", hosts behind: {', '.join(self.hosts_behind)}" if self.hosts_behind else ""
        plan = f", plan {self.plan_digest[:12]}" if self.plan_digest else ""
        when = f", state of {self.updated_at:%H:%M:%S} UTC" if self.updated_at else ""
        return f"active {self.holder or '?'}{when}{stale}{plan}{behind}"


@dataclass(frozen=True)
class Survival:
    """How long the fleet keeps working with every controller down: until its first certificate expires."""

    until: datetime
    remaining_seconds: int
    certificate: str  # `host proxy` (or `host health-checker`) of the leaf that expires first

    def describe(self) -> str:
        from mesh.pki.expiry import remaining_text

        return (f"fleet survives without controllers until {self.until:%Y-%m-%d %H:%M:%S} UTC "
                f"({remaining_text(timedelta(seconds=self.remaining_seconds))}; first to expire: {self.certificate})")


@dataclass(frozen=True)
class StatusReport:
    consul: ConsulStatus
    hosts: tuple[HostStatus, ...]
    controller: ControllerStatus | None = None  # None: not asked (no Consul URL)

    @property
    def survival(self) -> Survival | None:
        """The earliest not_after of the certificates read on the hosts (proxies and checkers)."""
        found = [(proxy.certificate, f"{host.host} {proxy.proxy}") for host in self.hosts for proxy in host.proxies]
        found += [(host.checker.certificate, f"{host.host} health-checker") for host in self.hosts
                  if host.checker is not None]
        dated = [(cert.not_after, cert.remaining_seconds or 0, name) for cert, name in found
                 if cert.not_after is not None]
        if not dated:
            return None
        until, remaining, name = min(dated)
        return Survival(until, remaining, name)

    @property
    def permissive(self) -> tuple[PermissiveService, ...]:
        """Every permissive service with the plaintext clients its proxies saw (informational: not a problem)."""
        seen: dict[str, list[tuple[str, PlaintextSeen]]] = {}
        for host in self.hosts:
            for proxy in host.proxies:
                if proxy.plaintext is not None:
                    seen.setdefault(proxy.service, []).append((f"{host.host} {proxy.proxy}", proxy.plaintext))
        return tuple(PermissiveService(service, _merged(item for _, read in reads for item in read.clients),
                                       tuple(f"{name}: {read.problem}" for name, read in reads if read.problem))
                     for service, reads in sorted(seen.items()))

    @property
    def exit_code(self) -> int:
        """3 when a host is unreachable, else 2 when anything is unhealthy, else 0."""
        if any(not host.reachable for host in self.hosts):
            return EXIT_UNREACHABLE
        unhealthy = not self.consul.readable or any(host.all_problems() for host in self.hosts)
        return EXIT_HOST_FAILED if unhealthy else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data: every field by its name, plus `exit_code`, `healthy` and each config's
        `state`; datetimes in ISO 8601 (UTC)."""
        data = _plain(self)
        data["survival"] = _plain(self.survival)
        data["permissive"] = _plain(self.permissive)
        data["exit_code"] = self.exit_code
        data["healthy"] = self.exit_code == EXIT_OK
        return data


def _merged(clients: Iterable[PlaintextClient]) -> tuple[PlaintextClient, ...]:
    """One client per address (several proxies saw it): counts added, the latest time kept; busiest first."""
    by_address: dict[str, PlaintextClient] = {}
    for client in clients:
        known = by_address.get(client.address)
        if known is not None:
            times = [when for when in (known.last_seen, client.last_seen) if when is not None]
            client = PlaintextClient(client.address, known.count + client.count, max(times) if times else None)
        by_address[client.address] = client
    return tuple(sorted(by_address.values(), key=lambda item: (-item.count, item.address)))


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        data = {item.name: _plain(getattr(value, item.name)) for item in fields(value)}
        if isinstance(value, ConfigStatus | ResourcesStatus | XdsStatus):
            data["state"] = value.state
        return data
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def _short(value: str | None) -> str:
    """A hash or serial short enough to read in a line (the JSON has it whole)."""
    if value is None:
        return "?"
    return value[:12] if len(value) > 16 else value
