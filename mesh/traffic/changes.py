"""What `mesh route set/reset` and `mesh fault set/reset` write, and the wait until the controllers applied it.

Every change reads the stored override, makes the new one (a new revision, uuid4 hex) and writes it with
Consul's check-and-set, so two people changing one service at once never lose a change (the second re-reads).
A split keeps a stored fault and a fault keeps a stored split. It owns those rules; the keys and the stored shape
are kv.py's, the check-and-set loop and the wait mesh.runtime_kv's, the words the commands print commands.py's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from mesh import runtime_kv
from mesh.errors import UsageError
from mesh.inventory.model import Mesh, Protocol
from mesh.inventory.policy import Fault, TrafficOverride
from mesh.inventory.services import check_override
from mesh.runtime_kv import Unchanged, WaitResult, wait_applied
from mesh.suggest import did_you_mean
from mesh.traffic.kv import TrafficStore, encode_override
from mesh.traffic.options import Split

Written = runtime_kv.Written[TrafficOverride]
__all__ = ["Unchanged", "WaitResult", "Written", "wait_applied"]  # the commands and rollout take them from here

@dataclass(frozen=True)
class TrafficTarget:
    """A service as the traffic commands see it in the inventory."""

    service: str
    protocol: Protocol
    versions: tuple[str, ...]
    callers: tuple[str, ...]  # services whose workloads name it as an upstream (their proxies get its routes)


def traffic_target(mesh: Mesh, service: str) -> TrafficTarget:
    """The inventory's service; a UsageError (exit 5, with a did-you-mean) when it has none of that name."""
    workloads = mesh.services.get(service)
    if not workloads:
        raise UsageError(f"no service {service!r} in the inventory", did_you_mean(service, sorted(mesh.services)))
    callers = sorted({workload.service for workload in mesh.workloads
                      if any(upstream.service == service for upstream in workload.upstreams)})
    return TrafficTarget(service, workloads[0].protocol, mesh.versions(service), tuple(callers))


def new_revision() -> str:
    return uuid.uuid4().hex


def checked(target: TrafficTarget, override: TrafficOverride) -> TrafficOverride:
    """The override, once check_override finds nothing wrong with it for this service (else a UsageError
    naming every problem: the values came from the command line)."""
    problems = check_override(override, target.versions, target.protocol, target.service)
    if problems:
        hint = f"{target.service}'s versions: {', '.join(target.versions)}" if target.versions else None
        raise UsageError("; ".join(problems), hint)
    return override


Make = Callable[[TrafficOverride | None], TrafficOverride | None]


def update(store: TrafficStore, service: str, make: Make, who: str, now: Callable[[], datetime]) -> Written:
    """Read the stored override, make the next one from it (None: remove the key) and write it with
    check-and-set, again from a fresh read when someone else wrote meanwhile. Unchanged propagates."""
    return runtime_kv.update(store, service, make, encode_override, _empty, who, now)


def _empty(override: TrafficOverride) -> bool:
    return override.empty


def with_split(target: TrafficTarget, split: Split) -> Make:
    """`mesh route set`: the split, the stored fault kept."""
    def make(current: TrafficOverride | None) -> TrafficOverride:
        fault = current.fault if current is not None else None
        return checked(target, TrafficOverride(split=split, fault=fault, revision=new_revision()))
    return make


def with_fault(target: TrafficTarget, fault: Fault) -> Make:
    """`mesh fault set`: the fault, the stored split kept."""
    def make(current: TrafficOverride | None) -> TrafficOverride:
        split = current.split if current is not None else None
        return checked(target, TrafficOverride(split=split, fault=fault, revision=new_revision()))
    return make


def without_fault(current: TrafficOverride | None) -> TrafficOverride | None:
    """`mesh fault reset`: the stored split alone (None when there is none left)."""
    if current is None or current.fault is None:
        raise Unchanged("no run-time fault is stored")
    if current.split is None:
        return None
    return replace(current, fault=None, revision=new_revision())


def without_override(current: TrafficOverride | None) -> TrafficOverride | None:
    """`mesh route reset`: nothing (the key is removed, the inventory's routing comes back)."""
    del current
    return None
