"""`mesh status` on fake hosts: the typed report of a converged fleet, files newer than what Envoy runs (a restart
or reload owed, a certificate not yet served), hand edits, unreachable hosts, one batch per host, the JSON keys
and the table when piped."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from rich.console import Console
from status_fleet import Fleet, converged_fleet

from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE
from mesh.hosts.connection import CommandResult, Connector
from mesh.inventory.model import ManagedHost
from mesh.status import output
from mesh.status.batch import MARKER
from mesh.status.gather import gather_host
from mesh.status.report import ConsulStatus, HostStatus, ProxyStatus, StatusReport
from mesh.testing.fake_connector import FakeConnector


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return converged_fleet(tmp_path)


def gather(fleet: Fleet, connect: object = None) -> StatusReport:
    names = frozenset(host.name for host in fleet.mesh.hosts)
    hosts = tuple(gather_host(host, fleet.expected(host.name), {"api": []}, names, connect or fleet.fleet.connect)
                  for host in fleet.mesh.hosts if host.workloads or host.is_controller)
    return StatusReport(ConsulStatus(True, None), hosts)


def proxy(report: StatusReport, host: str) -> ProxyStatus:
    found = next(item for item in report.hosts if item.host == host)
    return found.proxies[0]


def test_a_converged_fleet_is_healthy_with_what_runs(fleet: Fleet) -> None:
    report = gather(fleet)
    assert report.exit_code == EXIT_OK, [host.all_problems() for host in report.hosts]
    web = proxy(report, "vm1")
    assert (web.proxy, web.runs_as, web.envoy.state, web.envoy.version, web.envoy.pid) == (
        "web-8080", "systemd", "active", "1.40.0", 4242)
    assert web.config.state == "applied" and web.config.running_compared
    assert web.certificate.serial == format(fleet.serials["web-8080"], "x")
    assert web.certificate.served_serials == (web.certificate.serial,)
    sidecar = proxy(report, "dock1")
    assert (sidecar.runs_as, sidecar.envoy.state, sidecar.envoy.container_id) == ("sidecar", "running", "c" * 12)
    assert sidecar.config.container_current is True


def test_a_bootstrap_envoy_did_not_start_with_is_files_newer_than_running(fleet: Fleet) -> None:
    fleet.envoys["web-8080"].server_info["node"]["metadata"]["mesh_bootstrap_sha256"] = "0" * 64
    report = gather(fleet)
    web = proxy(report, "vm1")
    assert web.config.state == "files newer than running"
    (drift,) = web.config.newer_than_running
    assert (drift.what, drift.owed, drift.running) == ("bootstrap", "restart", "0" * 64)
    assert any(problem.startswith("files newer than running: bootstrap ") and "a restart is owed" in problem
               for problem in web.problems)
    assert report.exit_code == EXIT_HOST_FAILED


def test_a_resource_file_envoy_has_not_loaded_is_a_reload_owed(fleet: Fleet) -> None:
    clusters = fleet.envoys["web-8080"].config_dump["configs"][1]
    clusters["version_info"] = "an-older-version"
    web = proxy(gather(fleet), "vm1")
    assert web.config.state == "files newer than running"
    assert [(d.what, d.running, d.owed) for d in web.config.newer_than_running] == [
        ("xds/cds.yaml", "an-older-version", "reload")]


def test_a_certificate_envoy_does_not_serve_yet_is_files_newer_than_running(fleet: Fleet) -> None:
    fleet.envoys["api-9090"].certs["certificates"][0]["cert_chain"][0]["serial_number"] = "0abc"
    api = proxy(gather(fleet), "vm2")
    assert api.certificate.served_serials == ("abc",)
    assert [(d.what, d.running, d.on_disk) for d in api.config.newer_than_running] == [
        ("certificate", "abc", api.certificate.serial)]
    assert api.config.state == "files newer than running"


def test_a_file_edited_on_the_host_differs_and_envoy_running_it_is_not_newer(fleet: Fleet) -> None:
    lds = next(file for file in fleet.expected("vm1")[0].files.files if file.path.endswith("/lds.yaml"))
    fleet.fleet.host("vm1").write(lds.path, lds.content + "# edited by hand\n")
    web = proxy(gather(fleet), "vm1")
    assert web.config.state == "differs"
    assert [(item.path, item.reason) for item in web.config.differing_files] == [(lds.path, "content differs")]
    assert web.config.newer_than_running == ()  # the same version_info: Envoy runs what the file says


def test_envoy_down_is_a_problem_and_nothing_running_is_compared(fleet: Fleet) -> None:
    fleet.fleet.host("vm2").units["mesh-envoy-api-9090.service"].active = "failed"
    fleet.envoys["api-9090"].answers = False
    api = proxy(gather(fleet), "vm2")
    assert (api.envoy.running, api.envoy.version, api.envoy.admin_answers) == (False, None, False)
    assert api.config.state == "applied" and not api.config.running_compared
    assert "Envoy unit is failed" in api.problems


def test_an_unreachable_host_is_exit_3(fleet: Fleet) -> None:
    fleet.fleet.host("vm2").unreachable = "connection timed out"
    report = gather(fleet)
    vm2 = next(host for host in report.hosts if host.host == "vm2")
    assert (vm2.reachable, vm2.unreachable_reason, vm2.proxies) == (False, "connection timed out", ())
    assert report.exit_code == EXIT_UNREACHABLE


def test_each_host_is_read_in_one_command(fleet: Fleet) -> None:
    runs: dict[str, int] = {}

    class Counting(FakeConnector):
        def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
            runs[self.host.name] = runs.get(self.host.name, 0) + 1
            assert MARKER in cmd
            return super().run(cmd, stdin, timeout)

    def connect(host: ManagedHost) -> Connector:
        return Counting(fleet.fleet.host(host.name))

    assert gather(fleet, connect).exit_code == EXIT_OK
    assert runs == {"ctl1": 1, "vm1": 1, "vm2": 1, "dock1": 1}


def test_a_sidecar_not_made_from_the_bootstrap_on_its_host_differs(fleet: Fleet) -> None:
    (expected,) = fleet.expected("dock1")
    seen = fleet.docker_inspect["dock1"]
    fleet.docker_inspect["dock1"] = seen.replace("|running|true|", "|running|true|0ld", 1)  # another spec's label
    sidecar = proxy(gather(fleet), "dock1")
    assert sidecar.config.container_current is False and sidecar.config.state == "differs"
    assert f"{expected.sidecar} does not run the current bootstrap and spec (run mesh deploy)" in sidecar.problems


def test_the_json_keys(fleet: Fleet) -> None:
    fleet.envoys["web-8080"].server_info["node"]["metadata"]["mesh_bootstrap_sha256"] = "0" * 64
    printed = io.StringIO()
    output.print_json(gather(fleet), Console(file=printed))
    data = json.loads(printed.getvalue())
    assert set(data) == {"consul", "hosts", "controller", "survival", "exit_code", "healthy", "permissive"}
    assert data["permissive"] == []  # no service is in mtls: permissive
    assert data["controller"] is None  # gathered without asking Consul for the controllers
    assert set(data["survival"]) == {"until", "remaining_seconds", "certificate"}
    assert (data["exit_code"], data["healthy"], data["consul"]) == (2, False, {"readable": True, "reason": None})
    vm1 = next(host for host in data["hosts"] if host["host"] == "vm1")
    assert set(vm1) == {"host", "kind", "reachable", "unreachable_reason", "proxies", "sidecar_watcher", "checker",
                        "problems"}
    (web,) = vm1["proxies"]
    assert set(web) == {"proxy", "service", "runs_as", "envoy", "config", "certificate", "upstreams", "problems",
                        "resources", "plaintext", "xds"}
    assert web["plaintext"] is None  # strict
    assert web["xds"] is None  # mesh_delivery: files
    assert web["resources"] == {"host_version": web["resources"]["host_version"], "controller_version": None,
                                "pushed_at": None, "state": "no controller"}
    assert set(web["envoy"]) == {"state", "running", "version", "pid", "container_id", "admin_answers"}
    assert web["config"]["state"] == "files newer than running"
    assert web["config"]["newer_than_running"] == [{"what": "bootstrap", "running": "0" * 64,
                                                    "on_disk": fleet.expected("vm1")[0].files.bootstrap_sha256,
                                                    "owed": "restart"}]
    assert set(web["certificate"]) == {"path", "state", "serial", "not_after", "remaining_seconds", "lifetime_left",
                                       "described", "served_serials"}
    assert web["certificate"]["not_after"].endswith("Z")
    assert web["upstreams"] == [{"service": "api", "consul_passing": 0, "consul_instances": 0, "envoy_healthy": 1,
                                 "envoy_hosts": 1, "consul_drained": 0}]
    dock1 = next(host for host in data["hosts"] if host["host"] == "dock1")
    assert dock1["sidecar_watcher"] == {"state": "active", "rules_applied": True, "problems": []}
    ctl1 = next(host for host in data["hosts"] if host["host"] == "ctl1")
    assert ctl1["checker"]["state"] == "active" and ctl1["proxies"] == []


def test_the_table_when_piped_has_no_escape_codes_nor_box_drawing(fleet: Fleet) -> None:
    fleet.fleet.host("vm2").units["mesh-envoy-api-9090.service"].active = "failed"
    report = gather(fleet)
    piped, terminal = io.StringIO(), io.StringIO()
    output.print_table(report, Console(file=piped, width=output.PIPED_WIDTH))
    output.print_table(report, Console(file=terminal, width=200, force_terminal=True, color_system="standard"))
    text = piped.getvalue()
    assert "\x1b" not in text and text.isascii()
    assert "\x1b[" in terminal.getvalue() and not terminal.getvalue().isascii()  # what a terminal gets
    row = next(line for line in text.splitlines() if "api-9090" in line and "vm2" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["vm2", "api-9090", "yes"] and cells[3].startswith("failed ")
    assert "vm2 api-9090: Envoy unit is failed" in text.splitlines()
    narrow = io.StringIO()
    output.print_table(report, Console(file=narrow, width=60))
    assert narrow.getvalue().isascii()  # long cells folded, never cut with an ellipsis


def test_the_report_of_an_unreachable_host_prints_one_row() -> None:
    host = HostStatus("vm9", "vm", False, "no route to host", (), None, None, ("unreachable: no route to host",))
    printed = io.StringIO()
    output.print_table(StatusReport(ConsulStatus(False, "Consul is unreachable"), (host,)),
                       Console(file=printed, width=120))
    lines = printed.getvalue().splitlines()
    assert any(line.startswith("| vm9 ") and "| no " in line for line in lines)
    assert lines[-2:] == ["vm9: unreachable: no route to host", "Consul: Consul is unreachable"]
