"""Builds the validated Mesh from an inventory's data: renders the variables mesh reads and checks every rule
of INVENTORY.md, collecting all errors. It must not read files (the loader does) nor connect to hosts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, cast

from mesh.errors import InventoryError, InventoryErrors
from mesh.inventory.authz import AUTHZ_DEFAULT_KEY, read_authz_default, total_denial
from mesh.inventory.connection import read_connection, ssh_port
from mesh.inventory.data import InventoryData, Var
from mesh.inventory.delivery import DELIVERY_KEY, Delivery, check_controllers_for_xds, read_delivery
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import CONTROLLERS_GROUP, HostKind, ManagedHost, Mesh, MeshSettings, Workload
from mesh.inventory.policy import NO_POLICY, ServicePolicy
from mesh.inventory.policy_values import check_zone
from mesh.inventory.scrapers import SCRAPERS_KEY, MetricsSources, read_metrics_scrapers
from mesh.inventory.services import SERVICES_KEY, ServiceFacts, read_services
from mesh.inventory.templating import Templating, host_groups
from mesh.inventory.tracing import TRACING_KEY, read_tracing
from mesh.inventory.values import (
    BadValue,
    check_host_name,
    check_local_path,
    check_trust_domain,
    check_url,
    describe,
    parse_cert_ttl,
    parse_renew_fraction,
)
from mesh.inventory.workloads import ParsedWorkload, check_ports, read_workloads
from mesh.suggest import did_you_mean

MESH_WIDE = ("mesh_trust_domain", "mesh_consul_url", "mesh_state_dir", "mesh_cert_ttl", "mesh_cert_renew_fraction",
             "mesh_known_hosts", "mesh_id", "mesh_consul_token_file", "mesh_consul_ca_file", AUTHZ_DEFAULT_KEY,
             SCRAPERS_KEY, SERVICES_KEY, TRACING_KEY)
PER_HOST = ("mesh_host_kind", "mesh_workloads", "mesh_zone", "mesh_region", DELIVERY_KEY)
MESH_VARIABLES = MESH_WIDE + PER_HOST
HOST_KINDS = ("vm", "container_host")

VarsOf = Callable[[InventoryData, str], Mapping[str, Var]]


@dataclass(frozen=True)
class _HostReading:
    """What one host says: its kind, workloads, whether mesh manages it, and its mesh-wide values."""

    name: str
    kind: HostKind
    workloads: list[ParsedWorkload]
    workloads_where: Located | None  # set when mesh_workloads is a non-empty list, even if invalid
    is_controller: bool
    wide: dict[str, Located]
    delivery: Delivery = "files"
    delivery_where: Located | None = None  # where mesh_delivery is set for this host, if it is


def build_mesh(data: InventoryData, inventory_path: str, vars_of: VarsOf | None = None,
               dynamic: bool = False) -> Mesh:
    """The validated Mesh of an inventory, or InventoryErrors listing every problem (file, line, key).

    vars_of(data, host) gives a host's merged variables; it defaults to the reader's host_vars_with_origins.
    dynamic says the inventory was a script or plugin (mesh_state_dir then starts at the current directory).
    """
    if vars_of is None:
        from mesh.inventory.resolve import host_vars_with_origins

        vars_of = host_vars_with_origins
    reader = vars_of
    templating = Templating(data, lambda host: reader(data, host))
    problems = Problems()
    _check_variable_names(data, problems)
    controllers = set(_hosts_in(data, CONTROLLERS_GROUP))
    readings = [_read_host(data, templating, name, name in controllers, problems) for name in data.hosts]
    chosen = _mesh_wide_values(readings, problems)
    settings = _settings(chosen, inventory_path, dynamic, problems)
    managed = [_managed_host(templating, reading, settings, problems) for reading in readings
               if reading.workloads_where or reading.is_controller]
    _check_mesh(data, readings, settings, problems)
    check_controllers_for_xds(data, [(r.delivery_where, r.delivery) for r in readings
                                     if r.workloads_where or r.is_controller],
                              any(r.is_controller for r in readings), problems)
    controllers_read = [host.name for host in managed if host is not None and host.is_controller]
    scrapers = _metrics_scrapers(data, templating, readings, controllers_read, chosen, problems)
    policies = _policies(readings, chosen, settings.trust_domain, problems)
    _check_declared_calls(readings, chosen, settings, policies, problems)
    if problems.errors:
        raise InventoryErrors(problems.errors)
    hosts = tuple(host for host in managed if host is not None)
    return Mesh(
        settings=settings,
        hosts=hosts,
        unmanaged_hosts=tuple(r.name for r in readings if not (r.workloads_where or r.is_controller)),
        services=_services(hosts),
        metrics_scrapers=scrapers,
        policies=policies,
    )


def _lookup(templating: Templating, host: str, problems: Problems) -> Callable[[str], Located | None]:
    """A host's rendered variable by name (None when unset or when rendering failed, recorded)."""

    def lookup(name: str) -> Located | None:
        var = templating.raw_vars(host).get(name)
        if var is None:
            return None
        try:
            value = templating.render(host, name)
        except InventoryError as exc:
            problems.add(exc)
            return None
        return Located(value, var.origin, name, var.marks)

    return lookup


def _read_host(data: InventoryData, templating: Templating, name: str, is_controller: bool,
               problems: Problems) -> _HostReading:
    lookup = _lookup(templating, name, problems)
    kind: HostKind = "vm"
    kind_spot = lookup("mesh_host_kind")
    if kind_spot is not None:
        if kind_spot.value in HOST_KINDS:
            kind = cast(HostKind, kind_spot.value)
        else:
            problems.at(kind_spot, f"expected vm or container_host, got {kind_spot.value!r}",
                        did_you_mean(str(kind_spot.value), HOST_KINDS))
    workloads_spot = lookup("mesh_workloads")
    workloads = [] if workloads_spot is None else read_workloads(name, kind, workloads_spot, problems)
    wide = {key: spot for key in MESH_WIDE if (spot := lookup(key)) is not None}
    listed = workloads_spot if workloads_spot is not None and workloads_spot.value else None
    delivery_spot = lookup(DELIVERY_KEY)
    delivery = read_delivery(delivery_spot, problems)
    return _HostReading(name, kind, workloads, listed, is_controller, wide, delivery, delivery_spot)


def _managed_host(templating: Templating, reading: _HostReading, settings: MeshSettings,
                  problems: Problems) -> ManagedHost | None:
    lookup = _lookup(templating, reading.name, problems)
    _check_host_name(templating, reading.name, problems)
    written = {name: var.origin for name, var in templating.raw_vars(reading.name).items()}
    connection = read_connection(reading.name, written, lookup, settings.known_hosts, problems)
    check_ports(reading.name, reading.kind, ssh_port(lookup), reading.workloads, problems)
    zone, region = (_place(lookup, name, problems) for name in ("mesh_zone", "mesh_region"))
    if connection is None:
        return None
    workloads = tuple(replace(item.workload, trust_domain=settings.trust_domain) for item in reading.workloads)
    return ManagedHost(reading.name, reading.kind, connection, workloads, reading.is_controller, zone, region,
                       reading.delivery)


def _place(lookup: Callable[[str], Located | None], name: str, problems: Problems) -> str | None:
    """A host's `mesh_zone` or `mesh_region` (None when unset or invalid, recorded)."""
    spot = lookup(name)
    return None if spot is None else problems.read(spot, check_zone)


def _policies(readings: list[_HostReading], chosen: dict[str, Located], trust_domain: str,
              problems: Problems) -> Mapping[str, ServicePolicy]:
    """`mesh_services`, checked against the services the inventory runs: their versions and protocol."""
    if SERVICES_KEY not in chosen:
        return MappingProxyType({})
    instances: dict[str, list[Workload]] = {}
    for reading in readings:
        for item in reading.workloads:
            instances.setdefault(item.workload.service, []).append(item.workload)
    facts = {}
    for service, workloads in instances.items():
        protocols = {workload.protocol for workload in workloads}
        facts[service] = ServiceFacts(service, tuple(sorted({workload.version for workload in workloads})),
                                      next(iter(protocols)) if len(protocols) == 1 else None)
    policies = read_services(chosen[SERVICES_KEY], facts, _written_services(readings), problems, trust_domain)
    return MappingProxyType(dict(sorted(policies.items())))


def _check_declared_calls(readings: list[_HostReading], chosen: dict[str, Located], settings: MeshSettings,
                          policies: Mapping[str, ServicePolicy], problems: Problems) -> None:
    """A workload's upstream whose authorization denies that workload's service every request is an error at
    the upstream entry (partial denies are fine). A policy that could not be read is not judged."""
    services = chosen.get(SERVICES_KEY)
    written = services.value if services is not None and isinstance(services.value, dict) else {}
    for item in (item for reading in readings for item in reading.workloads):
        caller = item.workload.service
        for name, spot in item.upstreams:
            if name in written and name not in policies:
                continue
            denial = total_denial(caller, settings.trust_domain, policies.get(name, NO_POLICY),
                                  settings.authz_default)
            if denial is not None:
                problems.at(spot, f"{caller} calls {name}, but {name}'s authorization denies {caller} every "
                                  f"request: {denial.reason}{_rule_origin(services, name, denial.deny_index)}",
                            "allow it some requests, or remove the upstream")


def _rule_origin(services: Located | None, name: str, index: int | None) -> str:
    """` (file:line:column)` of the deny rule at `index` of mesh_services.<name>.authz.deny, when known."""
    if services is None or index is None:
        return ""
    try:
        spot = services.child(name).child("authz").child("deny").child(index)
    except (KeyError, IndexError, TypeError):
        return ""
    return f" ({spot.origin})"


def _metrics_scrapers(data: InventoryData, templating: Templating, readings: list[_HostReading],
                      controllers: list[str], chosen: dict[str, Located], problems: Problems) -> tuple[str, ...]:
    """The addresses of `mesh_metrics_scrapers`; with workloads (metrics ports exist), the address of each
    controller whose connection could be read is checked too, since it may reach them as well
    (Mesh.metrics_sources)."""
    sources = MetricsSources(lambda host: _address_spot(templating, host, problems), problems)
    scrapers = read_metrics_scrapers(data, chosen[SCRAPERS_KEY], sources, problems) if SCRAPERS_KEY in chosen else ()
    if any(reading.workloads_where for reading in readings):
        for name in controllers:
            sources.address(name, f"{name} is a controller (it may reach every metrics port)")
    return scrapers


def _address_spot(templating: Templating, host: str, problems: Problems) -> Located:
    """Where a host's address is written: ansible_ssh_host, else ansible_host (as Ansible's ssh plugin reads
    them), else its name at the host's own line."""
    lookup = _lookup(templating, host, problems)
    spot = lookup("ansible_ssh_host") or lookup("ansible_host")
    return spot or Located(host, templating.inventory.hosts[host].origin, f"host {host!r}")


def _check_host_name(templating: Templating, name: str, problems: Problems) -> None:
    """A managed host's name goes into files run as root on it: hostname characters only. Hosts mesh leaves
    alone keep any name Ansible accepts."""
    try:
        check_host_name(name)
    except BadValue as exc:
        problems.add(InventoryError(templating.inventory.hosts[name].origin, str(exc), key=f"host {name!r}"))


def _check_variable_names(data: InventoryData, problems: Problems) -> None:
    """Unknown mesh_* variables anywhere (hosts, groups, group_vars, host_vars) are errors."""
    layers = [*(g.vars for g in data.groups.values()), *(g.file_vars for g in data.groups.values()),
              *(h.vars for h in data.hosts.values()), *(h.file_vars for h in data.hosts.values())]
    for layer in layers:
        for name, var in layer.items():
            if not name.startswith("mesh_") or name in MESH_VARIABLES:
                continue
            hint = did_you_mean(name, MESH_VARIABLES)
            if name == CONTROLLERS_GROUP:
                hint = "mesh_controllers is a group: put the controller hosts in it"
            problems.add(InventoryError(var.origin, f"unknown mesh variable; known: {', '.join(MESH_VARIABLES)}",
                                        key=name, hint=hint))


def _settings(chosen: dict[str, Located], inventory_path: str, dynamic: bool, problems: Problems) -> MeshSettings:
    defaults = MeshSettings()
    trust_domain = _wide(chosen, "mesh_trust_domain", check_trust_domain, problems) or defaults.trust_domain
    consul_url = _wide(chosen, "mesh_consul_url", check_url, problems)
    state_dir = _wide(chosen, "mesh_state_dir", lambda v: check_local_path(v, "a folder path"), problems)
    ttl = _wide(chosen, "mesh_cert_ttl", parse_cert_ttl, problems) or defaults.cert_ttl
    renew_fraction = _wide(chosen, "mesh_cert_renew_fraction", parse_renew_fraction, problems)
    known_hosts = _wide(chosen, "mesh_known_hosts", lambda v: check_local_path(v, "a file path"), problems)
    mesh_id = _wide(chosen, "mesh_id", check_mesh_id, problems)
    token_file = _wide(chosen, "mesh_consul_token_file", lambda v: check_local_path(v, "a file path"), problems)
    consul_ca_file = _wide(chosen, "mesh_consul_ca_file", lambda v: check_local_path(v, "a file path"), problems)
    authz_default = read_authz_default(chosen.get(AUTHZ_DEFAULT_KEY), problems)
    tracing = read_tracing(chosen.get(TRACING_KEY), problems)
    return MeshSettings(
        trust_domain=trust_domain,
        consul_url=consul_url,
        state_dir=resolve_state_dir(state_dir or defaults.state_dir, inventory_path, dynamic),
        cert_ttl=ttl,
        cert_renew_fraction=defaults.cert_renew_fraction if renew_fraction is None else renew_fraction,
        known_hosts=known_hosts or defaults.known_hosts,
        mesh_id=mesh_id,
        consul_token_file=token_file and resolve_state_dir(token_file, inventory_path, dynamic),
        consul_ca_file=consul_ca_file and resolve_state_dir(consul_ca_file, inventory_path, dynamic),
        authz_default=authz_default,
        tracing=tracing,
    )


_MESH_ID = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


def check_mesh_id(value: Any) -> str:
    """`mesh_id`: lower-case letters, digits, '.', '-' and '_', at most 64, a letter or digit at both ends (it
    goes into Consul Meta and KV keys)."""
    if not isinstance(value, str) or not _MESH_ID.fullmatch(value):
        raise BadValue(f"expected a mesh id such as 'lab.mesh' (a-z, 0-9, '.', '-', '_', at most 64, a letter or "
                       f"digit at both ends), got {describe(value)}")
    return value


def _mesh_wide_values(readings: list[_HostReading], problems: Problems) -> dict[str, Located]:
    """One value per mesh-wide variable; every host that sets it must agree."""
    chosen: dict[str, tuple[str, Located]] = {}
    for reading in readings:
        for key, spot in reading.wide.items():
            if key not in chosen:
                chosen[key] = (reading.name, spot)
                continue
            first_host, first = chosen[key]
            if spot.value != first.value:
                problems.at(spot, f"a mesh-wide variable must be the same on every host: {reading.name} has "
                                  f"{spot.value!r}, {first_host} has {first.value!r} ({first.origin})",
                            "set it once, in `all: vars:` or group_vars/all.yml")
    return {key: spot for key, (_, spot) in chosen.items()}


def _wide(chosen: dict[str, Located], key: str, reader: Callable[[Any], Any], problems: Problems) -> Any:
    return problems.read(chosen[key], reader) if key in chosen else None


def resolve_state_dir(state_dir: str, inventory_path: str, dynamic: bool = False) -> str:
    """mesh_state_dir made absolute: relative paths start at the inventory's folder (the folder itself when
    the inventory is a folder, the current directory for a dynamic inventory)."""
    path = os.path.expanduser(state_dir)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if dynamic or (os.path.isfile(inventory_path) and os.access(inventory_path, os.X_OK)):
        base = os.getcwd()
    elif os.path.isdir(inventory_path):
        base = os.path.abspath(inventory_path)
    else:
        base = os.path.dirname(os.path.abspath(inventory_path))
    return os.path.normpath(os.path.join(base, path))


def _check_mesh(data: InventoryData, readings: list[_HostReading], settings: MeshSettings,
                problems: Problems) -> None:
    """The rules that look at the whole inventory: Consul URL, controllers, upstreams."""
    workloads = [item for reading in readings for item in reading.workloads]
    where = next((r.workloads_where for r in readings if r.workloads_where is not None), None)
    if where is None:
        return
    if not any("mesh_consul_url" in r.wide for r in readings):
        problems.at(Located(None, where.origin, "mesh_consul_url"),
                    "mesh_consul_url is required when any host has workloads (Consul's HTTP API, such as "
                    "http://10.77.0.2:8500)", "set it in `all: vars:` or group_vars/all.yml")
    if not any(r.is_controller for r in readings):
        hint = did_you_mean(CONTROLLERS_GROUP, [g for g in data.groups if g not in ("all", "ungrouped")])
        problems.at(Located(None, where.origin, CONTROLLERS_GROUP),
                    f"the inventory has workloads but no host in the group {CONTROLLERS_GROUP}, which runs mesh's "
                    "health checker", hint or f"add a group {CONTROLLERS_GROUP} with at least one host")
    # Services of workloads with errors count too, so that one mistake is reported once.
    services = sorted({item.workload.service for item in workloads} | _written_services(readings))
    for item in workloads:
        for name, spot in item.upstreams:
            if name not in services:
                problems.at(spot.child("service"), f"no host runs the service {name!r}; known services: {', '.join(services)}",
                            did_you_mean(name, services))


def _written_services(readings: list[_HostReading]) -> set[str]:
    return {
        item["service"] for r in readings if r.workloads_where is not None and isinstance(r.workloads_where.value, list)
        for item in r.workloads_where.value if isinstance(item, dict) and isinstance(item.get("service"), str)
    }


def _hosts_in(data: InventoryData, group: str) -> list[str]:
    return [name for name in data.hosts if group in host_groups(data, name)]


def _services(hosts: tuple[ManagedHost, ...]) -> Mapping[str, tuple[Workload, ...]]:
    services: dict[str, list[Workload]] = {}
    for host in hosts:
        for workload in host.workloads:
            services.setdefault(workload.service, []).append(workload)
    return MappingProxyType({name: tuple(items) for name, items in sorted(services.items())})

