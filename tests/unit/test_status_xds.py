"""`mesh status` for proxies on `mesh_delivery: xds`: the ADS stream the controllers publish for each proxy, per
resource type (synced, stale, NACKed with Envoy's error, like istioctl proxy-status), a proxy started from its
files, a proxy on ADS with no stream; in the table's resources column, the problems list, the exit code and the
JSON; and `read_controllers` reading every controller's publication from Consul's KV in one read."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from rich.console import Console
from status_fleet import Fleet, config_dump_of, converged_fleet

from mesh import catalog
from mesh.controller.spec import lock_key, state_key, xds_status_prefix
from mesh.errors import EXIT_HOST_FAILED, EXIT_OK
from mesh.status import output
from mesh.status.controllers import ControllerView, judge_controllers, read_controllers
from mesh.status.gather import gather_host
from mesh.status.report import ConsulStatus, ProxyStatus, StatusReport
from mesh.xds.status import PUBLICATION_MAX_AGE_S, StreamStatus, TypeStatus, publication

NOW = datetime.now(UTC)
API = "api-vm2-9090"  # vm2's proxy's node id (its Consul service ID)
V1, V2 = "1a2b3c4d" + "0" * 56, "9f8e7d6c" + "1" * 56
ON_FILES = ("runs from its files: no controller answered when its Envoy started (the controllers move it back to "
            "ADS within a minute)")
LDS_ERROR = ("Error adding/updating listener(s) mesh-bad-listener: malformed IP address: not-an-ip\n"
             "  (the test hook's listener)")


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return converged_fleet(tmp_path, xds_hosts=("vm2",))


def types(**states: str) -> tuple[TypeStatus, ...]:
    """CDS, EDS, LDS, RDS, SDS synced at V1, but those named: `stale` (V2 sent, V1 acked) or `nacked` (V2 refused)."""
    found = []
    for name in ("CDS", "EDS", "LDS", "RDS", "SDS"):
        state = states.get(name, "synced")
        error = LDS_ERROR if state == "nacked" else None
        found.append(TypeStatus(name, state, V1 if state == "synced" else V2, V1, error, 1))
    return tuple(found)


def published(controller: str, streams: dict[str, tuple[TypeStatus, ...]], age: float = 2.0,
              connected_ago: float = 100.0) -> str:
    """What controller `controller` writes to its KV key (mesh.xds.status.publication's JSON)."""
    at = NOW.timestamp()
    return json.dumps(publication(controller, {
        node: StreamStatus(node, "ipv4:10.77.0.12:40312", at - connected_ago, items)
        for node, items in streams.items()}, at - age))


def view(*publications: str) -> ControllerView:
    return judge_controllers("session", None, NOW, list(publications))


def gather(fleet: Fleet, controller: ControllerView | None) -> StatusReport:
    names = frozenset(host.name for host in fleet.mesh.hosts)
    hosts = tuple(gather_host(host, fleet.expected(host.name), {"api": []}, names, fleet.fleet.connect,
                              controller=controller)
                  for host in fleet.mesh.hosts if host.workloads or host.is_controller)
    return StatusReport(ConsulStatus(True, None), hosts, controller.status if controller else None)


def proxy(report: StatusReport, host: str) -> ProxyStatus:
    return next(item for item in report.hosts if item.host == host).proxies[0]


def table(report: StatusReport) -> list[str]:
    printed = io.StringIO()
    output.print_table(report, Console(file=printed, width=output.PIPED_WIDTH))
    return printed.getvalue().splitlines()


def resources_cell(lines: list[str], host: str) -> str:
    row = next(line for line in lines if line.startswith(f"| {host} "))
    return [cell.strip() for cell in row.strip("|").split("|")][output.COLUMNS.index("resources")]


def test_the_expected_proxy_knows_its_delivery_and_node_id(fleet: Fleet) -> None:
    (api,) = fleet.expected("vm2")
    (web,) = fleet.expected("vm1")
    assert (api.delivery, api.node_id) == ("xds", API)
    assert (web.delivery, web.node_id) == ("files", "web-vm1-8080")


def test_a_synced_stream_is_healthy_and_its_resources_are_not_judged_by_the_files(fleet: Fleet) -> None:
    report = gather(fleet, view(published("ctl1:4242", {API: types()})))
    api = proxy(report, "vm2")
    assert api.xds is not None
    assert (api.xds.state, api.xds.running, api.xds.controller, api.xds.node_id) == (
        "synced", "xds", "ctl1:4242", API)
    assert [(item.type, item.state, item.acked) for item in api.xds.types] == [
        (name, "synced", V1) for name in ("CDS", "EDS", "LDS", "RDS", "SDS")]
    # Envoy holds the stream's versions, not the files' version_info: no reload is owed
    assert api.config.state == "applied" and api.problems == ()
    assert proxy(report, "vm1").xds is None  # a files proxy
    assert report.exit_code == EXIT_OK, [host.all_problems() for host in report.hosts]
    lines = table(report)
    assert resources_cell(lines, "vm2") == "ADS synced (ctl1)"
    assert resources_cell(lines, "vm1") == "no controller"  # a files proxy keeps its column


def test_a_nack_is_a_problem_line_with_envoys_error_and_exit_2(fleet: Fleet) -> None:
    report = gather(fleet, view(published("ctl1:4242", {API: types(LDS="nacked")})))
    api = proxy(report, "vm2")
    assert api.xds is not None and api.xds.state == "nacked"
    (nacked,) = api.xds.of_state("nacked")
    assert (nacked.type, nacked.sent, nacked.acked, nacked.error) == ("LDS", V2, V1, LDS_ERROR)
    one_line = " ".join(LDS_ERROR.split())
    assert api.problems == (f"LDS NACKed (version 9f8e7d6c): {one_line}",)
    assert report.exit_code == EXIT_HOST_FAILED
    lines = table(report)
    assert resources_cell(lines, "vm2") == "ADS NACKed: LDS (ctl1)"
    assert f"vm2 api-9090: LDS NACKed (version 9f8e7d6c): {one_line}" in lines


def test_a_stale_type_is_shown_but_is_no_problem(fleet: Fleet) -> None:
    report = gather(fleet, view(published("ctl1:4242", {API: types(EDS="stale", RDS="stale")})))
    api = proxy(report, "vm2")
    assert api.xds is not None and api.xds.state == "stale" and api.problems == ()
    assert report.exit_code == EXIT_OK
    assert resources_cell(table(report), "vm2") == "ADS stale: EDS, RDS (ctl1)"
    nothing_yet = gather(fleet, view(published("ctl1:4242", {API: ()})))  # connected, nothing answered yet
    assert resources_cell(table(nothing_yet), "vm2") == "ADS stale: nothing sent yet (ctl1)"


def test_the_table_colours_a_nack_red_and_a_stale_type_yellow_at_a_terminal(fleet: Fleet) -> None:
    def terminal(report: StatusReport) -> str:
        printed = io.StringIO()
        output.print_table(report, Console(file=printed, width=250, force_terminal=True, color_system="standard"))
        return printed.getvalue()

    stale = terminal(gather(fleet, view(published("ctl1:4242", {API: types(EDS="stale")}))))
    assert "\x1b[33mADS stale: EDS (ctl1)" in stale  # yellow
    nacked = terminal(gather(fleet, view(published("ctl1:4242", {API: types(LDS="nacked")}))))
    assert "\x1b[31mADS NACKed: LDS (ctl1)" in nacked  # red


def test_an_envoy_started_from_its_files_is_on_files_a_problem_and_judged_by_its_files(fleet: Fleet) -> None:
    (api_expected,) = fleet.expected("vm2")
    envoy = fleet.envoys["api-9090"]
    del envoy.server_info["node"]["metadata"]["mesh_delivery"]  # envoy.yaml: no controller answered at start
    envoy.config_dump = config_dump_of(api_expected)  # it loaded its files
    report = gather(fleet, view(published("ctl1:4242", {})))
    api = proxy(report, "vm2")
    assert api.xds is not None and (api.xds.running, api.xds.state) == ("files", "on files")
    assert api.problems == (ON_FILES,)
    assert report.exit_code == EXIT_HOST_FAILED
    assert resources_cell(table(report), "vm2") == "on files"
    envoy.config_dump["configs"][1]["version_info"] = "an-older-version"  # on its files, they are compared again
    api = proxy(gather(fleet, view(published("ctl1:4242", {}))), "vm2")
    assert [(drift.what, drift.running) for drift in api.config.newer_than_running] == [
        ("xds/cds.yaml", "an-older-version")]


def test_an_envoy_on_ads_without_any_stream_is_a_problem(fleet: Fleet) -> None:
    report = gather(fleet, view(published("ctl1:4242", {"web-vm1-8080": types()})))
    api = proxy(report, "vm2")
    assert api.xds is not None and (api.xds.running, api.xds.state, api.xds.controller) == ("xds", "no stream", None)
    assert api.problems == (f"runs on ADS but no controller publishes a stream for node {API}",)
    assert report.exit_code == EXIT_HOST_FAILED
    assert resources_cell(table(report), "vm2") == "no stream"


def test_a_publication_of_a_controller_gone_for_30s_is_no_stream(fleet: Fleet) -> None:
    gone = published("ctl2:77", {API: types()}, age=PUBLICATION_MAX_AGE_S + 1)
    assert proxy(gather(fleet, view(gone, "{not json")), "vm2").xds.state == "no stream"  # type: ignore[union-attr]


def test_the_stream_connected_last_is_the_one_shown(fleet: Fleet) -> None:
    dead = published("ctl1:4242", {API: types(LDS="nacked")}, connected_ago=400.0)  # held after a failover
    live = published("ctl2:77", {API: types()}, connected_ago=5.0)
    api = proxy(gather(fleet, view(dead, live)), "vm2")
    assert api.xds is not None and (api.xds.controller, api.xds.state) == ("ctl2:77", "synced")
    assert api.xds.peer == "ipv4:10.77.0.12:40312"
    assert api.xds.connected_since is not None and abs((NOW - api.xds.connected_since).total_seconds() - 5) < 1


def test_streams_not_read_are_not_a_stream_missing(fleet: Fleet) -> None:
    report = gather(fleet, None)  # Consul could not be read: its own problem (exit 2)
    api = proxy(report, "vm2")
    assert api.xds is not None and (api.xds.running, api.xds.state) == ("xds", "not read")
    assert api.problems == ()
    assert resources_cell(table(report), "vm2") == "ADS not read"


def test_an_envoy_whose_admin_does_not_answer_has_only_envoys_problem(fleet: Fleet) -> None:
    fleet.envoys["api-9090"].answers = False
    api = proxy(gather(fleet, view(published("ctl1:4242", {}))), "vm2")
    assert api.xds is not None and (api.xds.running, api.xds.state) == (None, "no stream")
    assert not any("stream" in problem for problem in api.problems)
    assert any("does not answer" in problem for problem in api.problems)


def test_a_files_proxy_still_on_ads_owes_a_restart(fleet: Fleet) -> None:
    fleet.envoys["web-8080"].server_info["node"]["metadata"]["mesh_delivery"] = "xds"  # its host left xds
    web = proxy(gather(fleet, view()), "vm1")
    assert web.xds is None
    assert "runs on ADS but its host is on mesh_delivery: files (a restart is owed)" in web.problems


def test_the_json_of_an_xds_proxy(fleet: Fleet) -> None:
    printed = io.StringIO()
    output.print_json(gather(fleet, view(published("ctl1:4242", {API: types(LDS="nacked")}))), Console(file=printed))
    data = json.loads(printed.getvalue())
    vm2 = next(host for host in data["hosts"] if host["host"] == "vm2")
    (api,) = vm2["proxies"]
    assert set(api["xds"]) == {"node_id", "running", "controller", "types", "connected_since", "peer",
                               "streams_read", "state"}
    assert (api["xds"]["state"], api["xds"]["running"], api["xds"]["controller"]) == ("nacked", "xds", "ctl1:4242")
    assert api["xds"]["connected_since"].endswith("Z")
    lds = next(item for item in api["xds"]["types"] if item["type"] == "LDS")
    assert lds == {"type": "LDS", "state": "nacked", "sent": V2, "acked": V1, "error": LDS_ERROR}
    assert api["resources"]["state"] in ("in sync", "behind", "no controller")  # the paced files, still there
    assert (data["exit_code"], data["healthy"]) == (EXIT_HOST_FAILED, False)
    vm1 = next(host for host in data["hosts"] if host["host"] == "vm1")
    assert vm1["proxies"][0]["xds"] is None


class FakeKv:
    """Consul's KV as python-consul's `client.kv` answers: get(key) -> (index, item), get(prefix,
    recurse=True) -> (index, [items] or None)."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.asked: list[tuple[str, bool]] = []

    def get(self, key: str, recurse: bool = False) -> tuple[int, Any]:
        self.asked.append((key, recurse))
        if recurse:
            found = [{"Key": name, "Value": value} for name, value in sorted(self.values.items())
                     if name.startswith(key)]
            return 7, found or None
        value = self.values.get(key)
        return 7, None if value is None else {"Key": key, "Value": value, "Session": "s1" if "leader" in key else None}


def fake_consul(monkeypatch: pytest.MonkeyPatch, kv: FakeKv | Exception) -> None:
    class Client:
        def __init__(self, store: FakeKv) -> None:
            self.kv = store

    @contextmanager
    def client_for(access: object) -> Iterator[Client]:
        if isinstance(kv, Exception):
            raise kv
        yield Client(kv)

    monkeypatch.setattr(catalog, "client_for", client_for)


def test_read_controllers_reads_every_publication_in_one_kv_read(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh_id = fleet.mesh.settings.id
    prefix = xds_status_prefix(mesh_id)
    kv = FakeKv({
        lock_key(mesh_id): b"",
        state_key(mesh_id): json.dumps({"holder": "ctl1:4242", "updated_at": NOW.timestamp(), "proxies": {}}).encode(),
        prefix + "ctl1:4242": published("ctl1:4242", {API: types(LDS="nacked")}).encode(),
        prefix + "ctl2:77": published("ctl2:77", {"web-vm1-8080": types()}).encode(),
        prefix + "ctl3:9": b"\xff not json",
    })
    fake_consul(monkeypatch, kv)
    seen = read_controllers(fleet.mesh, NOW)
    assert kv.asked == [(lock_key(mesh_id), False), (state_key(mesh_id), False), (prefix, True)]
    assert seen.status.active and seen.xds_read
    assert sorted(seen.xds) == [API, "web-vm1-8080"]
    assert seen.xds[API].controller == "ctl1:4242" and seen.xds[API].state == "nacked"
    assert seen.xds["web-vm1-8080"].controller == "ctl2:77"
    report = gather(fleet, seen)
    assert resources_cell(table(report), "vm2") == "ADS NACKed: LDS (ctl1)"


def test_read_controllers_with_no_publication_knows_every_stream_is_missing(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_consul(monkeypatch, FakeKv({}))
    seen = read_controllers(fleet.mesh, NOW)
    assert seen.xds_read and dict(seen.xds) == {}
    assert proxy(gather(fleet, seen), "vm2").xds.state == "no stream"  # type: ignore[union-attr]


def test_read_controllers_when_consul_fails_reads_no_stream(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_consul(monkeypatch, catalog.CatalogError("Consul is unreachable at http://127.0.0.1:1: refused"))
    seen = read_controllers(fleet.mesh, NOW)
    assert not seen.xds_read and not seen.status.active
    assert seen.status.reason == "not read: Consul is unreachable at http://127.0.0.1:1: refused"
    api = proxy(gather(fleet, seen), "vm2")
    assert api.xds is not None and api.xds.state == "not read" and api.problems == ()
