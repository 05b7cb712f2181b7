"""`mesh trace` as a user runs it: from the collector (fake controllers answering the real traces API), falling
back to the access logs, or from the logs alone when no collector runs; what is printed and the exit code (0
found, 2 nothing found, 1 nothing found while something could not be read, 5 bad options)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from telemetry_samples import telemetry_mesh
from trace_fakes import FakeController, Fleet
from trace_samples import REQUEST, TRACE, span, web_api_db_lines, web_api_pricing

from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_HOST_FAILED, EXIT_OK, EXIT_USAGE
from mesh.inventory.model import Connection, ManagedHost, Mesh, TracingSettings
from mesh.traces.cli import Query, check_id, find

NOW = datetime(2026, 12, 7, 0, 31, tzinfo=UTC)


def traced_mesh(collector: str | None = "mesh") -> Mesh:
    """web (vm1) -> api (vm2, and dock1's container) -> db; controllers ctl1 and ctl2."""
    mesh = telemetry_mesh()
    tracing = None if collector is None else TracingSettings(collector, 100.0)  # type: ignore[arg-type]
    ctl2 = ManagedHost("ctl2", "vm", Connection("10.77.0.4"), is_controller=True)
    return replace(mesh, settings=replace(mesh.settings, tracing=tracing), hosts=(*mesh.hosts, ctl2))


def query(wanted: str | None = REQUEST, last: int | None = None, service: str | None = None,
          from_logs: bool = False) -> Query:
    return Query(wanted, last, service, NOW - timedelta(hours=1), "1h", from_logs)


def logs_fleet(controllers: dict[str, FakeController]) -> Fleet:
    fleet = Fleet(controllers)
    lines = web_api_db_lines()
    fleet.journal("vm1", [lines[2]])
    fleet.journal("vm2", lines[:2])
    fleet.sidecar_logs("dock1", [])
    return fleet


def test_from_the_collector_with_a_controller_down_named() -> None:
    fleet = logs_fleet({"ctl1": FakeController().holding(web_api_pricing()),
                        "ctl2": FakeController(unreachable="cannot connect to 10.77.0.4:22: timed out")})
    found = find(traced_mesh(), query(), fleet)
    assert [trace.source for trace in found.traces] == ["collector"] and len(found.traces[0].rows) == 7
    assert found.warnings == ["controller ctl2: cannot connect to 10.77.0.4:22: timed out"]
    assert found.exit_code == EXIT_OK
    assert sorted(fleet.connected) == ["ctl1", "ctl2"]  # no proxy host is read when the collector has it


def test_a_request_the_collector_does_not_hold_is_rebuilt_from_the_access_logs() -> None:
    fleet = logs_fleet({"ctl1": FakeController(), "ctl2": FakeController()})
    found = find(traced_mesh(), query(), fleet)
    assert [trace.source for trace in found.traces] == ["access logs"]
    assert [(row.span.service, row.span.tags["mesh.host"]) for row in found.traces[0].rows] == [
        ("web", "vm1"), ("api", "vm2")]
    assert found.warnings == [f"the collector (ctl1, ctl2) holds no trace of {REQUEST}: reading the access logs"]
    assert found.exit_code == EXIT_OK


@pytest.mark.parametrize("collector", [None, "zipkin", "otlp"])
def test_without_mesh_collector_only_the_access_logs_are_read(collector: str | None) -> None:
    fleet = logs_fleet({"ctl1": FakeController(), "ctl2": FakeController()})
    found = find(traced_mesh(collector), query(), fleet)
    assert [trace.source for trace in found.traces] == ["access logs"] and not found.warnings
    assert "ctl1" not in fleet.connected and "ctl2" not in fleet.connected


def test_from_logs_skips_the_collector() -> None:
    fleet = logs_fleet({"ctl1": FakeController().holding(web_api_pricing())})
    found = find(traced_mesh(), query(from_logs=True), fleet)
    assert [trace.source for trace in found.traces] == ["access logs"] and "ctl1" not in fleet.connected


def test_nothing_found_anywhere_exits_2_naming_where_it_looked() -> None:
    fleet = logs_fleet({"ctl1": FakeController(), "ctl2": FakeController()})
    found = find(traced_mesh(), query("no-such-request"), fleet)
    assert found.traces == [] and found.exit_code == EXIT_HOST_FAILED
    assert found.nothing_found() == ("no trace of request or trace no-such-request in the collector (ctl1, ctl2) "
                                     "nor in the access logs of vm1, vm2, dock1 in the last 1h")


def test_nothing_found_while_controllers_and_a_host_were_unreachable_exits_1() -> None:
    down = "cannot connect: timed out"
    fleet = logs_fleet({"ctl1": FakeController(unreachable=down), "ctl2": FakeController(unreachable=down)})
    fleet.hosts.host("vm2").unreachable = down
    found = find(traced_mesh(), query("no-such-request"), fleet)
    assert found.exit_code == EXIT_ERROR
    assert found.warnings == [f"controller ctl1: {down}", f"controller ctl2: {down}",
                              "no controller's collector answered (ctl1, ctl2): reading the access logs",
                              f"vm2: {down}"]


def test_last_from_the_collector_newest_first() -> None:
    newer = [span("e1", None, "web", "outbound", "vm1", 100, 5, trace_id="0" * 31 + "1", request_id="r2")]
    fleet = logs_fleet({"ctl1": FakeController().holding(web_api_pricing()), "ctl2": FakeController().holding(newer)})
    found = find(traced_mesh(), replace(query(None, last=5), since=datetime(2026, 1, 1, tzinfo=UTC)), fleet)
    assert [trace.trace_id for trace in found.traces] == ["0" * 31 + "1", TRACE]
    found = find(traced_mesh(), replace(query(None, last=1), since=datetime(2026, 1, 1, tzinfo=UTC)), fleet)
    assert [trace.trace_id for trace in found.traces] == ["0" * 31 + "1"]


def test_last_from_the_access_logs_groups_lines_by_request() -> None:
    fleet = Fleet()
    lines = web_api_db_lines("r1", "01") + web_api_db_lines("r2", "02")
    fleet.journal("vm1", [lines[2], lines[5]])
    fleet.journal("vm2", lines[:2] + lines[3:5])
    fleet.sidecar_logs("dock1", [])
    found = find(traced_mesh(None), query(None, last=5, service="api"), fleet)
    assert [trace.request_ids for trace in found.traces] == [("r2",), ("r1",)]
    assert all(len(trace.rows) == 2 for trace in found.traces)
    assert [trace.request_ids for trace in find(traced_mesh(None), query(None, last=1), fleet).traces] == [("r2",)]
    fleet.controllers = {"ctl1": FakeController(), "ctl2": FakeController()}
    found = find(traced_mesh(), query(None, last=5, service="api"), fleet)
    assert [trace.request_ids for trace in found.traces] == [("r2",), ("r1",)]
    assert found.warnings == [("the collector (ctl1, ctl2) holds no traces of api in the last 1h: reading the "
                               "access logs")]


@pytest.mark.parametrize("bad", ["", "has space", "tab\there", "é", "x" * 201, "\x1b[2J"])
def test_an_id_is_a_printable_token(bad: str) -> None:
    with pytest.raises(Exception, match="is not a request id or trace id") as caught:
        check_id(bad)
    assert getattr(caught.value, "exit_code", None) == EXIT_USAGE
    assert check_id("a-Z_0.9:~/+=") == "a-Z_0.9:~/+="


# ---- the command -------------------------------------------------------------------------------------------

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 127.0.0.1, ansible_port: 1}  # never reached: no mesh_tracing, no collector
    vms:
      hosts:
        vm1:
          ansible_connection: local
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_connection: local
          mesh_workloads:
            - {service: api, port: 9090}
"""


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """vm1 and vm2 run here: a journalctl on PATH prints web's line for web's unit, api's for api's."""
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    lines = web_api_db_lines()
    (tmp_path / "web.txt").write_text(lines[2] + "\n")
    (tmp_path / "api.txt").write_text("\n".join(lines[:2]) + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = bin_dir / "journalctl"
    journalctl.write_text(f'#!/bin/sh\ncase "$*" in *web-8080*) cat {tmp_path}/web.txt;; '
                          f'*api-9090*) cat {tmp_path}/api.txt;; esac\n')
    journalctl.chmod(journalctl.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    return path


def test_trace_prints_the_hops_from_the_access_logs(inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["trace", "-i", str(inventory), REQUEST, "--since", "2026-12-07T00:00:00Z"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"trace - · request {REQUEST} · 2 spans · 12.0 ms · from the access logs"
    assert [line.split()[:3] for line in out.splitlines()[2:]] == [["web", "outbound", "vm1"],
                                                                    ["└─", "api", "inbound"]]
    assert err == ""


def test_trace_json(inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["trace", "-i", str(inventory), REQUEST, "--json", "--since", "2026-12-07T00:00:00Z"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    [trace] = data["traces"]
    assert trace["source"] == "access logs" and trace["request_ids"] == [REQUEST]
    web, api = trace["spans"]
    assert (web["kind"], api["kind"], api["parent_id"]) == ("CLIENT", "SERVER", web["span_id"])


def test_nothing_found_exits_2(inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["trace", "-i", str(inventory), "nope", "--since", "2026-12-07T00:00:00Z"]) == EXIT_HOST_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("ERROR: no trace of request or trace nope in the access logs of vm1, vm2 since "
                   "2026-12-07T00:00:00Z\n")


@pytest.mark.parametrize(("args", "said"), [
    ([], "give a request or trace ID, or --last N"),
    (["x", "--last", "2"], "give an ID or --last N, not both"),
    (["x", "--service", "api"], "--service goes with --last"),
    (["a b"], "'a b' is not a request id or trace id"),
    (["x", "--since", "yesterday"], "--since: 'yesterday' is neither a duration"),
    (["--last", "2", "--service", "apii"], "no service 'apii' in the inventory (did you mean 'api'?)"),
])
def test_bad_options_exit_5(inventory: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str) -> None:
    assert run(["trace", "-i", str(inventory), *args]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"ERROR: {said}")
