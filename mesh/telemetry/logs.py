"""`mesh logs`: the access lines of the proxies asked for, read over SSH from each host (a VM's journal, a
container host's sidecar logs), filtered and merged in time order; with `follow`, streamed until Ctrl-C.

It owns which proxies to read, the read commands and the streams; parsing is accesslog.py's, printing the CLI's.
"""

from __future__ import annotations

import queue
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from mesh.config import paths
from mesh.containers.sidecar import sidecar_name
from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, UsageError
from mesh.hosts.connection import Connector, connect
from mesh.hosts.errors import HostUnreachable, RemoteError
from mesh.inventory.model import ManagedHost, Mesh, Workload
from mesh.suggest import did_you_mean
from mesh.telemetry.accesslog import AccessLine, LineFilter, ReorderBuffer, merge_by_time, parse_access_line

ConnectorFactory = Callable[[ManagedHost], Connector]
REORDER_WINDOW = 2.0  # seconds a followed line waits for earlier ones from other proxies
READ_TIMEOUT = 120.0
READ_WORKERS = 16


@dataclass(frozen=True)
class HostLogs:
    """The proxies of one host whose access lines are read."""

    host: ManagedHost
    workloads: tuple[Workload, ...]

    @property
    def proxies(self) -> tuple[str, ...]:
        return tuple(paths.proxy_name(workload) for workload in self.workloads)


def select_logs(mesh: Mesh, service: str | None = None, host: str | None = None) -> tuple[HostLogs, ...]:
    """The hosts and proxies to read: every proxy; with `service`, the service's own proxies, those of services
    calling it (their outbound lines name it) and of services it calls (their inbound lines name it); with
    `host`, only the proxies on it. UsageError (exit 5) for a service or host the inventory does not have."""
    if host is not None:
        with_proxies = [item.name for item in mesh.hosts if item.workloads]
        if host not in with_proxies:
            known = [item.name for item in mesh.hosts] + list(mesh.unmanaged_hosts)
            what = "runs no proxy" if host in known else "is not in the inventory"
            raise UsageError(f"host {host!r} {what}", did_you_mean(host, with_proxies))
    if service is not None:
        services = sorted({workload.service for workload in mesh.workloads})
        if service not in services:
            raise UsageError(f"no service {service!r} in the inventory", did_you_mean(service, services))
    called = {upstream.service for workload in mesh.workloads if workload.service == service
              for upstream in workload.upstreams}
    chosen = []
    for managed in mesh.hosts:
        if host is not None and managed.name != host:
            continue
        workloads = tuple(workload for workload in managed.workloads
                          if service is None or _sees(workload, service) or workload.service in called)
        if workloads:
            chosen.append(HostLogs(managed, workloads))
    if not chosen:
        raise UsageError(f"no proxy on {host} carries traffic of {service}")
    return tuple(chosen)


def _sees(workload: Workload, service: str) -> bool:
    return workload.service == service or any(upstream.service == service for upstream in workload.upstreams)


def journal_command(proxies: tuple[str, ...], since: datetime, follow: bool = False) -> str:
    """journalctl of the proxies' Envoy units, the messages alone, from `since` (to the second, rounded down)."""
    units = " ".join(f"-u {shlex.quote(paths.envoy_unit_name(proxy))}" for proxy in proxies)
    return (f"{'exec ' if follow else ''}journalctl {units} -o cat --no-pager -q "
            f"--since @{int(since.timestamp())}{' -f' if follow else ''}")


def sidecar_command(workload: Workload, since: datetime, follow: bool = False) -> str:
    """docker logs of the proxy's sidecar (its stdout: Envoy's own log is on stderr), from `since`."""
    name = shlex.quote(sidecar_name(workload))
    return (f"docker inspect -f . {name} >/dev/null && exec docker logs {'-f ' if follow else ''}"
            f"--since {int(since.timestamp())} {name} 2>/dev/null")


def read_commands(logs: HostLogs, since: datetime, follow: bool = False) -> tuple[str, ...]:
    """The commands that print these proxies' logs on their host: one journalctl on a VM, one docker logs per
    sidecar on a container host; when following, each ends with its SSH channel (until_closed)."""
    commands: tuple[str, ...]
    if logs.host.kind == "vm":
        commands = (journal_command(logs.proxies, since, follow),)
    else:
        commands = tuple(sidecar_command(workload, since, follow) for workload in logs.workloads)
    return tuple(until_closed(command) for command in commands) if follow else commands


def until_closed(command: str) -> str:
    """command, stopped when the SSH channel closes (its stdin ends): `journalctl -f` and `docker logs -f` would
    otherwise run on until a next line found the pipe gone. Exits with the command's status."""
    return ("exec 3<&0 </dev/null; "
            f"sh -c {shlex.quote(command)} & f=$!; "
            "(cat <&3 >/dev/null 2>&1; kill $f 2>/dev/null) >/dev/null 2>&1 & w=$!; exec 3<&-; "
            "wait $f; s=$?; kill $w 2>/dev/null; exit $s")


@dataclass
class Gathered:
    """What `mesh logs` read: the lines kept, and per host what went wrong."""

    lines: list[AccessLine] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.unreachable:
            return EXIT_UNREACHABLE
        return EXIT_HOST_FAILED if self.failed else EXIT_OK


def read_host(logs: HostLogs, since: datetime, keep: LineFilter, factory: ConnectorFactory) -> Gathered:
    got = Gathered()
    name = logs.host.name
    try:
        connector = factory(logs.host)
    except HostUnreachable as exc:
        got.unreachable[name] = exc.detail
        return got
    try:
        for command in read_commands(logs, since):
            result = connector.run(command, timeout=READ_TIMEOUT)
            if not result.ok:
                got.failed[name] = f"`{command.split(' ')[0]}` exit {result.code}: {result.error_text()}"
                continue
            lines = (parse_access_line(text) for text in result.stdout.decode(errors="replace").splitlines())
            got.lines.extend(line for line in lines if line is not None and keep(line))
    except HostUnreachable as exc:
        got.unreachable[name] = exc.detail
    finally:
        connector.close()
    return got


def gather(selected: tuple[HostLogs, ...], since: datetime, keep: LineFilter,
           factory: ConnectorFactory = connect) -> Gathered:
    """Every selected host read in parallel; the lines kept, merged in time order."""
    total = Gathered()
    with ThreadPoolExecutor(max_workers=max(1, min(READ_WORKERS, len(selected)))) as pool:
        for got in pool.map(lambda logs: read_host(logs, since, keep, factory), selected):
            total.lines.extend(got.lines)
            total.unreachable.update(got.unreachable)
            total.failed.update(got.failed)
    total.lines = merge_by_time(total.lines)
    return total


# ---- following -------------------------------------------------------------------------------------------


@runtime_checkable
class Streaming(Protocol):
    """What following needs of a connector: SSHConnector.stream."""

    def stream(self, cmd: str) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class _Ended:
    """A stream ended: its command exited (problem None) or failed."""

    host: str
    problem: str | None = None
    unreachable: bool = False


_Item = AccessLine | _Ended


def _put(text: bytes, out: queue.Queue[_Item]) -> None:
    line = parse_access_line(text.decode(errors="replace"))
    if line is not None:
        out.put(line)


def _pump(host: str, chunks: Iterator[bytes], out: queue.Queue[_Item]) -> None:
    """Lines of one stream into the queue, then how it ended."""
    pending = b""
    try:
        for chunk in chunks:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for text in complete:
                _put(text, out)
        _put(pending, out)  # a last line without its newline
        out.put(_Ended(host))
    except HostUnreachable as exc:
        out.put(_Ended(host, exc.detail, unreachable=True))
    except (RemoteError, OSError) as exc:
        out.put(_Ended(host, f"following the logs: {exc}"))


def follow(selected: tuple[HostLogs, ...], since: datetime, keep: LineFilter, emit: Callable[[AccessLine], None],
           warn: Callable[[str], None], factory: ConnectorFactory = connect, window: float = REORDER_WINDOW,
           stop: threading.Event | None = None) -> Gathered:
    """Stream every selected host's lines, print them in time order `window` seconds behind, until every stream
    ended or failed, or Ctrl-C (or `stop`); the hosts that failed are warned about as it happens."""
    lines: queue.Queue[_Item] = queue.Queue()
    got = Gathered()
    connectors: list[Connector] = []
    streams = 0
    for logs in selected:
        try:
            connector = factory(logs.host)
        except HostUnreachable as exc:
            got.unreachable[logs.host.name] = exc.detail
            warn(f"{logs.host.name}: {exc.detail}")
            continue
        connectors.append(connector)
        for command in read_commands(logs, since, follow=True):
            if not isinstance(connector, Streaming):
                got.failed[logs.host.name] = "its connection cannot stream (a local connection)"
                warn(f"{logs.host.name}: {got.failed[logs.host.name]}")
                break
            chunks = connector.stream(command)
            threading.Thread(target=_pump, args=(logs.host.name, chunks, lines), daemon=True).start()
            streams += 1
    buffer = ReorderBuffer(window)
    try:
        while streams and not (stop is not None and stop.is_set()):
            try:
                item: _Item | None = lines.get(timeout=0.2)
            except queue.Empty:
                item = None
            if isinstance(item, AccessLine):
                if keep(item):
                    buffer.add(item, time.monotonic())
            elif isinstance(item, _Ended):
                streams -= 1
                if item.problem is not None:
                    (got.unreachable if item.unreachable else got.failed)[item.host] = item.problem
                    warn(f"{item.host}: {item.problem}")
            for line in buffer.ready(time.monotonic()):
                emit(line)
    except KeyboardInterrupt:
        pass
    finally:
        for line in buffer.drain():
            emit(line)
        for connector in connectors:
            connector.close()
    return got
