"""One connection per host for a whole command: the trust preflight, the observation and the playbook share
it, so a deploy that changes nothing logs in to each host once. It owns the connections' lifetime.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

import structlog

from mesh.hosts.connection import CommandResult, Connector
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost

log = structlog.get_logger()


class _Shared:
    """A pooled connector: close() is the pool's to do; a host found unreachable stays so for the command (the
    next phase does not wait for its timeout again)."""

    def __init__(self, inner: Connector, name: str, failed: dict[str, HostUnreachable]) -> None:
        self.inner = inner
        self.name = name
        self.failed = failed

    def _guard(self) -> None:
        if self.name in self.failed:
            raise self.failed[self.name]

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        self._guard()
        try:
            return self.inner.run(cmd, stdin, timeout)
        except HostUnreachable as exc:
            self.failed.setdefault(self.name, exc)
            raise

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        self._guard()
        try:
            self.inner.put(data, path, mode, owner, group)
        except HostUnreachable as exc:
            self.failed.setdefault(self.name, exc)
            raise

    def get(self, path: str) -> bytes | None:
        self._guard()
        try:
            return self.inner.get(path)
        except HostUnreachable as exc:
            self.failed.setdefault(self.name, exc)
            raise

    def close(self) -> None:
        """Kept open for the pool's next user."""


class ConnectionPool:
    """`connect(host)` as the factory given, opened once per host name; every connection closed on exit."""

    def __init__(self, factory: Callable[[ManagedHost], Connector]) -> None:
        self.factory = factory
        self._open: dict[str, Connector] = {}
        self._failed: dict[str, HostUnreachable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def connect(self, host: ManagedHost) -> Connector:
        with self._lock:
            per_host = self._locks.setdefault(host.name, threading.Lock())
        with per_host:  # two threads asking for one host make one connection
            if host.name in self._failed:  # said once: the next phase does not wait for it again
                raise self._failed[host.name]
            if host.name not in self._open:
                try:
                    self._open[host.name] = self.factory(host)
                except HostUnreachable as exc:
                    self._failed[host.name] = exc
                    raise
            return _Shared(self._open[host.name], host.name, self._failed)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            opened, self._open = list(self._open.values()), {}
        for connector in opened:
            try:
                connector.close()
            except Exception as exc:  # noqa: BLE001 (closing must not hide the command's own outcome)
                log.warning("connection_close_failed", error=str(exc))
