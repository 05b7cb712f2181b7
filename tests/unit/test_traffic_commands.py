"""`mesh route show/set/reset` and `mesh fault set/reset` as a user runs them, over a fake Consul KV
(traffic_fakes.FakeTraffic): what is stored (the override's JSON, a new revision, a kept fault or split), what
is printed, the wait for the controllers' report (exit 1 when it does not come), and every bad value refused
with exit 5 and a clear message before Consul is asked anything. The deploy's reading of overrides too."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
from traffic_fakes import API_POLICY, FakeTraffic, instant, load_mesh, write_inventory

from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError
from mesh.inventory.policy import Abort, Delay, Fault, TrafficOverride
from mesh.traffic import commands
from mesh.traffic.changes import traffic_target, wait_applied
from mesh.traffic.kv import AppliedTraffic, applied_traffic, decode_override, plan_overrides
from mesh.traffic.options import parse_abort, parse_delay, parse_fault, parse_seconds, parse_split
from mesh.traffic.view import route_view, show_json, show_text

REVISION = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    return write_inventory(tmp_path)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTraffic]:
    fake = FakeTraffic()
    monkeypatch.setattr(commands, "STORE", lambda mesh: fake)
    yield fake


def mesh_run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---- mesh route set ---------------------------------------------------------------------------------------


def test_route_set_stores_the_split_with_a_new_revision_waits_and_says_so(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)
    assert code == EXIT_OK, err
    stored = store.document("api")
    assert stored["split"] == {"v1": 90, "v2": 10} and stored["fault"] is None
    assert REVISION.fullmatch(str(stored["revision"])) and "@" in str(stored["set_by"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(stored["at"]))
    lines = out.splitlines()
    assert lines[0] == f"api: stored split v1=90 v2=10 (revision {stored['revision']})"
    assert re.fullmatch(r"api: applied to every caller \(web\) in \d+\.\d s", lines[1])


def test_route_set_keeps_a_stored_fault_and_each_change_gets_a_new_revision(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    assert mesh_run(["fault", "set", "api", "--abort", "50%", "-i", str(inventory)], capsys)[0] == EXIT_OK
    first = store.document("api")["revision"]
    assert mesh_run(["route", "set", "api", "v1=50", "v2=50", "-i", str(inventory)], capsys)[0] == EXIT_OK
    stored = store.document("api")
    assert stored["fault"] == {"abort": {"status": 503, "percent": 50}}
    assert stored["split"] == {"v1": 50, "v2": 50} and stored["revision"] != first


@pytest.mark.parametrize(("words", "message"), [
    (["v1=abc"], "v1: expected a weight from 0 to 100 (a whole number), got 'abc'"),
    (["v1"], "expected VERSION=WEIGHT (e.g. v1=90), got 'v1'"),
    (["v1=101", "v2=0"], "v1: expected a weight from 0 to 100 (a whole number), got '101'"),
    (["v1=50", "v1=50"], "version 'v1' is given twice"),
    (["v1=1e2"], "got '1e2'"),
    (["v1=90", "v2=20"], "sum"),
    (["v1=90", "v3=10"], "v3"),
    ([], "no weights given"),
])
def test_route_set_refuses_bad_weights_with_exit_5_before_asking_consul(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str], words: list[str],
        message: str) -> None:
    code, _, err = mesh_run(["route", "set", "api", *words, "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE
    assert err.startswith("ERROR: ") and message in err
    assert store.values == {} and store.reads_of_report == 0


def test_route_set_of_an_unknown_service_or_a_tcp_one_is_a_usage_error(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = mesh_run(["route", "set", "apii", "v1=100", "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and "no service 'apii' in the inventory" in err and "did you mean 'api'" in err
    code, _, err = mesh_run(["route", "set", "db", "v1=100", "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and "db is a TCP service" in err
    assert store.values == {}


def test_route_set_without_inventory_or_with_bad_wait_is_a_usage_error(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    assert mesh_run(["route", "set", "api", "v1=100"], capsys)[0] == EXIT_USAGE
    for wait in ("soon", "nan", "99999999999", "-1"):
        code, _, err = mesh_run(["route", "set", "api", "v1=100", "--wait", wait, "-i", str(inventory)], capsys)
        assert code == EXIT_USAGE, wait
        assert "--wait" in err or "No such option" in err


def test_route_set_not_applied_in_time_exits_1_and_the_override_stays_stored(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store = FakeTraffic(controller=lambda fake: {"api": ""})  # an active controller that never applies it
    monkeypatch.setattr(commands, "STORE", lambda mesh: store)
    code, _, err = mesh_run(["route", "set", "api", "v1=90", "v2=10", "--wait", "0.3", "-i", str(inventory)],
                            capsys)
    assert code == EXIT_ERROR
    revision = store.document("api")["revision"]
    assert f"ERROR: api: revision {revision} not applied within 0.3 s: the active controller reports no override, " \
           f"not revision {revision}" in err
    assert "it stays stored in Consul: a controller applies it when one runs, or the next `mesh deploy` does" in err
    assert store.document("api")["split"] == {"v1": 90, "v2": 10}


def test_route_set_with_no_controller_stops_waiting_early_and_names_why(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store = FakeTraffic(controller=None, lock_held=False)
    monkeypatch.setattr(commands, "STORE", lambda mesh: store)
    monkeypatch.setattr("mesh.runtime_kv.NO_LOCK_GRACE_S", 0.2)
    code, _, err = mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)
    assert code == EXIT_ERROR
    assert "no controller is active (nobody holds the controllers' lock)" in err
    assert "api" in store.values


def test_route_set_no_wait_stores_and_returns(inventory: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = FakeTraffic(controller=None)
    monkeypatch.setattr(commands, "STORE", lambda mesh: store)
    code, out, _ = mesh_run(["route", "set", "api", "v1=100", "v2=0", "--no-wait", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out.endswith("api: not waiting for the controllers (--no-wait)\n")
    assert store.reads_of_report == 0 and store.document("api")["split"] == {"v1": 100, "v2": 0}


def test_a_write_that_loses_a_race_reads_again_and_keeps_what_the_other_wrote(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", {"split": None, "fault": {"delay": {"duration": "1s", "percent": 100}}, "revision": "a"})
    store.refuse_writes = 1  # someone rewrites the key between this command's read and its write
    assert mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)[0] == EXIT_OK
    assert store.document("api")["split"] == {"v1": 90, "v2": 10}
    assert store.document("api")["fault"] == {"delay": {"duration": "1000ms", "percent": 100}}


def test_an_unreadable_stored_value_is_replaced_with_a_warning(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", "{not json")
    code, _, err = mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert err.startswith("[WARNING]: the stored override of api could not be read (not JSON")
    assert store.document("api")["split"] == {"v1": 90, "v2": 10}


# ---- mesh route reset, mesh fault set/reset ----------------------------------------------------------------


def test_route_reset_removes_the_override_and_waits_for_the_empty_revision(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    assert mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)[0] == EXIT_OK
    code, out, _ = mesh_run(["route", "reset", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and "api" not in store.values
    assert out.splitlines()[0] == "api: override removed (routing as the inventory says)"
    assert out.splitlines()[1].startswith("api: applied to every caller (web) in ")
    code, out, _ = mesh_run(["route", "reset", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out == "api: no override is stored: nothing to reset\n"


def test_fault_set_stores_abort_delay_and_headers_in_the_inventory_syntax(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = mesh_run(["fault", "set", "api", "--abort", "12.5%:500", "--delay", "2s:25%", "--header",
                             "x-test=1", "--header", "X-Team=a b", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert store.document("api")["fault"] == {"abort": {"status": 500, "percent": 12.5},
                                              "delay": {"duration": "2000ms", "percent": 25},
                                              "when_headers": {"x-test": "1", "x-team": "a b"}}
    assert out.splitlines()[0].startswith("api: stored fault: abort 500 for 12.5%, delay 2s for 25% of requests "
                                          "with header x-test=1 and header x-team=a b (revision ")


@pytest.mark.parametrize(("args", "message"), [
    ([], "give --abort, --delay or both"),
    (["--abort", "50"], "--abort: expected PERCENT%[:STATUS] such as 50% or 10%:500, got '50'"),
    (["--abort", "150%"], "--abort: expected a percentage from 0 to 100"),
    (["--abort", "50%:99"], "--abort: expected an HTTP status from 200 to 599 after ':', got '99'"),
    (["--abort", "50%:abc"], "got 'abc'"),
    (["--delay", "2"], "--delay: expected a duration"),
    (["--delay", "99999h"], "--delay: expected a duration of at most 24h"),
    (["--delay", "2s:50"], "--delay: expected DURATION[:PERCENT%]"),
    (["--abort", "5%", "--header", "novalue"], "--header: expected NAME=VALUE"),
    (["--abort", "5%", "--header", "bad name=1"], "--header: expected an HTTP header name"),
    (["--abort", "5%", "--header", "a=1", "--header", "A=2"], "--header: a given twice"),
])
def test_fault_set_refuses_bad_values_with_exit_5(inventory: Path, store: FakeTraffic,
                                                  capsys: pytest.CaptureFixture[str], args: list[str],
                                                  message: str) -> None:
    code, _, err = mesh_run(["fault", "set", "api", *args, "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and message in err, err
    assert store.values == {}


def test_fault_set_on_a_tcp_service_is_refused(inventory: Path, store: FakeTraffic,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = mesh_run(["fault", "set", "db", "--abort", "5%", "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and "db is a TCP service" in err and store.values == {}


def test_fault_reset_keeps_the_split_under_a_new_revision_or_removes_a_fault_only_override(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)
    mesh_run(["fault", "set", "api", "--delay", "1s", "-i", str(inventory)], capsys)
    before = store.document("api")["revision"]
    code, out, _ = mesh_run(["fault", "reset", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out.startswith("api: stored split v1=90 v2=10 (revision ")
    assert store.document("api")["fault"] is None and store.document("api")["revision"] != before
    code, out, _ = mesh_run(["fault", "reset", "api", "-i", str(inventory)], capsys)
    assert out == "api: no run-time fault is stored: nothing to reset\n"
    mesh_run(["route", "reset", "api", "-i", str(inventory)], capsys)
    mesh_run(["fault", "set", "api", "--abort", "1%", "-i", str(inventory)], capsys)
    code, out, _ = mesh_run(["fault", "reset", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and "api" not in store.values
    assert out.startswith("api: override removed (routing as the inventory says)\n")


# ---- mesh route show --------------------------------------------------------------------------------------


def test_route_show_without_override_names_the_inventory_and_default_values(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = mesh_run(["route", "show", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert out == (
        "service api (http), versions: v1, v2\n"
        "override: none (routing as the inventory says)\n"
        "controller: applied: every caller's routes follow the inventory (no override)\n"
        "load balancing: round_robin (default)\n"
        "routes (first match wins):\n"
        "  #  match                to                        timeout         retries\n"
        "  1  header x-canary=1    v2 100% (inventory)       2s (inventory)  "
        "2 on connect-failure,refused-stream,reset (default)\n"
        "  2  every other request  every instance (default)  2s (inventory)  "
        "2 on connect-failure,refused-stream,reset (default)\n"
        "mirror: none (default)\n"
        "fault: none (default)\n")


def test_route_show_marks_the_overridden_split_and_fault_and_whether_they_are_applied(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    mesh_run(["route", "set", "api", "v1=90", "v2=10", "-i", str(inventory)], capsys)
    mesh_run(["fault", "set", "api", "--abort", "50%", "--header", "x-test=1", "-i", str(inventory)], capsys)
    revision = store.document("api")["revision"]
    code, out, _ = mesh_run(["route", "show", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert f"override: revision {revision} set by " in out
    assert f"controller: applied: every caller's routes reflect revision {revision}\n" in out
    assert "  2  every other request  v1 90%, v2 10% (override)  2s (inventory)" in out
    assert "fault: abort 503 for 50% of requests with header x-test=1 (override)\n" in out
    store.controller = lambda fake: {"api": "0" * 32}
    code, out, _ = mesh_run(["route", "show", "api", "--json", "-i", str(inventory)], capsys)
    shown = json.loads(out)
    assert shown["routes"][1] == {"match": None, "match_text": "every other request", "to": {"v1": 90, "v2": 10},
                                  "to_from": "override", "timeout_ms": 2000, "timeout_from": "inventory",
                                  "retries": None, "retries_from": "default"}
    assert shown["fault"] == {"abort": {"status": 503, "percent": 50}, "when_headers": {"x-test": "1"},
                              "from": "override"}
    assert shown["override"]["revision"] == revision and shown["override"]["applies"] is True
    assert shown["controller"] == {"active": True, "reason": None, "revision": "0" * 32, "applied": False}


def test_route_show_names_an_override_the_controllers_ignore(tmp_path: Path) -> None:
    mesh = load_mesh(write_inventory(tmp_path))
    stored = decode_override("api", '{"split": {"v1": 50, "v3": 50}, "fault": null, "revision": "r1"}', 3)
    view = route_view(mesh, "api", stored, AppliedTraffic(True, None, True, {"api": ""}))
    text = show_text(view)
    assert "override: revision r1\n  IGNORED (the inventory's routing holds): " in text and "v3" in text
    assert "every other request  every instance (default)" in text
    assert "controller: applied: every caller's routes follow the inventory (no override)" in text
    assert show_json(view)["override"]["applies"] is False


def test_route_show_of_a_service_without_policy_and_without_controller(tmp_path: Path) -> None:
    mesh = load_mesh(write_inventory(tmp_path, services=""))
    view = route_view(mesh, "api", None, AppliedTraffic(False, "nobody holds the controllers' lock"))
    text = show_text(view)
    assert "  1  every request  every instance (default)  15s (default)" in text
    assert "controller: no controller is active (nobody holds the controllers' lock)" in text


# ---- values, the wait, the controllers' report, the deploy's overrides -------------------------------------


def test_the_values_of_the_options() -> None:
    assert parse_split(["v1=90", "v2=10"]) == (("v1", 90), ("v2", 10))
    assert parse_abort("50%") == Abort(503, 50.0) and parse_abort("0.5%:429") == Abort(429, 0.5)
    assert parse_delay("2s") == Delay(2000, 100.0) and parse_delay("150ms:10%") == Delay(150, 10.0)
    assert parse_fault("1%", None, ["x-a=1"]) == Fault(abort=Abort(503, 1.0), when_headers=(("x-a", "1"),))
    assert parse_seconds("90s", "--wait", 3600) == 90.0 and parse_seconds("2.5", "--wait", 3600) == 2.5
    with pytest.raises(UsageError):
        parse_seconds("1e9", "--wait", 3600)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_applied_polls_until_the_revision_shows_and_stops_when_no_lock_is_held() -> None:
    clock = Clock()
    store = FakeTraffic(controller=lambda fake: {"api": "r2" if clock.now >= 3 else "r1"})
    result = wait_applied(store, "api", "r2", 60, clock.sleep, lambda: clock.now)
    assert result.applied and result.seconds == 3.0
    clock = Clock()
    result = wait_applied(FakeTraffic(controller=None, lock_held=False), "api", "r2", 60, clock.sleep,
                          lambda: clock.now)
    assert not result.applied and result.seconds == 5.0
    clock = Clock()
    result = wait_applied(FakeTraffic(controller=lambda fake: {}), "api", "r2", 2, clock.sleep, lambda: clock.now)
    assert not result.applied and result.seconds == 2.0
    assert result.why_not("api", "r2") == ("the active controller has not applied revision r2 to every caller "
                                           "(a push is pending or failed)")


def test_the_controllers_report_reads_state_traffic() -> None:
    now = datetime(2026, 12, 6, 18, 0, tzinfo=UTC)
    state = json.dumps({"holder": "ctl1:1", "updated_at": now.timestamp(), "traffic": {"api": "r1", "web": "", "bad": 3}})
    report = applied_traffic("session", state, now)
    assert report.active and report.revision("api") == "r1" and report.revision("web") == ""
    assert report.revision("bad") is None
    stale = applied_traffic("session", state, now.replace(hour=19))
    assert not stale.active and stale.revision("api") is None and "older than" in str(stale.reason)
    assert applied_traffic(None, None, now).reason == "nobody holds the controllers' lock"


def test_decoding_keeps_a_readable_problem_for_anything_stored() -> None:
    for value in (b"\xff\xfe", "[]", "null", '{"split": {"v1": "x"}}', '{"revision": 5}', "x" * 70_000):
        stored = decode_override("api", value, 1)
        assert stored.override is None and stored.problem, value


def test_the_deploy_plans_with_every_override_that_applies_and_warns_of_the_others(tmp_path: Path) -> None:
    mesh = load_mesh(write_inventory(tmp_path))
    store = FakeTraffic()
    store.put("api", {"split": {"v1": 80, "v2": 20}, "fault": None, "revision": "r1"})
    store.put("db", {"split": None, "fault": {"abort": {"status": 503, "percent": 5}}, "revision": "r2"})
    store.put("gone", {"split": {"v1": 100}, "fault": None, "revision": "r3"})
    warnings: list[str] = []
    found: Mapping[str, TrafficOverride] = plan_overrides(mesh, warnings.append, store)
    assert dict(found) == {"api": TrafficOverride(split=(("v1", 80), ("v2", 20)), revision="r1")}
    assert len(warnings) == 2 and warnings[0].startswith("the run-time override of db is ignored: ")
    assert "`mesh route reset gone` removes it" in warnings[1]


def test_traffic_target_names_the_callers(tmp_path: Path) -> None:
    mesh = load_mesh(write_inventory(tmp_path, services=API_POLICY))
    target = traffic_target(mesh, "api")
    assert (target.versions, target.callers, target.protocol) == (("v1", "v2"), ("web",), "http")
    assert traffic_target(mesh, "web").callers == ()


def test_instant_controller_reports_every_stored_service() -> None:
    store = FakeTraffic()
    store.put("api", {"split": {"v1": 100}, "fault": None, "revision": "r9"})
    assert instant(store) == {"api": "r9"}


def test_route_reset_removes_the_override_of_a_service_that_left_the_inventory(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("gone", {"split": {"v1": 100}, "fault": None, "revision": "r3"})
    code, out, _ = mesh_run(["route", "reset", "gone", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and "gone" not in store.values
    assert out.splitlines()[0] == "gone: override removed (routing as the inventory says)"
    code, _, err = mesh_run(["route", "reset", "gone", "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and "no service 'gone' in the inventory" in err


def test_the_plan_renders_callers_routes_with_the_overrides_it_is_given(tmp_path: Path) -> None:
    from mesh.plan.build import PlanInputs, build_plan

    mesh = load_mesh(write_inventory(tmp_path))

    def web_route(overrides: Mapping[str, TrafficOverride]) -> str:
        proxy = build_plan(mesh, PlanInputs(b"root", "00", overrides=overrides), [mesh.host("vm1")]).host(
            "vm1").proxy("web-8080")
        routes = [item for item in proxy.files if "/rds." in item.path and "api" in item.path]
        assert len(routes) == 1, [item.path for item in proxy.files]
        return routes[0].content.decode()

    inventory_only = web_route({})
    overridden = web_route({"api": TrafficOverride(split=(("v1", 80), ("v2", 20)), revision="r1")})
    assert "upstream-api.v2" in inventory_only and "weight: 20" not in inventory_only
    assert "weight: 20" in overridden and "weight: 80" in overridden
