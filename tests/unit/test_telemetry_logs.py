"""`mesh logs` over fake hosts: which proxies are read with which command, lines merged from several hosts,
what an unreachable host or a failed read gives, and following several streams in time order."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from telemetry_samples import TD, access, telemetry_mesh

from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, UsageError
from mesh.hosts.connection import CommandResult
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost
from mesh.telemetry.accesslog import AccessLine, LineFilter
from mesh.telemetry.logs import HostLogs, follow, gather, read_commands, select_logs, until_closed
from mesh.testing.fake_connector import FakeConnector, FakeFleet

SINCE = datetime(2026, 12, 6, 14, 20, tzinfo=UTC)  # 1796566800
EPOCH = int(SINCE.timestamp())
API = f"spiffe://{TD}/svc/api"


def proxies(selected: tuple[HostLogs, ...]) -> list[str]:
    return [f"{logs.host.name}/{proxy}" for logs in selected for proxy in logs.proxies]


def test_every_proxy_is_read_by_default() -> None:
    assert proxies(select_logs(telemetry_mesh())) == ["vm1/web-8080", "vm2/api-9090", "vm2/db-5432",
                                                      "dock1/api-api-v2-1"]


def test_a_service_is_read_on_its_proxies_its_callers_and_what_it_calls() -> None:
    assert proxies(select_logs(telemetry_mesh(), service="db")) == ["vm2/api-9090", "vm2/db-5432",
                                                                    "dock1/api-api-v2-1"]
    # web's own proxy (its outbound lines), and api's (their inbound lines from web)
    assert proxies(select_logs(telemetry_mesh(), service="web")) == ["vm1/web-8080", "vm2/api-9090",
                                                                     "dock1/api-api-v2-1"]
    assert proxies(select_logs(telemetry_mesh(), service="api", host="vm2")) == ["vm2/api-9090", "vm2/db-5432"]
    assert proxies(select_logs(telemetry_mesh(), host="vm2")) == ["vm2/api-9090", "vm2/db-5432"]


@pytest.mark.parametrize(("service", "host", "message", "hint"), [
    ("apii", None, "no service 'apii' in the inventory", "did you mean 'api'?"),
    (None, "vm3", "host 'vm3' is not in the inventory", "did you mean 'vm2' or 'vm1'?"),
    (None, "ctl1", "host 'ctl1' runs no proxy", None),
    ("db", "vm1", "no proxy on vm1 carries traffic of db", None),
])
def test_an_unknown_service_or_host_is_a_usage_error(service: str | None, host: str | None, message: str,
                                                     hint: str | None) -> None:
    with pytest.raises(UsageError) as caught:
        select_logs(telemetry_mesh(), service=service, host=host)
    assert (caught.value.message, caught.value.hint, caught.value.exit_code) == (message, hint, 5)


def test_a_vm_is_read_from_its_units_journal_a_container_host_from_each_sidecars_log() -> None:
    vm2, dock1 = (logs for logs in select_logs(telemetry_mesh()) if logs.host.name in ("vm2", "dock1"))
    assert read_commands(vm2, SINCE) == (
        (f"journalctl -u mesh-envoy-api-9090.service -u mesh-envoy-db-5432.service -o cat --no-pager -q "
        f"--since @{EPOCH}"),)
    assert read_commands(dock1, SINCE, follow=True) == (until_closed(
        f"docker inspect -f . mesh-envoy-api-api-v2-1 >/dev/null && exec docker logs -f --since {EPOCH} "
        f"mesh-envoy-api-api-v2-1 2>/dev/null"),)


def test_a_followed_command_ends_with_its_channel_or_by_itself_with_its_status() -> None:
    started = time.monotonic()
    endless = subprocess.Popen(["sh", "-c", until_closed("echo ready; exec sleep 30")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert endless.stdout is not None and endless.stdin is not None
    assert endless.stdout.readline() == b"ready\n"
    endless.stdin.close()  # what sshd does when mesh closes the channel
    assert endless.wait(10) != 0 and time.monotonic() - started < 10
    failing = subprocess.Popen(["sh", "-c", until_closed("echo out; echo why >&2; exit 4")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert failing.stdout is not None and failing.stderr is not None and failing.stdin is not None
    assert (failing.stdout.read(), failing.stderr.read(), failing.wait(10)) == (b"out\n", b"why\n", 4)
    failing.stdin.close()  # the channel stayed open all along


def fleet_with_lines() -> FakeFleet:
    fleet = FakeFleet()
    fleet.host("vm1").stub(r"^journalctl -u mesh-envoy-web-8080\.service ", CommandResult(0, "\n".join([
        "[2026-12-06 14:21:00.000][7][info][upstream] cds: added 2 clusters",
        access("2026-12-06T14:21:03Z", request_id="b"),
        access("2026-12-06T14:19:00Z", request_id="too-early"),
        access("2026-12-06T14:21:01Z", request_id="a"),
    ]).encode(), b""))
    fleet.host("vm2").stub(r"^journalctl ", CommandResult(0, "\n".join([
        access("2026-12-06T14:21:02Z", proxy="api-vm2-9090", direction="inbound", request_id="a"),
        access("2026-12-06T14:21:02.5Z", proxy="api-vm2-9090", protocol="tcp", destination_service="db",
               source_identity=API, method=None),
    ]).encode(), b""))
    fleet.host("dock1").stub(r"docker logs --since", CommandResult(0, b"", b""))
    return fleet


def answer(fleet: FakeFleet, host: str, pattern: str, result: CommandResult) -> None:
    """Answer commands matching pattern on host with result, before the stubs already there."""
    fleet.host(host).stubs.insert(0, (re.compile(pattern), result))


def test_lines_of_every_host_are_merged_in_time_order_since_the_time_asked() -> None:
    fleet = fleet_with_lines()
    got = gather(select_logs(telemetry_mesh()), SINCE, LineFilter(since=SINCE), fleet.connect)
    assert [(line.time.strftime("%S.%f"), line.get("proxy")) for line in got.lines] == [
        ("01.000000", "web-vm1-8080"), ("02.000000", "api-vm2-9090"), ("02.500000", "api-vm2-9090"),
        ("03.000000", "web-vm1-8080")]
    assert got.lines[2].source_service == "api"
    assert got.exit_code == EXIT_OK and not got.unreachable and not got.failed
    assert fleet.host("dock1").commands == [
        (f"docker inspect -f . mesh-envoy-api-api-v2-1 >/dev/null && exec docker logs --since {EPOCH} "
        f"mesh-envoy-api-api-v2-1 2>/dev/null")]


def test_the_service_filter_keeps_the_lines_naming_it() -> None:
    got = gather(select_logs(telemetry_mesh(), service="db"), SINCE, LineFilter(SINCE, "db"), fleet_with_lines().connect)
    assert [line.get("protocol") for line in got.lines] == ["tcp"]


def test_an_unreachable_host_is_named_and_the_others_are_still_read() -> None:
    fleet = fleet_with_lines()
    fleet.host("vm2").unreachable = "cannot connect to 10.77.0.12:22: timed out (connect timeout 10 s)"
    answer(fleet, "dock1", r"docker inspect", CommandResult(1, b"", b"Error: No such object: mesh-envoy-api"))
    got = gather(select_logs(telemetry_mesh()), SINCE, LineFilter(since=SINCE), fleet.connect)
    assert [line.get("request_id") for line in got.lines] == ["a", "b"]
    assert got.unreachable == {"vm2": "cannot connect to 10.77.0.12:22: timed out (connect timeout 10 s)"}
    assert got.failed == {"dock1": "`docker` exit 1: Error: No such object: mesh-envoy-api"}
    assert got.exit_code == EXIT_UNREACHABLE


def test_a_failed_read_on_a_reachable_host_exits_2() -> None:
    fleet = fleet_with_lines()
    answer(fleet, "vm1", r"^journalctl", CommandResult(1, b"", b"Failed to add filter"))
    got = gather(select_logs(telemetry_mesh(), host="vm1"), SINCE, LineFilter(), fleet.connect)
    assert (got.lines, got.failed, got.exit_code) == ([], {"vm1": "`journalctl` exit 1: Failed to add filter"},
                                                      EXIT_HOST_FAILED)


class StreamingConnector(FakeConnector):
    """A fake connector whose stream() gives chunks (lines cut anywhere), then ends or raises."""

    def __init__(self, fleet: FakeFleet, host: ManagedHost, chunks: list[bytes], error: Exception | None) -> None:
        super().__init__(fleet.host(host.name))
        self.chunks = chunks
        self.error = error
        self.streamed: list[str] = []

    def stream(self, cmd: str) -> Iterator[bytes]:
        self.streamed.append(cmd)
        yield from self.chunks
        if self.error is not None:
            raise self.error


def test_following_merges_the_streams_in_time_order_and_names_a_host_that_went_away() -> None:
    fleet = FakeFleet()
    web_text = (access("2026-12-06T14:21:03Z", request_id="c") + "\n" + access("2026-12-06T14:21:01Z",
                                                                               request_id="a") + "\n").encode()
    api_text = (access("2026-12-06T14:21:02Z", proxy="api-vm2-9090", request_id="b") + "\n").encode()
    streams = {"vm1": ([web_text[:50], web_text[50:]], None),
               "vm2": ([api_text], HostUnreachable("vm2", "the SSH connection broke during a command"))}
    made: dict[str, StreamingConnector] = {}

    def factory(host: ManagedHost) -> StreamingConnector:
        made[host.name] = StreamingConnector(fleet, host, *streams[host.name])
        return made[host.name]

    selected = tuple(logs for logs in select_logs(telemetry_mesh()) if logs.host.name in ("vm1", "vm2"))
    printed: list[AccessLine] = []
    warned: list[str] = []
    got = follow(selected, SINCE, LineFilter(since=SINCE), printed.append, warned.append, factory, window=0.1)
    assert [line.get("request_id") for line in printed] == ["a", "b", "c"]
    assert warned == ["vm2: the SSH connection broke during a command"]
    assert got.exit_code == EXIT_UNREACHABLE
    assert made["vm1"].streamed == [until_closed(f"exec journalctl -u mesh-envoy-web-8080.service -o cat --no-pager "
                                                 f"-q --since @{EPOCH} -f")]
    assert made["vm1"].closed and made["vm2"].closed


def test_following_stops_when_asked_and_prints_what_it_held() -> None:
    fleet = FakeFleet()
    release = threading.Event()

    class Endless(StreamingConnector):
        def stream(self, cmd: str) -> Iterator[bytes]:
            yield (access("2026-12-06T14:21:01Z", request_id="held") + "\n").encode()
            release.wait(5)

    stop = threading.Event()
    printed: list[AccessLine] = []

    def emit(line: AccessLine) -> None:
        printed.append(line)

    selected = select_logs(telemetry_mesh(), host="vm1")
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    got = follow(selected, SINCE, LineFilter(), emit, lambda _: None,
                 lambda host: Endless(fleet, host, [], None), window=3600, stop=stop)
    release.set()
    assert [line.get("request_id") for line in printed] == ["held"] and got.exit_code == EXIT_OK
