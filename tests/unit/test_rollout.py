"""`mesh rollout`: the decision (promote, roll back on errors or p99, wait for traffic, then give up), the split of
each step, and whole rollouts over a fake Consul KV and a fake numbers source: promoted to 100, rolled back to
where it started (exit 1, the reason printed), Ctrl-C leaving the last applied split (exit 99); bad options
exit 5 without a traceback."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from traffic_fakes import FakeTraffic, load_mesh, write_inventory

from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from mesh.traffic import commands
from mesh.traffic.changes import traffic_target
from mesh.traffic.rollout import (
    Limits,
    Observation,
    Rollout,
    decide,
    plan_rollout,
    serving_shares,
    step_split,
)

LIMITS = Limits(max_error_rate=0.01, max_p99_ms=250, min_requests=200, extra_intervals=2)
NOW = datetime(2026, 12, 6, 18, 0, tzinfo=UTC)


def seen(requests: float = 500, error_rate: float | None = 0.0, p99: float | None = 40.0,
         intervals: int = 1) -> Observation:
    return Observation(requests, error_rate, p99, 30.0 * intervals, intervals)


# ---- the decision -----------------------------------------------------------------------------------------


def test_healthy_numbers_over_enough_requests_promote() -> None:
    assert decide("v2", seen(), LIMITS).decision == "promote"
    assert decide("v2", seen(error_rate=0.01, p99=250), LIMITS).decision == "promote"  # the limits themselves pass


def test_errors_over_the_limit_roll_back_with_the_numbers_in_the_reason() -> None:
    verdict = decide("v2", seen(error_rate=0.125), LIMITS)
    assert (verdict.decision, verdict.reason) == ("rollback", "v2 error rate 12.5% > 1%")


def test_a_p99_over_the_limit_rolls_back() -> None:
    verdict = decide("v2", seen(p99=312.4), LIMITS)
    assert (verdict.decision, verdict.reason) == ("rollback", "v2 p99 312 ms > 250 ms")


def test_fewer_requests_wait_for_more_intervals_then_roll_back_for_lack_of_traffic() -> None:
    first = decide("v2", seen(requests=57, error_rate=1.0), LIMITS)  # all errors, but too few to judge
    assert first.decision == "wait" and first.reason == "57 requests, fewer than 200: another interval (1 of 2 more)"
    assert decide("v2", seen(requests=150, intervals=2), LIMITS).decision == "wait"
    last = decide("v2", seen(requests=199, intervals=3), LIMITS)
    assert (last.decision, last.reason) == ("rollback", "not enough traffic: 199 requests to v2 in 90 s, fewer than 200")


def test_no_p99_yet_waits_then_rolls_back_and_no_p99_limit_does_not_need_one() -> None:
    assert decide("v2", seen(p99=None), LIMITS).decision == "wait"
    assert decide("v2", seen(p99=None, intervals=3), LIMITS).reason == "no p99 latency of v2 measured in 90 s"
    no_latency_limit = Limits(0.01, None, 200)
    assert decide("v2", seen(p99=None), no_latency_limit).decision == "promote"


# ---- the splits -------------------------------------------------------------------------------------------


def test_with_one_other_version_the_new_one_gets_the_step_and_the_other_the_rest() -> None:
    serving = serving_shares((("v1", 100), ("v2", 0)), "v2", {})
    assert [step_split(("v1", "v2"), serving, "v2", share) for share in (10, 25, 100)] == [
        (("v1", 90), ("v2", 10)), (("v1", 75), ("v2", 25)), (("v2", 100),)]


def test_the_rest_goes_to_the_serving_versions_in_proportion_summing_to_100() -> None:
    serving = serving_shares((("v1", 60), ("v2", 10), ("v3", 30), ("v4", 0)), "v2", {})
    assert serving == {"v1": 60.0, "v3": 30.0}
    split = step_split(("v1", "v2", "v3", "v4"), serving, "v2", 25)
    assert split == (("v1", 50), ("v2", 25), ("v3", 25))
    odd = step_split(("v1", "v2", "v3"), {"v1": 1.0, "v3": 1.0}, "v2", 11)
    assert odd == (("v1", 45), ("v2", 11), ("v3", 44)) and sum(weight for _, weight in odd) == 100


def test_without_a_split_the_serving_versions_share_by_their_instances() -> None:
    assert serving_shares(None, "v3", {"v1": 3, "v2": 1, "v3": 2}) == {"v1": 3.0, "v2": 1.0}


# ---- whole rollouts ---------------------------------------------------------------------------------------


class FakeMeter:
    """Hands out the given observations in order (one per watched interval), numbering the intervals."""

    def __init__(self, script: list[Observation | Callable[[], Observation]]) -> None:
        self.script = list(script)
        self.marks = 0

    def mark(self) -> Any:
        self.marks += 1
        return self.marks

    def since(self, mark: Any, intervals: int) -> Observation:
        item = self.script.pop(0)
        observation = item() if callable(item) else item
        return Observation(observation.requests, observation.error_rate, observation.p99_ms, 30.0 * intervals,
                           intervals)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def rollout(tmp_path: Path, store: FakeTraffic, meter: FakeMeter,
            steps: tuple[int, ...] = (10, 50, 100)) -> tuple[int, list[str], list[str]]:
    mesh = load_mesh(write_inventory(tmp_path))
    plan = plan_rollout(mesh, traffic_target(mesh, "api"), "v2", store.read("api"), steps, 30.0, LIMITS, 60.0)
    out: list[str] = []
    err: list[str] = []
    clock = Clock()
    code = Rollout(plan, store, meter, out.append, err.append, "alice@laptop", lambda: NOW, clock.sleep,
                   lambda: clock.now).run()
    return code, out, err


def test_a_healthy_version_is_promoted_step_by_step_to_100(tmp_path: Path) -> None:
    store = FakeTraffic()
    code, out, err = rollout(tmp_path, store, FakeMeter([seen(), seen(requests=50), seen(requests=400), seen()]))
    assert code == EXIT_OK and err == []
    assert out == [
        ("rollout of api to v2: steps 10, 50, 100, 30 s each; limits: error rate <= 1%, p99 <= 250 ms, "
        "at least 200 requests"),
        "start: every instance (no split)",
        "step 1/3  v1=90 v2=10  applied in 0.0 s",
        "step 1/3  v2: 500 requests in 30 s, errors 0.0%, p99 40 ms  -> promote",
        "step 2/3  v1=50 v2=50  applied in 0.0 s",
        ("step 2/3  v2: 50 requests in 30 s, errors 0.0%, p99 40 ms  -> wait: 50 requests, fewer than 200: another "
        "interval (1 of 2 more)"),
        "step 2/3  v2: 400 requests in 60 s, errors 0.0%, p99 40 ms  -> promote",
        "step 3/3  v2=100  applied in 0.0 s",
        "step 3/3  v2: 500 requests in 30 s, errors 0.0%, p99 40 ms  -> promote",
        "rollout of api to v2 done: v2=100",
    ]
    assert store.document("api")["split"] == {"v2": 100}
    assert store.document("api")["set_by"] == "alice@laptop"


def test_errors_roll_back_to_where_it_started_and_exit_1_with_the_reason(tmp_path: Path) -> None:
    store = FakeTraffic()
    store.put("api", {"split": {"v1": 95, "v2": 5}, "fault": {"delay": {"duration": "1s", "percent": 1}},
                      "revision": "before"})
    code, out, err = rollout(tmp_path, store, FakeMeter([seen(), seen(error_rate=0.125)]))
    assert code == EXIT_ERROR
    assert out[1] == "start: v1=95 v2=5"
    assert out[-2] == "step 2/3  v2: 500 requests in 30 s, errors 12.5%, p99 40 ms  -> roll back: v2 error rate 12.5% > 1%"
    assert out[-1] == "rolled back to v1=95 v2=5: applied in 0.0 s"
    assert err == ["ERROR: rollout of api to v2 rolled back at step 2/3 (v1=50 v2=50): v2 error rate 12.5% > 1%"]
    stored = store.document("api")
    assert stored["split"] == {"v1": 95, "v2": 5} and stored["fault"] == {"delay": {"duration": "1000ms", "percent": 1}}
    assert stored["revision"] != "before"


def test_a_roll_back_from_no_override_removes_the_split(tmp_path: Path) -> None:
    store = FakeTraffic()
    code, out, _ = rollout(tmp_path, store, FakeMeter([seen(p99=900.0)]))
    assert code == EXIT_ERROR and "api" not in store.values
    assert out[-1] == "rolled back to every instance (no split): applied in 0.0 s"


def test_too_little_traffic_rolls_back_after_the_extra_intervals(tmp_path: Path) -> None:
    store = FakeTraffic()
    code, out, err = rollout(tmp_path, store, FakeMeter([seen(requests=10)] * 3))
    assert code == EXIT_ERROR
    assert [line.rsplit("-> ", 1)[1].split(":")[0] for line in out if "->" in line] == ["wait", "wait", "roll back"]
    assert err[0].endswith("not enough traffic: 10 requests to v2 in 90 s, fewer than 200")


def test_a_step_no_controller_applies_rolls_back(tmp_path: Path) -> None:
    store = FakeTraffic(controller=lambda fake: {"api": ""})
    code, out, _err = rollout(tmp_path, store, FakeMeter([]))
    assert code == EXIT_ERROR
    assert out[2].startswith("step 1/3  v1=90 v2=10  not applied within 60 s: the active controller reports no "
                             "override")
    assert "api" not in store.values  # the split it started from: none


def test_ctrl_c_while_watching_leaves_the_last_applied_split(tmp_path: Path) -> None:
    def interrupt() -> Observation:
        raise KeyboardInterrupt

    store = FakeTraffic()
    code, _out, err = rollout(tmp_path, store, FakeMeter([seen(), interrupt]))
    assert code == EXIT_INTERRUPTED
    assert err == [("interrupted: api stays at v1=50 v2=50, the last split every caller applied "
                   "(`mesh route set api ...` or `mesh route reset api` changes it)")]
    assert store.document("api")["split"] == {"v1": 50, "v2": 50}


def test_ctrl_c_while_a_step_is_being_applied_puts_back_the_last_applied_split(tmp_path: Path) -> None:
    store = FakeTraffic()
    applied = {"api": ""}
    pressed = []

    def controller(fake: FakeTraffic) -> dict[str, str]:
        if fake.document("api")["split"] == {"v1": 50, "v2": 50}:
            if not pressed:
                pressed.append(True)
                raise KeyboardInterrupt  # Ctrl-C while waiting for step 2, which no caller applied yet
            return applied
        applied["api"] = fake.revision_of("api")
        return applied

    store.controller = controller
    code, _, err = rollout(tmp_path, store, FakeMeter([seen()]))
    assert code == EXIT_INTERRUPTED
    assert err[-1].startswith("interrupted: api stays at v1=90 v2=10, the last split every caller applied")
    assert store.document("api")["split"] == {"v1": 90, "v2": 10}


def test_plan_refuses_what_cannot_be_rolled_out(tmp_path: Path) -> None:
    mesh = load_mesh(write_inventory(tmp_path))
    target = traffic_target(mesh, "api")
    with pytest.raises(UsageError, match="api has no version 'v3'"):
        plan_rollout(mesh, target, "v3", None, (100,), 30, LIMITS, 60)
    with pytest.raises(UsageError, match="db is a TCP service"):
        plan_rollout(mesh, traffic_target(mesh, "db"), "v1", None, (100,), 30, LIMITS, 60)
    with pytest.raises(UsageError, match="no service calls web"):
        plan_rollout(mesh, traffic_target(mesh, "web"), "v1", None, (100,), 30, LIMITS, 60)
    store = FakeTraffic()
    store.put("api", {"split": {"v2": 100}, "fault": None, "revision": "r"})
    with pytest.raises(UsageError, match="v2 already takes every request of api"):
        plan_rollout(mesh, target, "v2", store.read("api"), (100,), 30, LIMITS, 60)


# ---- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "10,abc,100"], "--steps: expected whole percentages separated by commas"),
    (["--steps", "50,25,100"], "--steps: each step must be larger than the one before"),
    (["--steps", "10,50"], "--steps: the last step must be 100"),
    (["--steps", "0,100"], "--steps: every step is a percentage from 1 to 100"),
    (["--steps", "1" + "0" * 400], "--steps: expected whole percentages"),
    (["--interval", "99999999999999h"], "--interval: expected a duration"),
    (["--interval", "500ms"], "--interval: expected at least 1000 ms"),
    (["--interval", "30"], "--interval: expected a duration such as 500ms"),
    (["--max-error-rate", "150%"], "--max-error-rate: expected a percentage from 0 to 100"),
    (["--max-error-rate", "nan"], "--max-error-rate: expected a percentage"),
    (["--max-p99", "fast"], "--max-p99: expected a duration"),
    (["--min-requests", "-3"], "--min-requests"),
    (["--min-requests", "9" * 40], "--min-requests"),
    (["--wait", "inf"], "--wait"),
    (["--to", "v3"], "api has no version 'v3'"),
])
def test_rollout_refuses_bad_options_with_exit_5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], args: list[str],
                                                 message: str) -> None:
    inventory = write_inventory(tmp_path)
    store = FakeTraffic()
    monkeypatch.setattr(commands, "STORE", lambda mesh: store)
    full = ["rollout", "api", "-i", str(inventory), *(["--to", "v2"] if "--to" not in args else []), *args]
    code = run(full)
    _, err = capsys.readouterr()
    assert code == EXIT_USAGE and message in err and "Traceback" not in err, err
    assert store.values == {}


@pytest.mark.parametrize(("service", "to", "message"), [
    ("api", "v9", "api has no version 'v9'"),
    ("db", "v1", "db is a TCP service"),
])
def test_a_rollout_the_inventory_rules_out_is_refused_before_consul_is_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], service: str, to: str,
        message: str) -> None:
    def no_consul(mesh: object) -> FakeTraffic:
        raise AssertionError("Consul was asked")

    monkeypatch.setattr(commands, "STORE", no_consul)
    code = run(["rollout", service, "--to", to, "-i", str(write_inventory(tmp_path))])
    _, err = capsys.readouterr()
    assert code == EXIT_USAGE and message in err and "Traceback" not in err, err


def test_rollout_from_the_command_line_prints_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path)
    store = FakeTraffic()
    meter = FakeMeter([seen(), seen()])
    monkeypatch.setattr(commands, "STORE", lambda mesh: store)
    monkeypatch.setattr(commands, "METER", lambda mesh, service, version: meter)
    monkeypatch.setattr("mesh.traffic.rollout.time.sleep", lambda seconds: None)
    code = run(["rollout", "api", "--to", "v2", "--steps", "50,100", "--interval", "1s", "--max-p99", "250ms",
                "--min-requests", "200", "-i", str(inventory)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert out.splitlines()[-1] == "rollout of api to v2 done: v2=100"
    assert store.document("api")["split"] == {"v2": 100}


def test_the_fleet_meter_counts_the_new_versions_requests_errors_and_p99_as_its_proxies_saw_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from telemetry_samples import PromText, telemetry_mesh

    from mesh.telemetry.targets import ProxyTarget, proxy_targets
    from mesh.traffic.rollout import FleetMeter

    def api(ok: float, failed: float, latencies: list[float], version: str) -> str:
        callee = {"destination_service": "api", "destination_version": version}
        return (PromText()
                .counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "2"}, ok)
                .counter("envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "5"}, failed)
                .histogram("envoy_http_downstream_rq_time", callee, latencies).text())

    class Fetcher:
        via = "direct"

        def __init__(self) -> None:
            self.reads = 0

        def fetch(self, target: ProxyTarget) -> str:
            later = self.reads >= 2  # two proxies a scrape: the second scrape sees the requests
            self.reads += 1
            if target.version == "v2":
                return api(380 if later else 10, 20 if later else 0, [30.0] * (400 if later else 10), "v2")
            return api(1000 if later else 0, 0, [5.0] * (1000 if later else 0), "v1")

        def close(self) -> None:
            pass

    targets = tuple(target for target in proxy_targets(telemetry_mesh()) if target.service == "api")
    fetcher = Fetcher()
    monkeypatch.setattr("mesh.telemetry.fleet.time.time", lambda: 100.0 if fetcher.reads <= 2 else 130.0)
    meter = FleetMeter(targets, fetcher, "api", "v2")
    seen = meter.since(meter.mark(), 1)
    assert seen.seconds == 30.0 and round(seen.requests) == 390 and seen.error_rate == pytest.approx(20 / 390)
    assert seen.p99_ms is not None and 25 < seen.p99_ms <= 50 and seen.intervals == 1 and seen.unanswered == 0
