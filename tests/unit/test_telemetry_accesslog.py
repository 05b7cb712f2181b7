"""Access lines: which log lines are kept, source_service from the SPIFFE id, --since, filters, merging in time
order (also while following) and the readable form."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from telemetry_samples import TD, access

from mesh.telemetry.accesslog import (
    LineFilter,
    ReorderBuffer,
    merge_by_time,
    parse_access_line,
    parse_access_lines,
    parse_since,
    readable,
)

NOW = datetime(2026, 12, 6, 14, 30, tzinfo=UTC)


def test_only_json_objects_marked_access_with_a_time_are_kept() -> None:
    text = "\n".join([
        "[2026-12-06 14:29:00.000][1][info][main] starting main dispatch loop",
        access("2026-12-06T14:29:01.000001Z"),
        '{"mesh": "other", "time": "2026-12-06T14:29:02Z"}',
        '["mesh", "access"]',
        '{"mesh": "access", "time": "yesterday"}',
        '{"mesh": "access", "time": "2026-12-06T14:29:03Z", "proxy": "api-vm2-9090"',  # cut short
        "",
    ])
    lines = parse_access_lines(text)
    assert [line.time for line in lines] == [datetime(2026, 12, 6, 14, 29, 1, 1, tzinfo=UTC)]


def test_source_service_comes_from_the_identity_never_from_the_header() -> None:
    forged = parse_access_line(access("2026-12-06T14:29:01Z", source_service="admin",
                                      source_identity=f"spiffe://{TD}/svc/web"))
    assert forged is not None and forged.source_service == "web"
    tcp = parse_access_line(access("2026-12-06T14:29:01Z", source_service=None,
                                   source_identity=f"spiffe://{TD}/svc/api"))
    assert tcp is not None and tcp.source_service == "api"
    nobody = parse_access_line(access("2026-12-06T14:29:01Z", source_identity=None))
    assert nobody is not None and nobody.source_service is None
    checker = parse_access_line(access("2026-12-06T14:29:01Z", source_identity=f"spiffe://{TD}/mesh/health"))
    assert checker is not None and checker.source_service is None


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", NOW - timedelta(seconds=30)),
    ("5m", NOW - timedelta(minutes=5)),
    ("2h", NOW - timedelta(hours=2)),
    ("1d", NOW - timedelta(days=1)),
    ("2026-12-06T14:00:00Z", datetime(2026, 12, 6, 14, tzinfo=UTC)),
    ("2026-12-06T15:00:00+01:00", datetime(2026, 12, 6, 14, tzinfo=UTC)),
    ("2026-12-06 14:00", datetime(2026, 12, 6, 14, tzinfo=UTC)),  # no zone: UTC
])
def test_since_is_a_duration_ago_or_an_iso_time(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "5", "5w", "-5m", "m5", "tomorrow", "5 m"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, NOW)


def test_filters_keep_lines_since_the_time_naming_the_service() -> None:
    lines = parse_access_lines("\n".join([
        access("2026-12-06T14:20:00Z"),  # web -> api, too early
        access("2026-12-06T14:26:00Z"),  # web -> api
        access("2026-12-06T14:27:00Z", proxy="api-vm2-9090", protocol="tcp", destination_service="db",
               source_identity=f"spiffe://{TD}/svc/api"),
    ]))
    since = datetime(2026, 12, 6, 14, 25, tzinfo=UTC)
    assert [line.get("proxy") for line in lines if LineFilter(since=since)(line)] == ["web-vm1-8080", "api-vm2-9090"]
    assert [str(line.time.time()) for line in lines if LineFilter(since=since, service="api")(line)] == [
        "14:26:00", "14:27:00"]  # api as destination, then as source
    assert [str(line.time.time()) for line in lines if LineFilter(service="db")(line)] == ["14:27:00"]
    assert [line for line in lines if LineFilter(service="web")(line)] == lines[:2]


def test_lines_of_several_proxies_merge_in_start_time_order() -> None:
    # a proxy writes a line when its request ends: its own lines are not in start order either
    web = parse_access_lines(access("2026-12-06T14:29:05Z") + "\n" + access("2026-12-06T14:29:01Z"))
    api = parse_access_lines(access("2026-12-06T14:29:03Z", proxy="api-vm2-9090") + "\n"
                             + access("2026-12-06T14:29:01Z", proxy="api-vm2-9090"))
    merged = merge_by_time(web, api)
    assert [(line.time.second, line.get("proxy")) for line in merged] == [
        (1, "api-vm2-9090"), (1, "web-vm1-8080"), (3, "api-vm2-9090"), (5, "web-vm1-8080")]


def test_following_holds_lines_a_window_to_put_them_in_order() -> None:
    buffer = ReorderBuffer(window=2.0)
    late = parse_access_line(access("2026-12-06T14:29:59Z", proxy="b"))
    early = parse_access_line(access("2026-12-06T14:29:58Z", proxy="a"))
    later = parse_access_line(access("2026-12-06T14:30:00Z", proxy="a"))
    assert late is not None and early is not None and later is not None
    buffer.add(late, arrived=100.0)
    assert buffer.ready(clock=101.0) == []  # within the window
    buffer.add(early, arrived=101.5)  # started earlier, came later
    buffer.add(later, arrived=101.6)
    assert buffer.ready(clock=102.0) == [early, late]  # late is due; early started before it
    assert buffer.ready(clock=103.0) == []
    assert buffer.ready(clock=103.6) == [later]


def test_old_lines_wait_too_so_a_followed_backlog_is_merged() -> None:
    buffer = ReorderBuffer(window=2.0)
    for second, arrived in ((5, 100.0), (1, 100.1), (3, 100.2)):
        line = parse_access_line(access(f"2026-12-06T10:00:0{second}Z"))  # hours before now
        assert line is not None
        buffer.add(line, arrived)
    assert buffer.ready(clock=101.0) == []
    assert [line.time.second for line in buffer.ready(clock=102.0)] == [1, 3, 5]
    assert buffer.drain() == []


def test_the_readable_form_says_who_called_whom_and_what_happened() -> None:
    http = parse_access_line(access("2026-12-06T14:29:01.123456Z", source_version="v1", destination_version="v2",
                                    authority="api", path="/items", status=503, duration_ms=12,
                                    response_flags="UF", upstream_host="10.77.0.20:21000", request_id="r-1"))
    assert http is not None
    assert readable(http) == ("2026-12-06T14:29:01.123Z web-vm1-8080 outbound web(v1) -> api(v2) GET api/items 503 "
                              "12ms flags=UF upstream=10.77.0.20:21000 id=r-1")
    tcp = parse_access_line(access("2026-12-06T14:29:02Z", proxy="db-vm2-5432", direction="inbound",
                                   protocol="tcp", method=None, destination_service="db", bytes_received=10,
                                   bytes_sent=20, duration_ms=4, response_flags="-", mtls=False,
                                   source_identity=f"spiffe://{TD}/svc/api"))
    assert tcp is not None
    assert readable(tcp) == ("2026-12-06T14:29:02.000Z db-vm2-5432 inbound api -> db tcp rx=10 tx=20 4ms plaintext")
    assert json.loads(access("2026-12-06T14:29:02Z"))["mesh"] == "access"


@pytest.mark.parametrize("text", ["99999999d", "9999999999999d"])
def test_since_too_far_back_is_refused_not_an_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="before the year 1"):
        parse_since(text, NOW)
