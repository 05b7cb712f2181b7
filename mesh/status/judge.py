"""Judging what was read on one host (mesh.status.reads) against what the inventory expects: the typed status of
each proxy, the sidecar watcher and the checker, with their problems. Pure: readings in, report parts out; it
must not read hosts or print.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from mesh import catalog
from mesh.config.compute import outbound_listener_name
from mesh.containers.sidecar import bootstrap_sidecar
from mesh.hosts.connection import CommandResult
from mesh.inventory.model import ManagedHost
from mesh.pki.expiry import WARN_REMAINING, Expiry, judge_pem
from mesh.pki.leaf import load_chain
from mesh.status import reads
from mesh.status.ads import judge_xds, running_delivery, xds_problems
from mesh.status.controllers import ControllerView, resources_status
from mesh.status.expected import ExpectedProxy
from mesh.status.report import (
    CertificateStatus,
    CheckerStatus,
    ConfigStatus,
    EnvoyState,
    FileDifference,
    ProxyStatus,
    RunningDrift,
    UpstreamStatus,
    WatcherStatus,
)
from mesh.status.running import (
    admin_json,
    bootstrap_drift,
    certificate_drift,
    cluster_health,
    envoy_version,
    loaded_versions,
    resource_drifts,
    served_serials,
)

Readings = Mapping[str, CommandResult]
ConsulHealth = Mapping[str, list[catalog.InstanceHealth]] | None  # None: Consul could not be read
_Read = Callable[[str], CommandResult]  # one reading of one proxy, by what it is ("unit", "admin certs")
_NOTHING = CommandResult(127, b"", b"not read")


@dataclass(frozen=True)
class ContainerSeen:
    """One container as `docker container inspect` showed it (mesh.status.reads.containers_command)."""

    id: str
    status: str
    running: bool
    label: str | None
    image: str
    netns: str | None


def containers(result: CommandResult) -> dict[str, ContainerSeen] | str:
    """Containers by name, or why Docker could not be asked (a missing container is simply not listed)."""
    if not result.ok and b"No such" not in result.stderr and b"no such" not in result.stderr:
        return f"docker container inspect failed: {result.error_text()[:200]}"
    found = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        parts = line.split("|")
        if len(parts) != 8:
            continue
        name, cid, status, running, label, image, _pid, netns = parts
        found[name.lstrip("/")] = ContainerSeen(cid[:12], status, running == "true",
                                                None if label in ("", "<no value>") else label, image, netns or None)
    return found


def judge_proxy(host: ManagedHost, expected: ExpectedProxy, readings: Readings, consul: ConsulHealth,
                inventory_hosts: frozenset[str], seen: dict[str, ContainerSeen] | str, now: datetime,
                controller: ControllerView | None = None) -> ProxyStatus:
    """The status of one proxy from its host's readings. While a controller is active and pushed this proxy, its
    endpoint files are the controller's (Consul's instances, not the inventory's): they are judged by the
    resource version, not against the inventory's rendering. An xds proxy's stream is judged per resource type;
    while its Envoy runs on ADS its resources are the stream's, not its files' (they are the last-known-good)."""
    problems: list[str] = []

    def read(what: str) -> CommandResult:
        return readings.get(reads.key(expected, what), _NOTHING)

    server_info = admin_json(read("admin server_info").stdout)
    envoy = (_sidecar_envoy(expected, seen, server_info, problems) if expected.runs_as_sidecar
             else _unit_envoy(read("unit"), read("pid"), server_info, problems))
    if envoy.running and server_info is None:
        problems.append(f"Envoy's admin on {expected.admin_socket} does not answer")
    served = served_serials(admin_json(read("admin certs").stdout) or {}) if server_info is not None else None
    certificate = _certificate(expected.cert_path, read("certificate"), now, problems, served)
    pushed = controller.pushed(host.name, expected.proxy) if controller is not None else None
    on_host = {file.path: read(f"file {file.path}").stdout for file in expected.files.files
               if read(f"file {file.path}").ok}
    resources = resources_status(expected.files.proxy_dir, on_host, pushed)
    controllers_files = frozenset(_endpoint_files(expected)) if pushed is not None else frozenset()
    xds = judge_xds(expected.node_id, server_info, controller) if expected.delivery == "xds" else None
    config = _config(host, expected, readings, read, server_info, certificate, seen, problems, controllers_files,
                     over_ads=xds is not None and xds.running == "xds")
    if xds is not None:
        problems += xds_problems(xds)
    elif running_delivery(server_info) == "xds":
        problems.append("runs on ADS but its host is on mesh_delivery: files (a restart is owed)")
    upstreams = _upstreams(expected, read("admin clusters") if server_info is not None else None, consul,
                           inventory_hosts, problems)
    return ProxyStatus(expected.proxy, expected.workload.service, "sidecar" if expected.runs_as_sidecar else "systemd",
                       envoy, config, certificate, upstreams, tuple(problems), resources, xds=xds)


def _endpoint_files(expected: ExpectedProxy) -> list[str]:
    """The proxy's files a controller keeps current: its upstreams' endpoint files (EDS, each version's too) from
    Consul, its outbound route files (RDS) from the traffic policy and its run-time overrides, and its inbound
    authorization files (the inbound route, or a TCP service's ECDS filters) from the rules and a run-time deny."""
    names = {f"eds.{cluster}.yaml" for _, cluster in expected.upstream_clusters}
    names |= {f"rds.{outbound_listener_name(service)}.yaml" for service, _ in expected.upstream_clusters}
    versions = tuple(f"eds.{cluster}." for _, cluster in expected.upstream_clusters)
    return [file.path for file in expected.files.files
            if (base := file.path.rsplit("/", 1)[-1]) in names or base.startswith(versions)
            or file.path in expected.inbound_files]


def _unit_envoy(unit: CommandResult, pid: CommandResult, server_info: Mapping[str, object] | None,
                problems: list[str]) -> EnvoyState:
    state = unit.text() or "unknown"
    if state != "active":
        problems.append(f"Envoy unit is {state}")
    main_pid = int(pid.text()) if pid.ok and pid.text().isdigit() and int(pid.text()) > 0 else None
    return EnvoyState(state, state == "active", envoy_version(server_info) if server_info else None, main_pid, None,
                      server_info is not None)


def _sidecar_envoy(expected: ExpectedProxy, seen: dict[str, ContainerSeen] | str,
                   server_info: Mapping[str, object] | None, problems: list[str]) -> EnvoyState:
    """A sidecar: its container running in its app container's network namespace."""
    name, app_name = str(expected.sidecar), str(expected.workload.container)
    if isinstance(seen, str):
        problems.append(seen)
        return EnvoyState("unknown", False, None, None, None, server_info is not None)
    sidecar, app = seen.get(name), seen.get(app_name)
    if sidecar is None:
        problems.append(f"no sidecar container {name} (run mesh deploy)")
    elif not sidecar.running:
        problems.append(f"sidecar {name} is {sidecar.status}")
    if app is None or not app.running:
        problems.append(f"app container {app_name} is {'missing' if app is None else app.status}")
    elif sidecar is not None and sidecar.running and sidecar.netns != app.netns:
        problems.append(f"{name} is not in the network namespace of {app_name} (the watcher restarts it)")
    running = sidecar is not None and sidecar.running
    return EnvoyState(sidecar.status if sidecar else "missing", running,
                      envoy_version(server_info) if server_info else None, None,
                      sidecar.id if sidecar else None, server_info is not None)


def _config(host: ManagedHost, expected: ExpectedProxy, readings: Readings, read: _Read,
            server_info: Mapping[str, object] | None, certificate: CertificateStatus,
            seen: dict[str, ContainerSeen] | str, problems: list[str],
            controllers_files: frozenset[str] = frozenset(), over_ads: bool = False) -> ConfigStatus:
    """Files on the host against the rendered ones (but the controller's: their content is Consul's); then the
    running Envoy against the files on the host (over ADS: its bootstrap and certificate only)."""
    differing, on_host = [], {}
    for file in expected.files.files:
        got = read(f"file {file.path}")
        if not got.ok:
            differing.append(FileDifference(file.path, "missing"))
            continue
        on_host[file.path] = got.stdout.decode(errors="replace")
        if file.path not in controllers_files and hashlib.sha256(got.stdout).hexdigest() != file.sha256:
            differing.append(FileDifference(file.path, "content differs"))
    host_ca = readings.get(reads.HOST_CA, _NOTHING)
    proxy_ca = read("ca")
    if not proxy_ca.ok:
        differing.append(FileDifference(expected.ca_path, "missing"))
    elif not host_ca.ok or proxy_ca.text().split()[:1] != host_ca.text().split()[:1]:
        differing.append(FileDifference(expected.ca_path, "content differs"))
    if differing:
        folder = expected.files.proxy_dir.rstrip("/") + "/"
        listed = ", ".join(f"{item.path.removeprefix(folder)} ({item.reason})" for item in differing)
        problems.append(f"files in {folder} differ from the inventory's: {listed} (run mesh deploy)")
    drifts: list[RunningDrift] = []
    if server_info is not None:
        drifts = _running_drifts(expected, on_host, server_info, read, certificate, over_ads)
        if drifts:
            problems.append("files newer than running: " + "; ".join(drift.describe() for drift in drifts))
    current = _container_current(host, expected, on_host, seen, problems) if expected.runs_as_sidecar else None
    return ConfigStatus(tuple(differing), tuple(drifts), server_info is not None, current)


def _running_drifts(expected: ExpectedProxy, on_host: Mapping[str, str], server_info: Mapping[str, object],
                    read: _Read, certificate: CertificateStatus, over_ads: bool = False) -> list[RunningDrift]:
    """Over ADS the resources Envoy holds carry the stream's versions (content hashes), not the files': they are
    not compared (mesh.status.ads judges the stream)."""
    drifts = []
    bootstrap = on_host.get(expected.files.bootstrap.path)
    found = bootstrap_drift(bootstrap, server_info) if bootstrap is not None else None
    if found is not None:
        drifts.append(found)
    if not over_ads:
        dump = admin_json(read("admin config_dump").stdout) or {}
        prefix = expected.files.proxy_dir.rstrip("/") + "/"
        resources = {path.removeprefix(prefix): text for path, text in on_host.items()
                     if path != expected.files.bootstrap.path}
        drifts += resource_drifts(resources, loaded_versions(dump))
    cert_drift = certificate_drift(certificate.serial, certificate.served_serials or ())
    if cert_drift is not None:
        drifts.append(cert_drift)
    return drifts


def _container_current(host: ManagedHost, expected: ExpectedProxy, on_host: Mapping[str, str],
                       seen: dict[str, ContainerSeen] | str, problems: list[str]) -> bool | None:
    """The sidecar runs the spec the bootstrap on the host asks for: its mesh.config-hash label is the revision
    mesh.plan.build gives it (the bootstrap's sha256 and the image; resources and certificates are reloaded)."""
    sidecar = seen.get(str(expected.sidecar)) if isinstance(seen, dict) else None
    bootstrap = on_host.get(expected.files.bootstrap.path)
    if sidecar is None or bootstrap is None:
        return None
    digest = hashlib.sha256(bootstrap.encode()).hexdigest()
    wanted = bootstrap_sidecar(host, expected.workload, sidecar.image, expected.files.bootstrap.path, digest,
                               expected.files.ads_bootstrap is not None)
    if sidecar.label != wanted.revision:
        problems.append(f"{expected.sidecar} does not run the current bootstrap and spec (run mesh deploy)")
        return False
    return True


def _certificate(path: str, result: CommandResult, now: datetime, problems: list[str],
                 served: tuple[str, ...] | None = None) -> CertificateStatus:
    """The leaf at path: its expiry and serial; a problem (exit 2) when it is missing, unreadable, expired or under
    WARN_REMAINING of its lifetime (the threshold of `mesh ca check`)."""
    seen = judge_pem(result.stdout if result.ok else None, now)
    serial = None
    if seen.state in (Expiry.MISSING, Expiry.UNREADABLE):
        problems.append(f"certificate {path} is {seen.state.value} (run mesh deploy)")
    else:
        serial = format(load_chain(result.stdout)[0].serial_number, "x")
    if seen.state in (Expiry.EXPIRED, Expiry.LOW):
        what = "expired" if seen.state is Expiry.EXPIRED else f"has under {WARN_REMAINING:.0%} of its lifetime left"
        problems.append(f"certificate {what} ({seen.describe()}): run mesh deploy to renew it")
    remaining = int(seen.remaining.total_seconds()) if seen.not_after else None
    return CertificateStatus(path, seen.state.value, serial, seen.not_after, remaining,
                             round(seen.fraction, 4) if seen.not_after else None,
                             seen.describe().removeprefix("expires "), served)


def _upstreams(expected: ExpectedProxy, clusters: CommandResult | None, consul: ConsulHealth,
               inventory_hosts: frozenset[str], problems: list[str]) -> tuple[UpstreamStatus, ...]:
    envoy = cluster_health(clusters.stdout) if clusters is not None else None
    found = []
    for service, cluster in expected.upstream_clusters:
        passing = total = drained = None
        if consul is not None:
            instances = [item for item in consul.get(service, []) if item.node in inventory_hosts]
            passing, total = sum(item.status == "passing" for item in instances), len(instances)
            drained = sum(item.drained for item in instances)
            critical = sum(item.status != "passing" and not item.drained for item in instances)
            if critical:  # a drained instance is held out on purpose (mesh drain): no problem
                problems.append(f"{service}: {critical} instance(s) critical in Consul")
        healthy = hosts = None
        if envoy is not None:
            flags = envoy.get(cluster, [])
            healthy, hosts = sum(flag == "healthy" for flag in flags), len(flags)
            if healthy == 0:
                problems.append(f"{service}: no healthy instance in Envoy")
        found.append(UpstreamStatus(service, passing, total, healthy, hosts, drained))
    return tuple(found)


def judge_watcher(readings: Readings) -> WatcherStatus:
    state = readings.get(reads.WATCHER, _NOTHING).text() or "unknown"
    rules = readings.get(reads.RULES, _NOTHING).ok
    problems = []
    if state != "active":
        problems.append(f"{reads.WATCHER_UNIT} is {state}")
    if not rules:
        problems.append(f"the reachability rules are not in place ({reads.RULES_PATH} check failed; the watcher or "
                        "mesh deploy applies them)")
    return WatcherStatus(state, rules, tuple(problems))


def judge_checker(readings: Readings, now: datetime) -> CheckerStatus:
    state = readings.get(reads.CHECKER, _NOTHING).text() or "unknown"
    problems = [] if state == "active" else [f"{reads.controller_env.CHECKER_UNIT} is {state}"]
    certificate = _certificate(reads.CHECKER_CERT_PATH, readings.get(reads.CHECKER_CERT, _NOTHING), now, problems)
    return CheckerStatus(state, certificate, tuple(problems))

