"""How mesh reads a proxy's Prometheus text: straight from this machine (`DirectFetcher`) or through an SSH
`direct-tcpip` channel of a controller (`TunnelFetcher`: the TCP connection then comes from the controller,
an allowed source of every metrics port). It owns the HTTP GET; it must not parse the metrics.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from mesh.hosts.connection import Connector, connect
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost, Mesh
from mesh.telemetry.targets import METRICS_PATH, ProxyTarget

FETCH_TIMEOUT = 5.0
MAX_BODY = 64 * 1024 * 1024  # a proxy with thousands of clusters writes a few MB; more is not Envoy's stats
READ_SIZE = 1024 * 1024


class FetchError(Exception):
    """A proxy's metrics could not be read (refused, timed out, not 200): the message says why."""


class Fetcher(Protocol):
    """Reads one proxy's `/stats/prometheus`; raises FetchError (or OSError) when it cannot."""

    via: str  # how it reaches the proxies, for people: `direct` or `through ctl1`

    def fetch(self, target: ProxyTarget) -> str: ...

    def close(self) -> None: ...


class _Connection(http.client.HTTPConnection):
    """An HTTP connection over a socket-like object made elsewhere (an SSH channel)."""

    def __init__(self, host: str, port: int, sock: Any, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._made = sock

    def connect(self) -> None:
        self.sock = self._made


def http_get(target: ProxyTarget, sock: Any | None = None, timeout: float = FETCH_TIMEOUT,
             path: str = METRICS_PATH) -> str:
    """GET the target's metrics path (or `path`: the same stats, filtered), on sock when given (else a new TCP
    connection); the body as text."""
    host = f"[{target.address}]" if ":" in target.address else target.address
    conn = (_Connection(host, target.port, sock, timeout) if sock is not None
            else http.client.HTTPConnection(host, target.port, timeout=timeout))
    try:
        conn.request("GET", path, headers={"Accept": "text/plain", "Connection": "close"})
        response = conn.getresponse()
        body = _read_body(response)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"{target.endpoint}: {_reason(exc)}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise FetchError(f"{target.endpoint}: HTTP {response.status} {response.reason}")
    if len(body) > MAX_BODY:
        raise FetchError(f"{target.endpoint}: more than {MAX_BODY} bytes of metrics")
    return body.decode(errors="replace")


def _read_body(response: http.client.HTTPResponse) -> bytes:
    """The body, read a MiB at a time up to one byte more than MAX_BODY."""
    parts: list[bytes] = []
    size = 0
    while size <= MAX_BODY:
        part = response.read(READ_SIZE)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


class DirectFetcher:
    """HTTP from this machine (which must then be one of `mesh_metrics_scrapers`)."""

    via = "direct"

    def __init__(self, timeout: float = FETCH_TIMEOUT) -> None:
        self.timeout = timeout

    def fetch(self, target: ProxyTarget) -> str:
        return http_get(target, timeout=self.timeout)

    def close(self) -> None:
        pass


class _ChannelReader(io.RawIOBase):
    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._channel.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _ChannelSocket:
    """What http.client needs of a socket, over a tunnel's channel: its file is a standard buffered reader (a
    read waits for every byte asked; paramiko's own channel file came back short in the middle of Envoy's
    chunked answer, after 60 KiB)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def sendall(self, data: bytes) -> None:
        self._channel.sendall(data)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_ChannelReader(self._channel))

    def settimeout(self, timeout: float) -> None:
        self._channel.settimeout(timeout)

    def close(self) -> None:
        """Nothing: http.client closes its socket as soon as an answer says `connection: close`, before reading
        its body (a real socket stays open while its file is); the fetcher closes the channel when done."""


class TunnelOpener(Protocol):
    """What TunnelFetcher needs of a connector: SSHConnector.open_tunnel."""

    def open_tunnel(self, address: str, port: int) -> Any: ...

    def close(self) -> None: ...


class _RefusedChannels(logging.Filter):
    """paramiko logs a refused channel itself (on stderr, through logging's last resort, across `mesh top`'s
    table); the fetch error already says it, once, under the table."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open FAILED" not in record.getMessage()


_REFUSED_CHANNELS = _RefusedChannels()


class TunnelFetcher:
    """HTTP through `direct-tcpip` channels of one SSH connection to a controller host."""

    def __init__(self, opener: TunnelOpener, controller: str, timeout: float = FETCH_TIMEOUT) -> None:
        logging.getLogger("paramiko.transport").addFilter(_REFUSED_CHANNELS)  # once: a filter is added once
        self.opener = opener
        self.via = f"through {controller}"
        self.timeout = timeout

    def fetch(self, target: ProxyTarget) -> str:
        try:
            channel = self.opener.open_tunnel(target.address, target.port)
        except HostUnreachable:
            raise
        except OSError as exc:
            raise FetchError(f"{target.endpoint}: {_reason(exc)}") from None
        try:
            channel.settimeout(self.timeout)
            return http_get(target, sock=_ChannelSocket(channel), timeout=self.timeout)
        finally:
            channel.close()

    def close(self) -> None:
        self.opener.close()


def fetcher_for(mesh: Mesh, factory: Callable[[ManagedHost], Connector] = connect) -> Fetcher:
    """Through the first controller host that answers SSH (in inventory order), else direct. A controller run
    locally (`ansible_connection: local`) is this machine: direct."""
    for host in mesh.controllers:
        if host.connection.local:
            return DirectFetcher()
        connector = factory(host)
        if not hasattr(connector, "open_tunnel"):
            continue
        try:
            connector.run("true", timeout=FETCH_TIMEOUT)  # any answer: the host is there
        except HostUnreachable:
            connector.close()
            continue
        return TunnelFetcher(connector, host.name)  # type: ignore[arg-type]
    return DirectFetcher()
