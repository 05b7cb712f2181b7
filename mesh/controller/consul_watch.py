"""Blocking queries on Consul's health of every service the controller fills endpoints from, one thread each, and
on each run-time overrides' KV prefix (traffic, authorization: one thread each).

It owns the index rules (reset when it goes backwards, never below 1 after an answer), the backoff after errors
and how stale the controller's view is; it must not compute endpoints' files or reach hosts.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

import consul
import structlog

from mesh.catalog import ConsulAccess, connect
from mesh.controller.endpoints import ServiceEndpoints, service_endpoints

WAIT_S = 10.0  # Consul answers at once on a change; this only bounds how long one query may hang
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
MIN_INTERVAL_S = 0.02  # between two queries of one service: an index that does not move never spins

Entries = list[Mapping[str, Any]]
Fetch = Callable[[str, int, float], tuple[int, Entries]]  # (service or prefix, index, wait) -> (new index, entries)
OnAnswer = Callable[[ServiceEndpoints], None]
OnValues = Callable[[Mapping[str, str]], None]  # service -> its override's KV value (any prefix)


def next_index(previous: int, returned: int) -> int:
    """The index of the next blocking query, as Consul asks clients to keep it: 1 when Consul gave none or 0
    (0 would never block); back to 0 (a fresh read) when it went backwards (a snapshot restore, a new leader)."""
    if returned < 1:
        return 1
    if returned < previous:
        return 0
    return returned


def backoff_s(failures: int, jitter: Callable[[], float] = random.random) -> float:
    """How long to wait after `failures` consecutive errors: doubling from 0.5 s up to 10 s, +-20 %."""
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1))
    return base * (0.8 + 0.4 * jitter())


def consul_fetch(access: ConsulAccess) -> Fetch:
    """A Fetch through py-consul's blocking health query (one client per watch: each runs in its own thread)."""
    client = connect(access, timeout=WAIT_S + 5.0)

    def fetch(service: str, index: int, wait: float) -> tuple[int, Entries]:
        found, entries = client.health.service(service, index=index or None, wait=f"{int(wait)}s")
        return int(found or 0), list(entries or [])

    return fetch


def kv_values(entries: Iterable[Mapping[str, Any]], prefix: str) -> dict[str, str]:
    """service -> value text of a recursive KV read of `prefix` (keys below a service, and empty names, ignored)."""
    found = {}
    for entry in entries:
        key = str(entry.get("Key") or "")
        service = key[len(prefix):] if key.startswith(prefix) else ""
        if not service or "/" in service:
            continue
        value = entry.get("Value")
        found[service] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")
    return found


def consul_kv_fetch(access: ConsulAccess) -> Fetch:
    """A Fetch through py-consul's blocking recursive KV read of a prefix (no key under it: no entries)."""
    client = connect(access, timeout=WAIT_S + 5.0)

    def fetch(prefix: str, index: int, wait: float) -> tuple[int, Entries]:
        found, entries = client.kv.get(prefix, index=index or None, recurse=True, wait=f"{int(wait)}s")
        return int(found or 0), list(entries or [])

    return fetch


class BlockingWatch:
    """One blocking-query loop in a daemon thread: `what` is a service or a KV prefix; each answer that differs
    from the last (as read by `read`) goes to `deliver`."""

    def __init__(self, what: str, fetch: Fetch, read: Callable[[Entries], object],
                 deliver: Callable[[Any], None], wait_s: float = WAIT_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None) -> None:
        self.what = what
        self.fetch = fetch
        self.read = read
        self.deliver = deliver
        self.wait_s = wait_s
        self.clock = clock
        self.stopped = threading.Event()
        self.sleep = sleep or self.stopped.wait
        self.index = 0
        self.failures = 0
        self.started_at = clock()
        self.last_success: float | None = None
        self.last: object = None
        self.log = structlog.get_logger().bind(watch=what)
        self.thread = threading.Thread(target=self.run, name=f"watch-{what}", daemon=True)

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def staleness_s(self) -> float:
        """0 while the last query answered (Consul would answer a change at once); else seconds since the last
        answer (since the watch started when none came yet)."""
        if self.failures == 0 and self.last_success is not None:
            return 0.0
        return self.clock() - (self.last_success if self.last_success is not None else self.started_at)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.step()

    def step(self) -> None:
        """One query: deliver a changed answer, or back off after an error."""
        began = self.clock()
        try:
            returned, entries = self.fetch(self.what, self.index, self.wait_s)
        except (consul.ConsulException, OSError, ValueError) as exc:
            self.failures += 1
            delay = backoff_s(self.failures)
            if self.failures == 1 or self.failures % 10 == 0:
                self.log.warning("consul_watch_failed", error=_first_line(exc), failures=self.failures,
                                 retry_in_s=round(delay, 2))
            self.sleep(delay)
            return
        if self.failures:
            self.log.info("consul_watch_recovered", after_failures=self.failures)
        self.failures = 0
        self.last_success = self.clock()
        self.index = next_index(self.index, returned)
        seen = self.read(entries)
        if seen != self.last:
            self.last = seen
            self.deliver(seen)
        if self.clock() - began < MIN_INTERVAL_S:
            self.sleep(MIN_INTERVAL_S)


class ServiceWatch(BlockingWatch):
    """One service's health: `on_answer` gets each new ServiceEndpoints (this mesh's instances)."""

    def __init__(self, service: str, mesh_id: str, fetch: Fetch, on_answer: OnAnswer, wait_s: float = WAIT_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(service, fetch, lambda entries: service_endpoints(service, entries, mesh_id), on_answer,
                         wait_s, clock, sleep)
        self.service = service
        self.mesh_id = mesh_id


class PrefixWatch(BlockingWatch):
    """A run-time overrides' KV prefix (`mesh/<id>/traffic/`, `mesh/<id>/authz/`): `on_values` gets each new
    {service: value text} (empty when no key)."""

    def __init__(self, prefix: str, fetch: Fetch, on_values: OnValues, wait_s: float = WAIT_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(prefix, fetch, lambda entries: kv_values(entries, prefix), on_values, wait_s, clock, sleep)


class ConsulWatch:
    """A ServiceWatch per service; `watch(services)` starts the new ones and stops those no longer needed."""

    def __init__(self, mesh_id: str, make_fetch: Callable[[], Fetch], on_answer: OnAnswer,
                 wait_s: float = WAIT_S) -> None:
        self.mesh_id = mesh_id
        self.make_fetch = make_fetch
        self.on_answer = on_answer
        self.wait_s = wait_s
        self.watches: dict[str, ServiceWatch] = {}

    def watch(self, services: Iterable[str]) -> None:
        wanted = set(services)
        for service in sorted(set(self.watches) - wanted):
            self.watches.pop(service).stop()
        for service in sorted(wanted - set(self.watches)):
            self.watches[service] = ServiceWatch(service, self.mesh_id, self.make_fetch(), self.on_answer,
                                                 self.wait_s).start()

    def staleness_s(self) -> float:
        """The stalest service's staleness (0 with nothing to watch)."""
        return max((watch.staleness_s() for watch in self.watches.values()), default=0.0)

    def stop(self) -> None:
        for watch in self.watches.values():
            watch.stop()
        self.watches.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
