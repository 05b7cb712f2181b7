"""Fake controllers for the unit tests of `mesh trace`: each answers `GET /api/traces` on a fake SSH
`direct-tcpip` channel with the real traces API (mesh.traces.api) over a real TraceStore, or fails as a
controller can (refused channel, unreachable host, an HTTP error, garbage). Nothing here is a test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mesh.hosts.connection import CommandResult
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost
from mesh.testing.fake_connector import FakeFleet
from mesh.traces.api import traces_api
from mesh.traces.model import Span
from mesh.traces.store import TraceStore


def http_answer(status: int, body: bytes, chunked: bool = False, reason: str = "OK") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
    if chunked:
        half = len(body) // 2
        parts = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:]) if part)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + parts + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class FakeChannel:
    """A direct-tcpip channel: what was sent, and an answer given a few bytes at a time."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self._answer = answer
        self.sent = b""
        self._out: bytes | None = None
        self.closed = False
        self.timeout: float | None = None

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, size: int) -> bytes:
        if self._out is None:
            self._out = self._answer(self.sent)
        part, self._out = self._out[:min(size, 7)], self._out[min(size, 7):]
        return part

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeController:
    """One controller: its store, how it fails (None: it answers), and the queries it was asked."""

    store: TraceStore = field(default_factory=TraceStore)
    unreachable: str | None = None
    refused: bool = False
    raw: bytes | None = None  # answer these bytes instead of the API's
    queries: list[dict[str, str]] = field(default_factory=list)
    ports: list[tuple[str, int]] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)

    def holding(self, spans: Iterable[Span]) -> FakeController:
        self.store.add(spans)
        return self

    def answer(self, request: bytes) -> bytes:
        line = request.split(b"\r\n", 1)[0].decode()
        method, target, _ = line.split(" ")
        assert method == "GET" and urlsplit(target).path == "/api/traces", line
        query = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
        self.queries.append(query)
        if self.raw is not None:
            return self.raw
        status, document = traces_api(self.store, query)
        return http_answer(status, json.dumps(document).encode(), chunked=len(self.queries) % 2 == 0,
                           reason="OK" if status == 200 else "Bad Request")


class FakeTunnelConnector:
    """A controller host's connector: SSH that can open direct-tcpip channels."""

    def __init__(self, name: str, controller: FakeController) -> None:
        self.name = name
        self.controller = controller
        self.closed = False

    def open_tunnel(self, address: str, port: int) -> Any:
        if self.controller.unreachable is not None:
            raise HostUnreachable(self.name, self.controller.unreachable)
        self.controller.ports.append((address, port))
        if self.controller.refused:
            raise ConnectionRefusedError(f"{self.name} cannot connect to {address}:{port}: Connection refused")
        channel = FakeChannel(self.controller.answer)
        self.controller.channels.append(channel)
        return channel

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        raise AssertionError(f"mesh trace ran {cmd!r} on controller {self.name}")

    def close(self) -> None:
        self.closed = True


class Fleet:
    """A connector factory: controllers answer the traces API, every other host is a FakeFleet host (stub its
    journalctl or docker logs)."""

    def __init__(self, controllers: dict[str, FakeController] | None = None) -> None:
        self.controllers = controllers or {}
        self.hosts = FakeFleet()
        self.connected: list[str] = []

    def __call__(self, host: ManagedHost) -> Any:
        self.connected.append(host.name)
        if host.name in self.controllers:
            return FakeTunnelConnector(host.name, self.controllers[host.name])
        return self.hosts.connect(host)

    def journal(self, host: str, lines: list[str]) -> None:
        self.hosts.host(host).stub(r"journalctl", CommandResult(0, ("\n".join(lines) + "\n").encode(), b""))

    def sidecar_logs(self, host: str, lines: list[str]) -> None:
        self.hosts.host(host).stub(r"docker logs", CommandResult(0, ("\n".join(lines) + "\n").encode(), b""))
