"""The checker's loop: hold or wait for leadership, probe every instance concurrently, write status changes.

It owns when to probe and what to write; how to probe is probe.py's, how to write is catalog.py's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import structlog

from mesh import catalog
from mesh.errors import MeshError
from mesh.healthcheck.config import CheckerConfig, Instance
from mesh.healthcheck.probe import ProbeResult

MAX_WORKERS = 32

Prober = Callable[[Instance], ProbeResult]
Writer = Callable[[Instance, ProbeResult], None]


class Lock(Protocol):
    def step(self) -> bool: ...
    def holds(self) -> bool: ...
    def release(self) -> None: ...


@dataclass(frozen=True)
class Written:
    status: str
    at: float


def consul_writer(consul_: catalog.Consul) -> Writer:
    """Write a probe result as the instance's mesh-health check status, through catalog.set_health."""
    def write(instance: Instance, result: ProbeResult) -> None:
        ref = catalog.InstanceRef(node=instance.host, service_id=instance.id)
        catalog.set_health(consul_, ref, result.status, result.output)
    return write


class HealthChecker:
    """Probes only while it leads; writes a status when it changes, and again every `refresh` seconds.
    `before_round` runs before each round's probes (the client identity's reload check)."""

    def __init__(self, config: CheckerConfig, lock: Lock, prober: Prober, writer: Writer,
                 clock: Callable[[], float] = time.monotonic,
                 before_round: Callable[[], object] | None = None) -> None:
        self.config = config
        self.lock = lock
        self.prober = prober
        self.writer = writer
        self.clock = clock
        self.before_round = before_round
        self.written: dict[str, Written] = {}
        self.log = structlog.get_logger()

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set, then release the lock."""
        tick = min(self.config.interval, self.config.session_ttl / 3)
        leading, next_round = False, 0.0
        workers = max(1, min(MAX_WORKERS, len(self.config.instances)))
        self.log.info("checker_started", instances=len(self.config.instances), interval=self.config.interval)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
            try:
                while not stop.is_set():
                    now_leading = self.lock.step()
                    if now_leading != leading:
                        self.log.info("checker_leading" if now_leading else "checker_standing_by")
                        self.written.clear()  # a new leader does not know what the last one wrote
                        next_round = 0.0
                    leading = now_leading
                    if leading and self.clock() >= next_round:
                        if self.before_round is not None:
                            self.before_round()
                        self.round(pool.map(self.prober, self.config.instances))
                        next_round = self.clock() + self.config.interval
                    stop.wait(tick)
            finally:
                self.lock.release()
                self.log.info("checker_stopped")

    def round(self, results: Iterable[ProbeResult]) -> int:
        """Write what changed (or is due for a refresh) while still holding the lock; returns writes made."""
        writes = 0
        for instance, result in zip(self.config.instances, results, strict=True):
            if not self.lock.holds():
                self.log.warning("checker_stopped_writing", reason="leadership lost")
                break
            last = self.written.get(instance.id)
            if last and last.status == result.status and self.clock() - last.at < self.config.refresh:
                continue
            try:
                self.writer(instance, result)
            except MeshError as exc:
                self.log.warning("health_write_failed", instance=instance.id, error=str(exc))
                continue
            self.written[instance.id] = Written(result.status, self.clock())
            writes += 1
            self.log.info("health_written", instance=instance.id, status=result.status, output=result.output,
                          changed=last is None or last.status != result.status)
        return writes
