"""`mesh status` with the controllers: who holds the lock and what state it publishes, each proxy's resource
version on its host against the controller's (in sync / behind / no controller), the endpoint files a
controller owns judged by that version and not against the inventory, drained instances, and how long the fleet
survives with every controller down (its first certificate to expire)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from rich.console import Console
from status_fleet import Fleet, converged_fleet

from mesh import catalog
from mesh.controller.protocol import resource_version_of
from mesh.errors import EXIT_OK
from mesh.status import output
from mesh.status.controllers import ACTIVE_WITHIN_S, ControllerView, judge_controllers
from mesh.status.expected import ExpectedProxy
from mesh.status.gather import gather_host
from mesh.status.judge import ConsulHealth
from mesh.status.report import ConsulStatus, ProxyStatus, StatusReport

NOW = datetime.now(UTC)


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return converged_fleet(tmp_path)


def state(proxies: dict[str, str], updated_ago: float = 1.0, **extra: object) -> str:
    """A state document as mesh.controller.published writes it."""
    at = NOW.timestamp()
    return json.dumps({"holder": "ctl1:4242", "plan_digest": "ab" * 32, "updated_at": at - updated_ago,
                       "consul_stale_s": 0.0, "hosts_behind": [],
                       "proxies": {name: {"version": version, "host_version": None, "pushed_at": at - 2}
                                   for name, version in proxies.items()},
                       "certificates": {}, **extra})


def version_of(expected: ExpectedProxy, replaced: dict[str, str] | None = None) -> str:
    """The resource version of the proxy's files as deploy rendered them (some replaced by other content)."""
    prefix = expected.files.proxy_dir + "/"
    contents = {file.path.removeprefix(prefix): (replaced or {}).get(file.path, file.content)
                for file in expected.files.files}
    return resource_version_of(contents)


def gather(fleet: Fleet, controller: ControllerView | None, consul: ConsulHealth = None) -> StatusReport:
    names = frozenset(host.name for host in fleet.mesh.hosts)
    hosts = tuple(gather_host(host, fleet.expected(host.name), consul if consul is not None else {"api": []}, names,
                              fleet.fleet.connect, controller=controller)
                  for host in fleet.mesh.hosts if host.workloads or host.is_controller)
    return StatusReport(ConsulStatus(True, None), hosts, controller.status if controller else None)


def proxy(report: StatusReport, host: str) -> ProxyStatus:
    return next(item for item in report.hosts if item.host == host).proxies[0]


def test_the_lock_and_a_fresh_state_make_an_active_controller() -> None:
    view = judge_controllers("session-1", state({"vm1/web-8080": "v1"}, consul_stale_s=3.5, hosts_behind=["vm2"]),
                             NOW)
    assert view.status.active and view.status.reason is None
    assert (view.status.holder, view.status.consul_stale_s, view.status.hosts_behind) == ("ctl1:4242", 3.5, ("vm2",))
    assert view.pushed("vm1", "web-8080") is not None and view.pushed("vm1", "web-8080").version == "v1"
    assert view.status.describe().startswith("active ctl1:4242, state of ")
    assert "Consul view 3.5s stale" in view.status.describe() and "hosts behind: vm2" in view.status.describe()


@pytest.mark.parametrize(("session", "text", "reason"), [
    (None, state({}), "nobody holds the controllers' lock"),
    ("s", None, "the lock is held but no state was published"),
    ("s", "{not json", "the lock is held but no state was published"),
    ("s", state({"vm1/web-8080": "v1"}, updated_ago=ACTIVE_WITHIN_S + 5), "its state is older than 60s"),
])
def test_no_active_controller_says_why_and_pushes_no_version(session: str | None, text: str | None,
                                                             reason: str) -> None:
    view = judge_controllers(session, text, NOW)
    assert not view.status.active and view.status.reason == reason
    assert view.pushed("vm1", "web-8080") is None
    assert view.status.describe() == f"none active ({reason})"


def test_each_proxy_is_in_sync_behind_or_without_controller(fleet: Fleet) -> None:
    web, api = fleet.expected("vm1")[0], fleet.expected("vm2")[0]
    view = judge_controllers("s", state({"vm1/web-8080": version_of(web), "vm2/api-9090": "0123456789abcdef"}), NOW)
    report = gather(fleet, view)
    assert (proxy(report, "vm1").resources.state, proxy(report, "vm1").resources.host_version) == (
        "in sync", version_of(web))
    behind = proxy(report, "vm2").resources
    assert (behind.state, behind.host_version, behind.controller_version) == (
        "behind", version_of(api), "0123456789abcdef")
    assert proxy(report, "dock1").resources.state == "no controller"  # the controller has no version for it
    assert report.exit_code == EXIT_OK
    assert proxy(gather(fleet, None), "vm1").resources.state == "no controller"


def test_the_controllers_endpoint_files_are_not_judged_against_the_inventory(fleet: Fleet) -> None:
    web = fleet.expected("vm1")[0]
    eds = next(file for file in web.files.files if file.path.endswith("/eds.upstream-api.yaml"))
    from_consul = eds.content.replace("10.77.0.12", "10.77.0.99")
    assert from_consul != eds.content
    fleet.fleet.host("vm1").write(eds.path, from_consul)
    without = proxy(gather(fleet, None), "vm1")
    assert [item.path for item in without.config.differing_files] == [eds.path]  # no controller: the plan's
    live = judge_controllers("s", state({"vm1/web-8080": version_of(web, {eds.path: from_consul})}), NOW)
    with_controller = proxy(gather(fleet, live), "vm1")
    assert with_controller.config.differing_files == ()
    assert with_controller.resources.state == "in sync"
    assert not any("differ from the inventory" in problem for problem in with_controller.problems)


def test_a_drained_instance_is_no_problem_but_a_critical_one_is(fleet: Fleet) -> None:
    def api(service_id: str, node: str, status: catalog.Status, drained: bool) -> catalog.InstanceHealth:
        return catalog.InstanceHealth(service_id, "api", node, "10.77.0.12", 21000, status, "", drained=drained)

    drained = {"api": [api("api-vm2-9090", "vm2", "critical", True), api("api-dock1-api-1", "dock1", "passing", False)]}
    web = proxy(gather(fleet, None, drained), "vm1")
    assert [(u.consul_passing, u.consul_instances, u.consul_drained) for u in web.upstreams] == [(1, 2, 1)]
    assert web.problems == ()
    printed = io.StringIO()
    output.print_table(gather(fleet, None, drained), Console(file=printed, width=output.PIPED_WIDTH))
    row = next(line for line in printed.getvalue().splitlines() if "| vm1 " in line and "web-8080" in line)
    assert "api: consul 1/2 (1 drained), envoy 1/1" in row
    critical = {"api": [api("api-vm2-9090", "vm2", "critical", False), api("api-dock1-api-1", "dock1", "passing", False)]}
    assert "api: 1 instance(s) critical in Consul" in proxy(gather(fleet, None, critical), "vm1").problems


def test_the_fleet_survives_until_its_first_certificate_expires_and_the_table_says_so(fleet: Fleet) -> None:
    view = judge_controllers("s", state({}), NOW)
    report = gather(fleet, view)
    certs = [(p.certificate.not_after, f"{h.host} {p.proxy}") for h in report.hosts for p in h.proxies]
    certs += [(h.checker.certificate.not_after, f"{h.host} health-checker") for h in report.hosts if h.checker]
    first = min(certs)
    survival = report.survival
    # leaves signed in one second expire together: any of them is the first to expire
    assert survival is not None and survival.until == first[0]
    assert (survival.until, survival.certificate) in certs
    first = (survival.until, survival.certificate)
    assert 23 * 3600 < survival.remaining_seconds <= 24 * 3600
    printed = io.StringIO()
    output.print_table(report, Console(file=printed, width=output.PIPED_WIDTH))
    lines = printed.getvalue().splitlines()
    assert any(line.startswith("controllers: active ctl1:4242") for line in lines)
    line = next(line for line in lines if line.startswith("fleet survives without controllers until "))
    assert line.endswith(f"; first to expire: {first[1]})") and f"{first[0]:%Y-%m-%d %H:%M:%S} UTC (23h " in line
    header = next(line for line in lines if "| host " in line)
    assert [cell.strip() for cell in header.strip("|").split("|")][4:6] == ["config", "resources"]
    row = next(line for line in lines if "| vm1 " in line and "web-8080" in line)
    assert "no controller" in row
    data = report.to_json()
    assert data["controller"]["active"] is True and data["controller"]["holder"] == "ctl1:4242"
    assert data["survival"]["certificate"] == first[1] and data["survival"]["until"].endswith("Z")
    assert data["hosts"][0]["proxies"] == [] or "resources" in data["hosts"][0]["proxies"][0]


def test_a_proxy_behind_is_shown_in_the_table(fleet: Fleet) -> None:
    view = judge_controllers("s", state({"vm1/web-8080": "fedcba9876543210"}), NOW)
    printed = io.StringIO()
    output.print_table(gather(fleet, view), Console(file=printed, width=output.PIPED_WIDTH))
    row = next(line for line in printed.getvalue().splitlines() if "| vm1 " in line and "web-8080" in line)
    assert "behind: host " in row and "controller fedcba98" in row


def test_gather_report_asks_consul_for_the_controllers(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.status import gather as gathering

    monkeypatch.setattr(gathering, "_consul", lambda mesh: (ConsulStatus(True, None), {"api": []}))
    asked: list[str] = []

    def read(mesh: object) -> ControllerView:
        asked.append("controllers")
        return judge_controllers(None, None, NOW)

    monkeypatch.setattr(gathering, "read_controllers", read)
    report = gathering.gather_report(fleet.mesh, fleet.fleet.connect)
    assert asked == ["controllers"]
    assert report.controller is not None and report.controller.reason == "nobody holds the controllers' lock"
    monkeypatch.setattr(gathering, "_consul", lambda mesh: (ConsulStatus(False, "unreachable"), None))
    assert gathering.gather_report(fleet.mesh, fleet.fleet.connect).controller is None
    assert asked == ["controllers"], "a Consul that cannot be read is not asked again"


def test_the_inbound_authorization_files_a_controller_redid_are_not_judged_against_the_inventory(
        fleet: Fleet) -> None:
    api = fleet.expected("vm2")[0]
    assert [path.rsplit("/", 1)[-1] for path in api.inbound_files] == ["rds.inbound.yaml"]
    (route,) = (file for file in api.files.files if file.path in api.inbound_files)
    with_deny = route.content + "# a run-time deny applied by the controller\n"
    fleet.fleet.host("vm2").write(route.path, with_deny)
    assert [item.path for item in proxy(gather(fleet, None), "vm2").config.differing_files] == [route.path]
    live = judge_controllers("s", state({"vm2/api-9090": version_of(api, {route.path: with_deny})}), NOW)
    redone = proxy(gather(fleet, live), "vm2")
    assert redone.config.differing_files == () and redone.resources.state == "in sync"
