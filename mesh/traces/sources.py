"""Where `mesh trace` finds spans: the controllers' traces API (each controller's loopback web port, reached through
an SSH `direct-tcpip` channel to that controller, as `mesh top` reaches the proxies' metrics), and the proxies'
access lines (read as `mesh logs` reads them), turned into hops by view.py.

It owns the HTTP GET of /api/traces, the merging of several controllers' answers (spans spread over every
controller), and the choice of access lines; it must not render anything.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlencode

from mesh.controller.spec import DEFAULT_WEB_PORT
from mesh.hosts.connection import Connector, connect
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost, Mesh
from mesh.telemetry.accesslog import AccessLine, LineFilter
from mesh.telemetry.logs import gather, select_logs
from mesh.traces.model import Span

API_PATH = "/api/traces"
FETCH_TIMEOUT = 10.0
MAX_ANSWER = 64 * 1024 * 1024  # 2000 traces of 1000 spans would be more; the API answers a few traces at a time
READ_SIZE = 256 * 1024

ConnectorFactory = Callable[[ManagedHost], Connector]


class CollectorError(Exception):
    """A controller's traces API did not answer usefully; the message says why (without the host's name)."""


class _RefusedChannels(logging.Filter):
    """paramiko logs a refused channel itself (on stderr); the controller's warning already says it, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open FAILED" not in record.getMessage()


_REFUSED_CHANNELS = _RefusedChannels()


class TunnelOpener(Protocol):
    """What a controller's API needs of its connector: SSHConnector.open_tunnel."""

    def open_tunnel(self, address: str, port: int) -> Any: ...


def uses_collector(mesh: Mesh) -> bool:
    """mesh_tracing sends spans to mesh's own collector (the controllers' span receivers)."""
    tracing = mesh.settings.tracing
    return tracing is not None and tracing.collector == "mesh" and bool(mesh.controllers)


def is_trace_id(text: str) -> bool:
    """32 hex digits (or 16: a 64-bit trace id), in either case."""
    return len(text) in (16, 32) and all(char in "0123456789abcdef" for char in text.lower())


def trace_key(text: str) -> str:
    """A trace id as the collector keeps it: 32 lowercase hex digits (a 64-bit one widened with zeros)."""
    return text.lower().rjust(32, "0")


# ---- one controller's API ----------------------------------------------------------------------------------


class _Received:
    """What http.client needs of a socket to parse an answer already read whole."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def request_bytes(path: str, port: int) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
            "Connection: close\r\n\r\n").encode()


def exchange(stream: Any, request: bytes) -> bytes:
    """Send request on a socket or SSH channel and read the answer until the server closes (Connection: close)."""
    stream.sendall(request)
    parts: list[bytes] = []
    size = 0
    while True:
        part = stream.recv(READ_SIZE)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > MAX_ANSWER:
            raise CollectorError(f"answered more than {MAX_ANSWER} bytes")


def parse_answer(raw: bytes) -> list[Span]:
    """The spans of an /api/traces answer: `{"traces": [[span, ...], ...]}` with status 200. CollectorError
    otherwise, with the API's own `error` when it gave one."""
    response = http.client.HTTPResponse(_Received(raw))  # type: ignore[arg-type]
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, ValueError) as exc:
        raise CollectorError(f"answered no HTTP ({type(exc).__name__})") from None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if response.status != 200:
        said = data.get("error") if isinstance(data, dict) else None
        if response.status == 404 and not said:
            raise CollectorError("its controller has no traces API (HTTP 404: deploy this version of mesh)")
        raise CollectorError(f"HTTP {response.status}" + (f": {said}" if said else f" {response.reason}"))
    traces = data.get("traces") if isinstance(data, dict) else None
    if not isinstance(traces, list) or not all(isinstance(trace, list) for trace in traces):
        raise CollectorError("answered something other than {\"traces\": [[span, ...], ...]}")
    spans = []
    for trace in traces:
        for item in trace:
            try:
                spans.append(Span.from_json(item))
            except (KeyError, TypeError, ValueError) as exc:
                raise CollectorError(f"answered a span mesh cannot read ({exc})") from None
    return spans


class ControllerAPI:
    """The traces API of one controller, on its loopback web port: through one SSH connection (a channel per
    request), or straight to 127.0.0.1 when the controller is this machine (`ansible_connection: local`)."""

    def __init__(self, host: ManagedHost, factory: ConnectorFactory = connect, port: int = DEFAULT_WEB_PORT,
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.host = host
        self.name = host.name
        self.port = port
        self.timeout = timeout
        self._factory = factory
        self._connector: Connector | None = None
        logging.getLogger("paramiko.transport").addFilter(_REFUSED_CHANNELS)  # added once, however often asked

    def get(self, query: Mapping[str, str]) -> list[Span]:
        """The spans the controller answers to `GET /api/traces?query`. HostUnreachable when its host cannot be
        reached; CollectorError for anything else."""
        request = request_bytes(f"{API_PATH}?{urlencode(query)}", self.port)
        stream = self._open()
        try:
            stream.settimeout(self.timeout)
            raw = exchange(stream, request)
        except TimeoutError:
            raise CollectorError(f"127.0.0.1:{self.port} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise CollectorError(f"127.0.0.1:{self.port}: {exc.strerror or exc}") from None
        finally:
            stream.close()
        return parse_answer(raw)

    def _open(self) -> Any:
        where = f"127.0.0.1:{self.port}"
        if self.host.connection.local:
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            except OSError as exc:
                raise CollectorError(f"nothing answers on {where} ({exc.strerror or exc}): is mesh-controller "
                                     "running here?") from None
        if self._connector is None:
            self._connector = self._factory(self.host)
        opener = self._connector
        if not hasattr(opener, "open_tunnel"):
            raise CollectorError("its connection cannot open a tunnel")
        try:
            return opener.open_tunnel("127.0.0.1", self.port)
        except HostUnreachable:
            raise
        except ConnectionRefusedError:
            raise CollectorError(f"nothing answers on {where} there: is mesh-controller running?") from None
        except OSError as exc:
            raise CollectorError(f"cannot reach {where} there: {exc}") from None

    def close(self) -> None:
        if self._connector is not None:
            self._connector.close()
            self._connector = None


# ---- every controller --------------------------------------------------------------------------------------


@dataclass
class Collected:
    """What the controllers answered: the spans (several copies of a span are merged later), which trace ids each
    controller that answered holds, and why each other controller did not answer."""

    spans: list[Span] = field(default_factory=list)
    holds: dict[str, set[str]] = field(default_factory=dict)  # controller -> trace ids it answered with
    problems: dict[str, str] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)


class Collector:
    """The traces API of every controller (proxies spread their spans over every controller's receiver): each
    question goes to every controller that has answered so far, in parallel."""

    def __init__(self, apis: Sequence[ControllerAPI]) -> None:
        self.apis = list(apis)
        self.got = Collected()

    @classmethod
    def of(cls, mesh: Mesh, factory: ConnectorFactory = connect, port: int = DEFAULT_WEB_PORT) -> Collector:
        return cls([ControllerAPI(host, factory, port) for host in mesh.controllers])

    @property
    def names(self) -> list[str]:
        return [api.name for api in self.apis]

    def ask(self, query: Mapping[str, str], apis: Sequence[ControllerAPI] | None = None) -> list[Span]:
        """The spans every (still working) controller of `apis` answers; a controller that fails is recorded with
        its reason and not asked again."""
        chosen = [api for api in (self.apis if apis is None else apis) if api.name not in self.got.problems]
        if not chosen:
            return []
        found: list[Span] = []
        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            for api, answer in zip(chosen, pool.map(lambda api: _ask(api, query), chosen), strict=True):
                if isinstance(answer, str):
                    self.got.problems[api.name] = answer
                    continue
                if isinstance(answer, HostUnreachable):
                    self.got.problems[api.name] = answer.detail
                    self.got.unreachable.add(api.name)
                    continue
                self.got.holds.setdefault(api.name, set()).update(span.trace_id for span in answer)
                found.extend(answer)
        self.got.spans.extend(found)
        return found

    def complete(self, trace_ids: Iterable[str]) -> None:
        """Ask each controller that answered, by trace id, for the chosen traces it did not answer with: a trace's
        spans may be on several controllers, and a request id or `last` query finds a trace on some of them."""
        for trace_id in trace_ids:
            missing = [api for api in self.apis
                       if api.name in self.got.holds and trace_id not in self.got.holds[api.name]]
            if missing:
                self.ask({"trace_id": trace_id}, missing)
                for api in missing:
                    self.got.holds.get(api.name, set()).add(trace_id)

    def lookup(self, wanted: str) -> list[Span]:
        """The spans of the traces `wanted` names: a trace id (32 hex digits) first as a trace id, then as a request
        id; anything else as a request id (x-request-id, as the caller sent it)."""
        found: list[Span] = []
        if is_trace_id(wanted):
            found = self.ask({"trace_id": trace_key(wanted)})
        if not found:
            found = self.ask({"request_id": wanted})
        self.complete(sorted({span.trace_id for span in found}))
        return self.got.spans

    def last(self, count: int, service: str | None) -> list[Span]:
        query = {"last": str(count)}
        if service is not None:
            query["service"] = service
        return self.ask(query)

    def close(self) -> None:
        for api in self.apis:
            api.close()


def _ask(api: ControllerAPI, query: Mapping[str, str]) -> list[Span] | str | HostUnreachable:
    try:
        return api.get(query)
    except HostUnreachable as exc:
        return exc
    except CollectorError as exc:
        return str(exc)


# ---- access lines ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLines(LineFilter):
    """The HTTP access lines `mesh trace` reads: since a time; with `wanted`, those whose request id is it (or
    whose trace id is it, for 32 hex digits); without, every line with a request id."""

    wanted: str | None = None

    def __call__(self, line: AccessLine) -> bool:
        if not super().__call__(line) or line.get("protocol") == "tcp" or not line.get("request_id"):
            return False
        if self.wanted is None:
            return True
        if line.get("request_id") == self.wanted:
            return True
        trace = line.get("trace_id")
        return (is_trace_id(self.wanted) and isinstance(trace, str) and is_trace_id(trace)
                and trace_key(trace) == trace_key(self.wanted))


@dataclass
class Read:
    """What the access logs gave: the lines kept, and per host why it could not be read."""

    lines: list[AccessLine]
    problems: dict[str, str]
    unreachable: set[str]
    hosts: list[str]


def read_lines(mesh: Mesh, since: datetime, wanted: str | None, service: str | None = None,
               factory: ConnectorFactory = connect) -> Read:
    """The lines of every proxy (with `service`, of the proxies whose lines may name it) since `since`."""
    selected = select_logs(mesh, service=service)
    got = gather(selected, since, RequestLines(since=since, wanted=wanted), factory)
    return Read(got.lines, {**got.failed, **got.unreachable}, set(got.unreachable),
                [logs.host.name for logs in selected])


def by_request(lines: Iterable[AccessLine]) -> dict[str, list[AccessLine]]:
    """Lines grouped by their request id."""
    groups: dict[str, list[AccessLine]] = defaultdict(list)
    for line in lines:
        groups[str(line.get("request_id"))].append(line)
    return groups
