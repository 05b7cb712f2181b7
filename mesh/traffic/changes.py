"""What `mesh route set/reset` and `mesh fault set/reset` write, and the wait until the controllers applied it.

Every change reads the stored override, makes the new one (a new revision, uuid4 hex) and writes it with
Consul's check-and-set, so two people changing one service at once never lose a change (the second re-reads).
A split keeps a stored fault and a fault keeps a stored split. It owns those rules and the wait; the keys and
the stored shape are kv.py's, the words the commands print are commands.py's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from mesh.errors import MeshError, UsageError
from mesh.inventory.model import Mesh, Protocol
from mesh.inventory.policy import Fault, TrafficOverride
from mesh.inventory.services import check_override
from mesh.suggest import did_you_mean
from mesh.traffic.kv import AppliedTraffic, TrafficStore, encode_override
from mesh.traffic.options import Split

WRITE_ATTEMPTS = 5  # check-and-set retries when someone else changes the same key meanwhile
POLL_S = 0.5
NO_LOCK_GRACE_S = 5.0  # nobody holds the controllers' lock this long: stop waiting


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


@dataclass(frozen=True)
class Written:
    """What a change stored: the new override (None: the key was removed) and the revision callers will
    reflect once the controllers applied it ("" after a removal); `replaced` names an unreadable value that
    was overwritten."""

    service: str
    override: TrafficOverride | None
    replaced: str | None = None

    @property
    def revision(self) -> str:
        return self.override.revision if self.override is not None else ""


Make = Callable[[TrafficOverride | None], TrafficOverride | None]


class Unchanged(Exception):
    """Raised by a Make when there is nothing to change; its message says why."""


def update(store: TrafficStore, service: str, make: Make, who: str, now: Callable[[], datetime]) -> Written:
    """Read the stored override, make the next one from it (None: remove the key) and write it with
    check-and-set, again from a fresh read when someone else wrote meanwhile. Unchanged propagates."""
    for _ in range(WRITE_ATTEMPTS):
        stored = store.read(service)
        current = stored.override if stored is not None else None
        wanted = make(current)
        if wanted is not None and wanted.empty:
            wanted = None
        replaced = stored.problem if stored is not None and stored.override is None else None
        if wanted is None:
            if stored is None:
                raise Unchanged("no override is stored")
            done = store.delete(service, stored.index)
        else:
            done = store.write(service, encode_override(wanted, who, now()), stored.index if stored else 0)
        if done:
            return Written(service, wanted, replaced)
    raise MeshError(f"the override of {service} kept changing under this command ({WRITE_ATTEMPTS} tries)",
                    "someone else is changing it: try again")


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


@dataclass(frozen=True)
class WaitResult:
    applied: bool
    seconds: float
    last: AppliedTraffic

    def why_not(self, service: str, revision: str) -> str:
        """Why callers do not reflect `revision` yet, in words."""
        last = self.last
        if not last.active:
            return f"no controller is active ({last.reason})"
        reported = last.revisions.get(service)
        wanted = f"revision {revision}" if revision else "the removal"
        if reported is None:
            return f"the active controller has not applied {wanted} to every caller (a push is pending or failed)"
        shown = f"revision {reported}" if reported else "no override"
        return f"the active controller reports {shown}, not {wanted} (a push is pending or failed)"


def wait_applied(store: TrafficStore, service: str, revision: str, timeout: float,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 poll: float = POLL_S) -> WaitResult:
    """Poll the controllers' report until every caller of `service` reflects `revision` ("" = no override), for
    at most `timeout` seconds; stop early once nobody held the controllers' lock for NO_LOCK_GRACE_S."""
    started = clock()
    while True:
        last = store.applied()
        elapsed = clock() - started
        if last.revision(service) == revision:
            return WaitResult(True, elapsed, last)
        if elapsed >= timeout or (not last.lock_held and elapsed >= min(NO_LOCK_GRACE_S, timeout)):
            return WaitResult(False, elapsed, last)
        sleep(min(poll, max(0.0, timeout - elapsed)))

