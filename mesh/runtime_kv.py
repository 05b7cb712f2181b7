"""Run-time overrides in Consul KV, whatever they override (routing: mesh.traffic.kv, authorization:
mesh.authz.kv): one key per service under a prefix (`mesh/<mesh_id>/<kind>/<service>`) holding the override's JSON
with who set it and when; the controllers' report of what every proxy applied (a section of their published state,
service -> revision); check-and-set writes; the deploy's read; the wait until applied.

It owns the storage, the report and the waiting; what an override means is the caller's (a `parse` function, a
`usable` check, a `Make`). It must not print.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from mesh import catalog
from mesh.controller.spec import lock_key, state_key
from mesh.errors import MeshError
from mesh.inventory.services import PolicyError
from mesh.status.controllers import judge_controllers


class Revisioned(Protocol):
    """An override: every change of it gets a new revision (the controllers report the one they applied)."""

    @property
    def revision(self) -> str: ...


T = TypeVar("T", bound=Revisioned)
Parse = Callable[[Mapping[str, Any]], T]  # an override from its JSON; PolicyError naming every problem

MAX_VALUE = 64 * 1024  # an override is a few hundred bytes; Consul's own limit is 512 KiB
WRITE_ATTEMPTS = 5  # check-and-set retries when someone else changes the same key meanwhile
POLL_S = 0.5
NO_LOCK_GRACE_S = 5.0  # nobody holds the controllers' lock this long: stop waiting


def kv_prefix(mesh_id: str, kind: str) -> str:
    """Where every service's override of one kind lives (`traffic`, `authz`; the controllers watch it)."""
    return f"mesh/{mesh_id}/{kind}/"


@dataclass(frozen=True)
class Stored(Generic[T]):
    """One service's override as Consul holds it; `override` is None when the value is not one mesh can read
    (`problem` says why: the controllers then ignore it and the inventory holds)."""

    service: str
    override: T | None
    problem: str | None = None
    set_by: str = ""
    at: str = ""
    index: int = 0  # Consul's ModifyIndex: a write or delete checks it (check-and-set)


def encode_value(document: Mapping[str, Any]) -> str:
    """The KV value of an override's JSON document, keys sorted."""
    return json.dumps(document, sort_keys=True)


def time_text(at: datetime) -> str:
    """When a value was set, as stored: UTC to the second."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decode_value(service: str, value: bytes | str | None, index: int, parse: Parse[T], what: str) -> Stored[T]:
    """A KV value read back; never raises: what cannot be read is a Stored with a problem."""
    raw = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else (value or "")
    if len(raw) > MAX_VALUE:
        return Stored(service, None, f"the value is larger than {MAX_VALUE} bytes", index=index)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return Stored(service, None, f"not JSON: {exc}", index=index)
    if not isinstance(data, dict):
        return Stored(service, None, "not a JSON object", index=index)
    try:
        override = parse(data)
    except PolicyError as exc:
        return Stored(service, None, f"not {what}: {'; '.join(exc.problems)}", index=index)
    return Stored(service, override, None, _text(data.get("set_by")), _text(data.get("at")), index)


def _text(value: object) -> str:
    return value[:200] if isinstance(value, str) else ""


@dataclass(frozen=True)
class AppliedRevisions:
    """The controllers' report: whether one is active (else why not) and, per service, the revision of the
    override every proxy concerned reflects ("" = none; a service is absent while a push is pending)."""

    active: bool
    reason: str | None = None
    lock_held: bool = False
    revisions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def revision(self, service: str) -> str | None:
        return self.revisions.get(service) if self.active else None


def applied_revisions(lock_session: str | None, state_value: bytes | str | None, now: datetime,
                      section: str) -> AppliedRevisions:
    """The report from the lock's session and the published state's text (its `section` map). Pure."""
    view = judge_controllers(lock_session, state_value, now)
    revisions: dict[str, str] = {}
    try:
        document = json.loads(state_value or b"")
    except ValueError:
        document = None
    found = document.get(section) if isinstance(document, dict) else None
    for service, revision in (found.items() if isinstance(found, dict) else ()):
        if isinstance(revision, str):
            revisions[str(service)] = revision
    return AppliedRevisions(view.status.active, view.status.reason, view.status.lock_held,
                            MappingProxyType(revisions))


class OverrideStore(Protocol[T]):
    """Where one kind of override is read and written: Consul (ConsulOverrides), or a fake in tests."""

    def read(self, service: str) -> Stored[T] | None: ...

    def read_all(self) -> Mapping[str, Stored[T]]: ...

    def write(self, service: str, value: str, index: int) -> bool:
        """Check-and-set: stores value only if the key is unchanged since `index` was read (0: only if it does
        not exist); False otherwise."""
        ...

    def delete(self, service: str, index: int) -> bool:
        """Check-and-set delete of the value read at `index`; False when it changed meanwhile."""
        ...

    def applied(self) -> AppliedRevisions: ...


@dataclass(frozen=True)
class ConsulOverrides(Generic[T]):
    """One kind of override in the mesh's Consul (token and CA as every command uses them)."""

    access: catalog.ConsulAccess
    mesh_id: str
    kind: str  # the key segment, and the section of the controllers' state reporting it
    parse: Parse[T]
    what: str  # "an override", "an authorization override": in a problem's words

    @property
    def prefix(self) -> str:
        return kv_prefix(self.mesh_id, self.kind)

    def decode(self, service: str, entry: Mapping[str, Any]) -> Stored[T]:
        return decode_value(service, entry.get("Value"), int(entry.get("ModifyIndex") or 0), self.parse, self.what)

    def read(self, service: str) -> Stored[T] | None:
        with catalog.client_for(self.access) as client:
            _, entry = client.kv.get(self.prefix + service)
        return self.decode(service, entry) if entry else None

    def read_all(self) -> Mapping[str, Stored[T]]:
        with catalog.client_for(self.access) as client:
            _, entries = client.kv.get(self.prefix, recurse=True)
        found = {}
        for entry in entries or []:
            service = str(entry.get("Key", ""))[len(self.prefix):]
            if service and "/" not in service:
                found[service] = self.decode(service, entry)
        return dict(sorted(found.items()))

    def write(self, service: str, value: str, index: int) -> bool:
        with catalog.client_for(self.access) as client:
            return bool(client.kv.put(self.prefix + service, value, cas=index))

    def delete(self, service: str, index: int) -> bool:
        with catalog.client_for(self.access) as client:
            return bool(client.kv.delete(self.prefix + service, cas=index))

    def applied(self) -> AppliedRevisions:
        try:
            with catalog.client_for(self.access) as client:
                _, lock = client.kv.get(lock_key(self.mesh_id))
                _, state = client.kv.get(state_key(self.mesh_id))
        except MeshError as exc:
            return AppliedRevisions(False, f"Consul not read: {exc}")
        session = (lock or {}).get("Session")
        return applied_revisions(str(session) if session else None, (state or {}).get("Value"), datetime.now(UTC),
                                 self.kind)


def read_usable(stored: Mapping[str, Stored[T]], usable: Callable[[Stored[T]], list[str]],
                empty: Callable[[T], bool], warn: Callable[[str], None], reset: str) -> Mapping[str, T]:
    """Every stored override that applies (`usable` finds no problem), as a deploy plans with it; one that does
    not is named in a warning (`reset` is the command that removes it, with `{service}` in it) and left out, as
    the controllers do."""
    found: dict[str, T] = {}
    for service, item in stored.items():
        problems = usable(item)
        if problems:
            warn(f"the run-time override of {service} is ignored: {'; '.join(problems)} "
                 f"(`{reset.format(service=service)}` removes it)")
        elif item.override is not None and not empty(item.override):
            found[service] = item.override
    return MappingProxyType(found)


def read_all_or_warn(store: Callable[[], OverrideStore[T]], warn: Callable[[str], None], what: str,
                     fallback: str) -> Mapping[str, Stored[T]]:
    """Every stored override; a Consul that cannot be read is a warning (naming `what`, and the `fallback` that
    holds then) and none. A token Consul refuses still raises (catalog.TokenRefused, exit 1)."""
    try:
        return store().read_all()
    except catalog.TokenRefused:
        raise
    except MeshError as exc:
        warn(f"cannot read the run-time {what} ({exc}): {fallback}")
        return MappingProxyType({})


# ---- changing one and waiting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written(Generic[T]):
    """What a change stored: the new override (None: the key was removed) and the revision the proxies will
    reflect once the controllers applied it ("" after a removal); `replaced` names an unreadable value that
    was overwritten."""

    service: str
    override: T | None
    replaced: str | None = None

    @property
    def revision(self) -> str:
        return self.override.revision if self.override is not None else ""


class Unchanged(Exception):
    """Raised by a Make when there is nothing to change; its message says why."""


def update(store: OverrideStore[T], service: str, make: Callable[[T | None], T | None],
           encode: Callable[[T, str, datetime], str], empty: Callable[[T], bool], who: str,
           now: Callable[[], datetime]) -> Written[T]:
    """Read the stored override, make the next one from it (None or empty: remove the key) and write it with
    check-and-set, again from a fresh read when someone else wrote meanwhile. Unchanged propagates."""
    for _ in range(WRITE_ATTEMPTS):
        stored = store.read(service)
        current = stored.override if stored is not None else None
        wanted = make(current)
        if wanted is not None and empty(wanted):
            wanted = None
        replaced = stored.problem if stored is not None and stored.override is None else None
        if wanted is None:
            if stored is None:
                raise Unchanged("no override is stored")
            done = store.delete(service, stored.index)
        else:
            done = store.write(service, encode(wanted, who, now()), stored.index if stored else 0)
        if done:
            return Written(service, wanted, replaced)
    raise MeshError(f"the override of {service} kept changing under this command ({WRITE_ATTEMPTS} tries)",
                    "someone else is changing it: try again")


@dataclass(frozen=True)
class WaitResult:
    applied: bool
    seconds: float
    last: AppliedRevisions

    def why_not(self, service: str, revision: str, where: str = "every caller") -> str:
        """Why the proxies (`where`) do not reflect `revision` yet, in words."""
        last = self.last
        if not last.active:
            return f"no controller is active ({last.reason})"
        reported = last.revisions.get(service)
        wanted = f"revision {revision}" if revision else "the removal"
        if reported is None:
            return f"the active controller has not applied {wanted} to {where} (a push is pending or failed)"
        shown = f"revision {reported}" if reported else "no override"
        return f"the active controller reports {shown}, not {wanted} (a push is pending or failed)"


def not_applied_text(service: str, revision: str, timeout: float, waited: WaitResult,
                     where: str = "every caller") -> str:
    """What a command says when the wait ended before the controllers reported `revision` ("" = the removal)."""
    what = f"revision {revision}" if revision else "the removal"
    return (f"{service}: {what} not applied within {timeout:g} s: {waited.why_not(service, revision, where)}; it "
            "stays stored in Consul: a controller applies it when one runs, or the next `mesh deploy` does")


class Reporting(Protocol):
    def applied(self) -> AppliedRevisions: ...


def wait_applied(store: Reporting, service: str, revision: str, timeout: float,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 poll: float = POLL_S) -> WaitResult:
    """Poll the controllers' report until it names `revision` for `service` ("" = no override), for at most
    `timeout` seconds; stop early once nobody held the controllers' lock for NO_LOCK_GRACE_S."""
    started = clock()
    while True:
        last = store.applied()
        elapsed = clock() - started
        if last.revision(service) == revision:
            return WaitResult(True, elapsed, last)
        if elapsed >= timeout or (not last.lock_held and elapsed >= min(NO_LOCK_GRACE_S, timeout)):
            return WaitResult(False, elapsed, last)
        sleep(min(poll, max(0.0, timeout - elapsed)))
