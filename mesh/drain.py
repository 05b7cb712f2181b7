"""`mesh drain SERVICE HOST [--undo]`: take a service's instance(s) on a host out of every caller's endpoints,
or bring them back, without touching the host.

Instances are external registrations (`consul maint` works only on agents), so a drain is a Consul check of
mesh's own (`mesh-drain:<service id>`, critical) on each instance: the controllers drop critical instances from
the endpoints they push; `--undo` deregisters that check alone. The health checker and a deploy's catalog sync
never write or remove it (mesh.catalog), so a re-deploy keeps a drained instance drained.

It owns choosing the instances from the inventory and saying what it did; the Consul shapes are catalog.py's.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

import click

from mesh import catalog
from mesh.catalog import DrainState, InstanceRef
from mesh.errors import EXIT_OK, MeshError, UsageError
from mesh.inventory.model import Mesh
from mesh.suggest import did_you_mean


class DrainCatalog(Protocol):
    """Where drains are read and written: Consul (ConsulDrains), or a fake in tests."""

    def states(self, service: str) -> Mapping[str, DrainState]: ...
    def set(self, ref: InstanceRef, output: str) -> None: ...
    def clear(self, ref: InstanceRef) -> None: ...


@dataclass(frozen=True)
class ConsulDrains:
    access: catalog.ConsulAccess

    def states(self, service: str) -> Mapping[str, DrainState]:
        return catalog.drain_states(self.access, service)

    def set(self, ref: InstanceRef, output: str) -> None:
        catalog.set_drain(self.access, ref, output)

    def clear(self, ref: InstanceRef) -> None:
        catalog.clear_drain(self.access, ref)


@dataclass(frozen=True)
class DrainChange:
    """What `mesh drain` did to one instance, in the words it prints."""

    ref: InstanceRef
    action: str  # drained | still drained | undrained | not drained

    def line(self) -> str:
        where = f"{self.ref.service_id} on {self.ref.node}"
        check = self.ref.drain_check_id
        return {
            "drained": f"drained {where}: check {check} is critical, callers' endpoints drop it",
            "still drained": f"drained {where} (it already was: check {check} rewritten)",
            "undrained": f"undrained {where}: check {check} removed, callers get it back while it passes",
            "not drained": f"{where} was not drained: nothing to undo",
        }[self.action]


def instances_on(mesh: Mesh, service: str, host: str) -> list[InstanceRef]:
    """The Consul instances of `service` on `host`, in inventory order. Pure; a UsageError (exit 5) with a
    did-you-mean when the inventory has no such host or service, or the service does not run there."""
    managed = [item.name for item in mesh.hosts]
    if host not in managed:
        if host in mesh.unmanaged_hosts:
            raise UsageError(f"host {host!r} runs no workload of the mesh (it is in the inventory, unmanaged)")
        raise UsageError(f"no managed host {host!r} in the inventory", did_you_mean(host, managed))
    services = sorted({workload.service for workload in mesh.workloads})
    if service not in services:
        raise UsageError(f"no service {service!r} in the inventory", did_you_mean(service, services))
    refs = [InstanceRef(host, workload.consul_id) for workload in mesh.host(host).workloads
            if workload.service == service]
    if not refs:
        elsewhere = sorted({item.host for item in mesh.workloads if item.service == service})
        here = sorted({workload.service for workload in mesh.host(host).workloads})
        raise UsageError(f"service {service!r} has no instance on {host} (it runs on {', '.join(elsewhere)})",
                         did_you_mean(service, here))
    return refs


def drain_output(who: str, at: datetime) -> str:
    """The drain check's Output: who drained the instance and when (UTC)."""
    return f"drained by {who} at {at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} (mesh drain)"


def apply_drain(mesh: Mesh, service: str, host: str, undo: bool, drains: DrainCatalog, who: str,
                now: Callable[[], datetime]) -> list[DrainChange]:
    """Drain (or with `undo`, undrain) the instances of `service` on `host`; each must be registered in Consul
    by this mesh id (else a MeshError naming it: deploy first)."""
    states = drains.states(service)
    found = [_registered(ref, states.get(ref.service_id), mesh.settings.id)
             for ref in instances_on(mesh, service, host)]  # every instance checked before any is changed
    changes = []
    for ref, state in found:
        if undo:
            if state.drain is None:
                changes.append(DrainChange(ref, "not drained"))
                continue
            drains.clear(ref)
            changes.append(DrainChange(ref, "undrained"))
        else:
            drains.set(ref, drain_output(who, now()))
            changes.append(DrainChange(ref, "still drained" if state.drain is not None else "drained"))
    return changes


def _registered(ref: InstanceRef, state: DrainState | None, mesh_id: str) -> tuple[InstanceRef, DrainState]:
    """The instance's catalog state, once it is known to be this mesh id's registration; else a MeshError."""
    if state is None or state.ref.node != ref.node:
        raise MeshError(f"{ref.service_id} is not registered in Consul on node {ref.node}", "run `mesh deploy` first")
    if state.owner is None:
        raise MeshError(f"{ref.service_id} on {ref.node} was not registered by mesh: not touched")
    if state.owner not in (mesh_id, ""):
        raise MeshError(f"{ref.service_id} on {ref.node} belongs to the mesh id {state.owner!r} "
                        f"(this inventory's is {mesh_id!r}): not touched")
    return ref, state


def operator() -> str:
    """Who runs this command, as `user@machine`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def no_active_controller(mesh: Mesh) -> str | None:
    """Why no controller is active (so a drain changes no caller's endpoints yet), or None when one is."""
    from mesh.status.controllers import read_controllers

    status = read_controllers(mesh).status
    return None if status.active else (status.reason or "none answers")


def drain(inventory_path: str, service: str, host: str, undo: bool = False,
          drains: DrainCatalog | None = None, echo: Callable[[str], None] = click.echo,
          warn: Callable[[str], None] | None = None,
          controllers: Callable[[Mesh], str | None] = no_active_controller) -> int:
    """`mesh drain`: load and check the inventory, drain or undrain, print one line per instance (and a warning
    when no controller is active to act on it); exit 0."""
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    mesh = check_inventory(load_inventory(inventory_path), inventory_path).mesh
    instances_on(mesh, service, host)  # a misspelled name is refused before Consul is asked anything
    drains = drains or ConsulDrains(catalog.access_for(mesh))
    for change in apply_drain(mesh, service, host, undo, drains, operator(), lambda: datetime.now(UTC)):
        echo(change.line())
    inactive = controllers(mesh)
    if inactive is not None:
        (warn or partial(click.echo, err=True))(f"[WARNING]: no controller is active ({inactive}): callers' endpoints follow Consul only while one "
             "runs (mesh_controllers, deployed by mesh deploy)")
    return EXIT_OK
