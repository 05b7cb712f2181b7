"""`mesh status` and the plaintext clients of permissive services: the host-side count of the inbound
`"mtls": false` access lines (run for real with sh and awk over sample lines), the read through `mesh logs`'s
commands (a VM's journal, a sidecar's docker logs), the merge over a service's proxies, and what the table and the
JSON say (including "no plaintext clients seen: safe to switch to strict")."""

from __future__ import annotations

import io
import json
import re
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from status_fleet import Fleet, converged_fleet

from mesh.errors import EXIT_OK
from mesh.hosts.connection import CommandResult
from mesh.status import output
from mesh.status.gather import gather_host
from mesh.status.plaintext import count_command, parse_counts
from mesh.status.report import ConsulStatus, PlaintextClient, StatusReport


def access(source: str, mtls: bool, when: str, direction: str = "inbound") -> str:
    # the shape Envoy's json_format writes (compact, config order)
    return json.dumps({"mesh": "access", "time": when, "proxy": "api-9090", "direction": direction,
                       "protocol": "http", "source_identity": "", "source_address": source, "mtls": mtls,
                       "method": "GET", "path": "/", "status": 200}, separators=(",", ":"))


def test_the_host_counts_plaintext_inbound_lines_per_address_with_the_last_time(tmp_path: Path) -> None:
    lines = [
        access("10.77.0.1:40000", False, "2026-12-06T10:00:00.000000Z"),
        access("10.77.0.1:40001", False, "2026-12-06T12:00:00.000000Z"),
        access("10.77.0.1:40002", False, "2026-12-06T11:00:00.000000Z"),
        access("[fd00::5]:40003", False, "2026-12-06T09:00:00.000000Z"),
        access("10.77.0.11:40004", True, "2026-12-06T13:00:00.000000Z"),  # mTLS: not a plaintext client
        access("10.77.0.12:40005", False, "2026-12-06T13:00:00.000000Z", "outbound"),
        "envoy's own log line, not JSON",
    ]
    log = tmp_path / "journal.txt"
    log.write_text("\n".join(lines) + "\n")
    done = subprocess.run(["sh", "-c", count_command(f"cat {log}")], capture_output=True, check=True)
    assert parse_counts(done.stdout.decode()) == (
        PlaintextClient("10.77.0.1", 3, datetime(2026, 12, 6, 12, tzinfo=UTC)),
        PlaintextClient("[fd00::5]", 1, datetime(2026, 12, 6, 9, tzinfo=UTC)))
    empty = subprocess.run(["sh", "-c", count_command("true")], capture_output=True, check=True)
    assert empty.stdout == b"" and parse_counts("") == ()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return converged_fleet(tmp_path)


def gather(fleet: Fleet, permissive: str = "api") -> StatusReport:
    names = frozenset(host.name for host in fleet.mesh.hosts)
    hosts = []
    for host in fleet.mesh.hosts:
        if host.workloads or host.is_controller:
            proxies = tuple(replace(item, permissive=item.workload.service == permissive)
                            for item in fleet.expected(host.name))
            hosts.append(gather_host(host, proxies, {"api": []}, names, fleet.fleet.connect))
    return StatusReport(ConsulStatus(True, None), tuple(hosts))


def table(report: StatusReport) -> str:
    printed = io.StringIO()
    output.print_table(report, Console(file=printed, width=250))
    return printed.getvalue()


def test_a_permissive_service_lists_its_plaintext_clients_merged_over_its_proxies(fleet: Fleet) -> None:
    fleet.fleet.host("vm2").stub(r"journalctl -u mesh-envoy-api-9090\.service .*\| awk", CommandResult(
        0, b"10.77.0.1 12 2026-12-06T20:30:01.123456Z\n10.77.0.9 1 2026-12-06T19:00:00.000000Z\n", b""))
    fleet.fleet.host("dock1").stub(r"docker logs --since \d+ \S+ 2>/dev/null \) \| awk", CommandResult(
        0, b"10.77.0.1 3 2026-12-06T20:31:00.000000Z\n", b""))
    report = gather(fleet)
    assert report.exit_code == EXIT_OK  # plaintext clients are news, not a problem
    (api,) = report.permissive
    assert api.service == "api" and api.unread == ()
    assert api.clients == (PlaintextClient("10.77.0.1", 15, datetime(2026, 12, 6, 20, 31, tzinfo=UTC)),
                           PlaintextClient("10.77.0.9", 1, datetime(2026, 12, 6, 19, tzinfo=UTC)))
    assert ("permissive api (access logs of the last 24 h): plaintext clients: 10.77.0.1 (15, last 2026-12-06 "
            "20:31:00 UTC); 10.77.0.9 (1, last 2026-12-06 19:00:00 UTC)") in table(report)
    web = next(host for host in report.hosts if host.host == "vm1").proxies[0]
    assert web.plaintext is None  # web is strict: its log is not read
    assert not any("awk" in command for command in fleet.fleet.host("vm1").commands)
    data = report.to_json()
    assert data["permissive"] == [{"service": "api", "unread": [], "clients": [
        {"address": "10.77.0.1", "count": 15, "last_seen": "2026-12-06T20:31:00Z"},
        {"address": "10.77.0.9", "count": 1, "last_seen": "2026-12-06T19:00:00Z"}]}]


def test_a_permissive_service_without_plaintext_clients_is_safe_to_switch(fleet: Fleet) -> None:
    for name in ("vm2", "dock1"):
        fleet.fleet.host(name).stub(r"\| awk", CommandResult(0, b"", b""))
    report = gather(fleet)
    assert "permissive api (access logs of the last 24 h): no plaintext clients seen: safe to switch to strict" \
        in table(report)
    script = next(command for command in fleet.fleet.host("vm2").commands if "awk" in command)
    assert re.search(r"journalctl -u mesh-envoy-api-9090\.service -o cat --no-pager -q --since @\d+", script)


def test_a_log_that_cannot_be_read_is_named_and_no_all_clear_is_given(fleet: Fleet) -> None:
    fleet.fleet.host("vm2").stub(r"\| awk", CommandResult(0, b"", b""))
    fleet.fleet.host("dock1").stub(r"\| awk", CommandResult(2, b"", b"awk: not found"))
    (api,) = gather(fleet).permissive
    assert api.unread == ("dock1 api-api-1: its access log could not be read: awk: not found",)
    assert api.describe() == ("no plaintext clients seen by the proxies read (not read: dock1 api-api-1: its access "
                              "log could not be read: awk: not found)")
