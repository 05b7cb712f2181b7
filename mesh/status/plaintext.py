"""The plaintext clients of a permissive service, as `mesh status` reports them: per proxy of such a service, its
access lines read the way `mesh logs` reads them (mesh.telemetry.logs.read_commands: the journal of a VM's Envoy,
a sidecar's docker logs), of which the inbound lines with `"mtls": false` (the plaintext chain's) are counted per
source address on the host itself, so a day of traffic comes back over SSH as one line per client.

It owns that command and the parsing of its answer; it must not connect or print.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from datetime import datetime, timedelta

from mesh.hosts.connection import CommandResult
from mesh.inventory.model import ManagedHost
from mesh.status.expected import ExpectedProxy
from mesh.status.report import PlaintextClient, PlaintextSeen
from mesh.telemetry.accesslog import parse_time
from mesh.telemetry.logs import HostLogs, read_commands

WINDOW = timedelta(hours=24)  # how far back the access lines are read
READ = "plaintext clients"

# One output line per source address: `ADDRESS COUNT LAST_TIME` (the port is dropped: a client's ports vary).
_COUNT = r"""/"mtls": *false/ && /"direction": *"inbound"/ {
  a = "?"; t = ""
  if (match($0, /"source_address": *"[^"]*"/)) {
    a = substr($0, RSTART, RLENGTH); sub(/^"source_address": *"/, "", a); sub(/"$/, "", a); sub(/:[0-9]+$/, "", a)
    if (a == "") a = "?"
  }
  if (match($0, /"time": *"[^"]*"/)) { t = substr($0, RSTART, RLENGTH); sub(/^"time": *"/, "", t); sub(/"$/, "", t) }
  n[a]++
  if (t > last[a]) last[a] = t
}
END { for (a in n) print a, n[a], (last[a] == "" ? "-" : last[a]) }"""


def count_command(read: str) -> str:
    """`read` (a command printing access lines), its plaintext inbound lines counted per source address."""
    return f"( {read} ) | awk {shlex.quote(_COUNT)}"


def plaintext_reads(host: ManagedHost, proxies: Iterable[ExpectedProxy], since: datetime) -> dict[str, str]:
    """The reads of the permissive proxies of `host`, by key (`<proxy> plaintext clients`)."""
    found = {}
    for proxy in proxies:
        if proxy.permissive:
            (read,) = read_commands(HostLogs(host, (proxy.workload,)), since)
            found[f"{proxy.proxy} {READ}"] = count_command(read)
    return found


def plaintext_seen(proxy: ExpectedProxy, result: CommandResult | None) -> PlaintextSeen | None:
    """What one permissive proxy's read found (None for a strict proxy)."""
    if not proxy.permissive:
        return None
    if result is None or not result.ok:
        problem = result.error_text()[:200] if result is not None else "not read"
        return PlaintextSeen((), f"its access log could not be read: {problem or 'exit ' + str(result.code)}"
                             if result is not None else problem)
    return PlaintextSeen(parse_counts(result.stdout.decode(errors="replace")), None)


def parse_counts(text: str) -> tuple[PlaintextClient, ...]:
    """The `ADDRESS COUNT LAST_TIME` lines, busiest first."""
    clients = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            clients.append(PlaintextClient(parts[0], int(parts[1]), parse_time(parts[2])))
    return tuple(sorted(clients, key=lambda client: (-client.count, client.address)))
