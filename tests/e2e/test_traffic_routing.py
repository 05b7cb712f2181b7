"""End to end on the lab (issue 20): routing a service's requests by version, match, fault and mirror, as a user
sees it, with real requests.

The module deploys one copy of inventory/lab.yaml whose `mesh_services` gives api a policy with every routing
feature at once (ROUTING below: ring hash on a header, retries, routes by header, cookie, method, path regex and
prefix, a per-route timeout, a 90/10 split, a mirror to v2, a header-scoped fault) and web a rate limit (api on vm2
gets web as an upstream to reach it); run-time overrides (`mesh route set`, `mesh fault set`, `mesh rollout`)
need no deploy. Load comes from traffic_client.py run on vm1 against web's outbound listener to api (the client
stands in for web's app, so its headers, cookies and methods reach web's Envoy): each answer names the api
instance that answered (v1 on vm2, v2 in dock1's container). Instances misbehave through the demo app's
behaviour file. Counts are judged against 5-sigma binomial bounds; waits poll with generous deadlines and no
latency is judged except a delay fault's lower bound.

The split and match tests run with both deliveries (issue 23): `files`, then, after every other test of the
module, `xds` (the same policy with `mesh_delivery: xds`, deployed once; each xds test first sees every proxy
running on ADS).

The module holds the shared lab lock throughout, resets api's overrides and behaviour files, and deploys
inventory/lab.yaml back at its end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import DELIVERIES, Delivery, assert_delivery, delivery_inventory
from deploy_helpers import shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import deploy, deploy_lab_back, envoy_processes
from traffic_helpers import (
    V1,
    V2,
    WEB_TO_API,
    Load,
    background_load,
    behave,
    behave_normally,
    binomial_bounds,
    counter,
    mesh_cli,
    metrics_url,
    reset_overrides,
    send,
    wait_routed,
    within,
)

WEB_FROM_VM2 = 19103  # api's outbound listener to web on vm2 (added by this module's inventory)
ROUTE_TIMEOUT_MS = 300
# Envoy's timers run on a coarse monotonic clock (the kernel tick): a 400 ms delay was measured as 397.3 ms once.
TIMER_SLACK_MS = 10
MIRROR_PERCENT = 20
ROUTING: dict[str, Any] = {
    "api": {
        "lb": {"policy": "ring_hash", "hash_on": {"header": "x-user"}},
        "retries": {"attempts": 3, "on": ["5xx"]},
        "routes": [
            {"match": {"headers": {"x-canary": "1"}}, "to": {"v2": 100}},
            {"match": {"cookies": {"canary": "yes"}}, "to": {"v2": 100}},
            {"match": {"method": "POST"}, "to": {"v2": 100}},
            {"match": {"path": {"regex": "/v2/.*"}}, "to": {"v2": 100}},
            {"match": {"path": {"prefix": "/slow"}}, "to": {"v2": 100}, "timeout": f"{ROUTE_TIMEOUT_MS}ms"},
            {"match": {"path": {"prefix": "/split"}}, "to": {"v1": 90, "v2": 10}},
            {"match": {"path": {"prefix": "/stable"}}, "to": {"v1": 100}},
            # no catch-all: every other request goes to every api instance (ring hash on x-user)
        ],
        "mirror": {"to": "v2", "percent": MIRROR_PERCENT},
        "fault": {"abort": {"status": 418, "percent": 100}, "when_headers": {"x-fault": "teapot"}},
    },
    "web": {"rate_limit": {"requests_per_second": 5, "burst": 5}},
}


@dataclass
class Routed:
    """The lab with ROUTING deployed on one delivery (files until the module's xds tests)."""

    lab: LabUp
    inventories: dict[str, Path]  # delivery -> the routing inventory with it
    delivery: Delivery = "files"

    @property
    def inventory(self) -> Path:
        return self.inventories[self.delivery]


def _routing_inventory(folder: Path, delivery: Delivery = "files") -> Path:
    def policies(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_services"] = ROUTING

    def api_calls_web(variables: dict[str, Any]) -> None:
        api = next(w for w in variables["mesh_workloads"] if w["service"] == "api")
        api.setdefault("upstreams", []).append({"service": "web", "local_port": WEB_FROM_VM2})

    return delivery_inventory(folder, delivery, edit=policies, hosts={"vm2": api_calls_web})


def _stable_ok(lab: LabUp) -> Load:
    return send(lab, f"{WEB_TO_API}/stable", 20)


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    with shared_lab() as lab:
        inventory = _routing_inventory(tmp_path_factory.mktemp("traffic-routing"))
        inventories = {"files": inventory, "xds": _routing_inventory(tmp_path_factory.mktemp("traffic-routing-xds"),
                                                                       "xds")}
        reset_overrides(inventory)  # what an interrupted run may have left
        behave_normally(lab)
        try:
            before = envoy_processes(lab)
            run = deploy(inventory)
            assert run.code == 0, f"the routing policy could not be deployed:\n{run}"
            assert envoy_processes(lab) == before, "deploying a traffic policy restarted an Envoy"
            wait_for(lambda: _stable_ok(lab), lambda load: load.all_ok() and load.ok_by(V1) == 20,
                     "/stable answered by api v1 through web's Envoy after the deploy", timeout=120, interval=1.0)
            yield Routed(lab, inventories)
        finally:
            reset_overrides(inventory)
            behave_normally(lab)
            deploy_lab_back(lab)


@pytest.fixture
def delivery() -> Delivery:
    """The delivery of a test not parametrized by it."""
    return "files"


@pytest.fixture
def delivered(routed: Routed, delivery: Delivery) -> Routed:
    """The routed lab on `delivery` (ROUTING deployed with it when the lab runs the other one); on xds, every
    proxy is seen running on ADS first."""
    if routed.delivery != delivery:
        routed.delivery = delivery
        run = deploy(routed.inventory)
        assert run.code == 0, f"the routing policy could not be deployed with mesh_delivery: {delivery}:\n{run}"
        wait_for(lambda: _stable_ok(routed.lab), lambda load: load.all_ok() and load.ok_by(V1) == 20,
                 f"/stable answered by api v1 through web's Envoy after the {delivery} deploy", timeout=120,
                 interval=1.0)
    if delivery == "xds":
        assert_delivery(routed.lab, routed.inventory, "xds")
    return routed


@pytest.fixture
def clean(delivered: Routed) -> Iterator[Routed]:
    """The routed lab; api's override and behaviour files dropped after the test, whatever it did."""
    try:
        yield delivered
    finally:
        behave_normally(delivered.lab)
        run = mesh_cli(delivered.inventory, "route", "reset", "api")
        assert run.code == 0, f"`mesh route reset api` failed:\n{run}"


def _share_message(load: Load, n: int, p: float, name: str) -> str:
    low, high = binomial_bounds(n, p)
    return f"{load.instance(name)} of {n} answered by {name}, expected {low:.0f}..{high:.0f}: {load.brief()}"


# ---- splits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delivery", DELIVERIES)
def test_a_90_10_split_then_route_set_50_50_with_no_failed_request_or_restart(clean: Routed) -> None:
    lab, inventory = clean.lab, clean.inventory
    before = envoy_processes(lab)
    split = send(lab, f"{WEB_TO_API}/split", 2000, 8)
    assert split.all_ok(), split.brief()
    assert split.instance(V1) + split.instance(V2) == 2000, split.brief()
    assert within(split.instance(V2), 2000, 0.10), _share_message(split, 2000, 0.10, V2)
    print(f"90/10: v2 answered {split.instance(V2)} of 2000")

    with background_load(lab, f"{WEB_TO_API}/", concurrency=2) as during:
        run = mesh_cli(inventory, "route", "set", "api", "v1=50", "v2=50")
        assert run.code == 0, f"`mesh route set api v1=50 v2=50` failed:\n{run}"
        wait_routed(inventory, {"v1": 50, "v2": 50})
    assert during.load is not None and during.load.answered >= 50, during.load
    assert during.load.all_ok(), f"requests failed while the split changed: {during.load.brief()}"

    half = send(lab, f"{WEB_TO_API}/", 2000, 8)
    assert half.all_ok(), half.brief()
    assert within(half.instance(V2), 2000, 0.50), _share_message(half, 2000, 0.50, V2)
    print(f"50/50: v2 answered {half.instance(V2)} of 2000; {during.load.answered} requests while it changed")
    assert envoy_processes(lab) == before, "an Envoy restarted (or a sidecar was recreated) for a route change"


# ---- matches -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delivery", DELIVERIES)
def test_header_cookie_method_and_path_regex_routes_send_exactly_the_matching_requests_to_v2(
        delivered: Routed) -> None:
    lab = delivered.lab
    header = send(lab, f"{WEB_TO_API}/stable", 200, cycle=("x-canary", ["1", "0"]))
    assert header.all_ok(), header.brief()
    assert header.key_instance == {"1": {V2: 100}, "0": {V1: 100}}, header.brief()

    cookie = send(lab, f"{WEB_TO_API}/stable", 200, cycle=("cookie", ["canary=yes", "session=1; canary=yes",
                                                                       "canary=no", "canaryx=yes"]))
    assert cookie.all_ok(), cookie.brief()
    assert cookie.key_instance == {"canary=yes": {V2: 50}, "session=1; canary=yes": {V2: 50},
                                   "canary=no": {V1: 50}, "canaryx=yes": {V1: 50}}, cookie.brief()

    post, get = send(lab, f"{WEB_TO_API}/stable", 100, method="POST"), send(lab, f"{WEB_TO_API}/stable", 100)
    assert post.all_ok() and post.ok_by(V2) == 100, post.brief()
    assert get.all_ok() and get.ok_by(V1) == 100, get.brief()

    regex = send(lab, f"{WEB_TO_API}/v2/orders", 100)
    assert regex.all_ok() and regex.ok_by(V2) == 100, regex.brief()
    not_whole = send(lab, f"{WEB_TO_API}/stable/v2/orders", 100)  # the regex matches whole paths only
    assert not_whole.all_ok() and not_whole.ok_by(V1) == 100, not_whole.brief()


def test_a_per_route_timeout_cuts_a_slow_versions_requests(clean: Routed) -> None:
    lab = clean.lab
    behave(lab, V2, {"delay_ms": 1500})
    slow = send(lab, f"{WEB_TO_API}/slow", 10, 10)
    assert slow.status(504) == 10, f"the /slow route's {ROUTE_TIMEOUT_MS} ms timeout did not cut v2: {slow.brief()}"
    untimed = send(lab, f"{WEB_TO_API}/v2/orders", 10, 10)  # the same slow v2 without a route timeout
    assert untimed.all_ok() and untimed.ok_by(V2) == 10, untimed.brief()


# ---- faults --------------------------------------------------------------------------------------------------

def test_the_inventory_fault_touches_only_requests_with_its_header(routed: Routed) -> None:
    load = send(routed.lab, f"{WEB_TO_API}/stable", 200, cycle=("x-fault", ["teapot", "none"]))
    assert load.errors == {} and load.status(418) == 100 and load.status(200) == 100, load.brief()
    assert load.key_instance["teapot"] == {"-": 100}, load.brief()  # Envoy answered: no app hop
    assert load.key_instance["none"] == {V1: 100}, load.brief()


def test_an_abort_fault_at_50_percent_and_a_header_scoped_delay_fault(clean: Routed) -> None:
    lab, inventory = clean.lab, clean.inventory
    run = mesh_cli(inventory, "fault", "set", "api", "--abort", "50%")
    assert run.code == 0, f"`mesh fault set api --abort 50%` failed:\n{run}"
    aborted = send(lab, f"{WEB_TO_API}/stable", 2000, 8)
    assert aborted.errors == {} and aborted.status(503) + aborted.ok_by(V1) == 2000, aborted.brief()
    low, high = binomial_bounds(2000, 0.5)
    assert within(aborted.status(503), 2000, 0.5), f"{aborted.status(503)} aborted, expected {low:.0f}..{high:.0f}"

    delay_ms = 400
    run = mesh_cli(inventory, "fault", "set", "api", "--delay", f"{delay_ms}ms", "--header", "x-slow=1")
    assert run.code == 0, f"`mesh fault set api --delay {delay_ms}ms --header x-slow=1` failed:\n{run}"
    delayed = send(lab, f"{WEB_TO_API}/stable", 40, 8, cycle=("x-slow", ["1", "0"]), samples=True)
    assert delayed.all_ok() and delayed.ok_by(V1) == 40, delayed.brief()  # the abort is gone: replaced
    slow = [sample[2] for sample in delayed.samples if sample[3] == "1"]
    assert len(slow) == 20 and min(slow) >= delay_ms - TIMER_SLACK_MS, f"requests with x-slow: 1 took {sorted(slow)} ms"

    run = mesh_cli(inventory, "fault", "reset", "api")
    assert run.code == 0, f"`mesh fault reset api` failed:\n{run}"
    teapot = send(lab, f"{WEB_TO_API}/stable", 20, headers={"x-fault": "teapot"})
    assert teapot.status(418) == 20, f"the inventory's fault is not back after the reset: {teapot.brief()}"


# ---- retries, rate limit, ring hash, mirror -------------------------------------------------------------------

def test_retries_hide_an_instance_that_fails_every_other_request(clean: Routed) -> None:
    lab, inventory = clean.lab, clean.inventory
    web = metrics_url(inventory, "vm1", "web")
    retried = counter(lab, web, "envoy_cluster_upstream_rq_retry")
    # v1 on /stable, one request at a time: v1 gets no mirrored copy (they go to v2), so its count of requests
    # (which the demo app fails every other of) is exactly the order of the tries.
    behave(lab, V1, {"fail_every": 2, "fail_status": 500})
    load = send(lab, f"{WEB_TO_API}/stable", 200, 1)
    assert load.all_ok() and load.ok_by(V1) == 200, f"retries did not hide v1's failures: {load.brief()}"
    behave(lab, V1, None)
    wait_for(lambda: counter(lab, web, "envoy_cluster_upstream_rq_retry") - retried, lambda seen: seen >= 50,
             "web's Envoy counting the retries that hid v1's failures", timeout=60, interval=2.0)


def test_a_rate_limit_answers_429_past_its_rate(routed: Routed) -> None:
    load = send(routed.lab, f"http://127.0.0.1:{WEB_FROM_VM2}/", 60, 6, host="vm2")
    assert load.errors == {} and load.status(200) + load.status(429) == 60, load.brief()
    seconds = float(load.data["seconds"])
    allowed = 5 + 5 * (seconds + 1)  # the burst, then 5 a second (one more second of slack)
    assert load.status(429) > 0 and 0 < load.status(200) <= allowed, load.brief()


def test_ring_hash_sends_the_same_header_value_to_the_same_instance(routed: Routed) -> None:
    users = [f"user-{i}" for i in range(20)]
    load = send(routed.lab, f"{WEB_TO_API}/", 400, 4, cycle=("x-user", users))
    assert load.all_ok(), load.brief()
    spread = {user: sorted(instances) for user, instances in load.key_instance.items()}
    assert all(len(instances) == 1 for instances in spread.values()), f"a user reached two instances: {spread}"
    assert {instances[0] for instances in spread.values()} == {V1, V2}, f"20 users all hashed to one: {spread}"


def _mirrored(inventory: Path, path: str) -> int:
    run = mesh_cli(inventory, "logs", "--host", "dock1", "--since", "3m", "--json")
    assert run.code == 0, f"`mesh logs --host dock1` failed:\n{run}"
    count = 0
    for raw in run.stdout.splitlines():
        try:
            line = dict(json.loads(raw))
        except (ValueError, TypeError):
            continue
        if line.get("direction") == "inbound" and line.get("destination_service") == "api" and \
                str(line.get("path", "")).startswith(path):
            count += 1
    return count


def test_a_mirror_sends_its_share_of_copies_to_v2_while_callers_see_only_v1(routed: Routed) -> None:
    lab, inventory = routed.lab, routed.inventory
    path = f"/stable/mirror-{uuid.uuid4().hex[:12]}"
    load = send(lab, f"{WEB_TO_API}{path}", 1000, 8)
    assert load.all_ok() and load.ok_by(V1) == 1000, f"callers saw another answer than v1's: {load.brief()}"
    low, high = binomial_bounds(1000, MIRROR_PERCENT / 100)
    wait_for(lambda: _mirrored(inventory, path), lambda seen: seen >= low,
             f"v2's access log holding at least {low:.0f} copies of {path}", timeout=90, interval=2.0)
    copies = _mirrored(inventory, path)  # read once more: the log may have been read as lines came in
    assert low <= copies <= high, f"{copies} copies of 1000 requests in v2's access log, expected {low:.0f}..{high:.0f}"


# ---- mesh rollout ----------------------------------------------------------------------------------------------

def _rollout(inventory: Path) -> Any:
    return mesh_cli(inventory, "rollout", "api", "--to", "v2", "--steps", "50,100", "--interval", "4s",
                    "--max-error-rate", "1%", "--min-requests", "50", "--extra-intervals", "3", timeout=300)


def test_rollout_promotes_a_healthy_v2_to_100_percent(clean: Routed) -> None:
    lab, inventory = clean.lab, clean.inventory
    run = mesh_cli(inventory, "route", "set", "api", "v1=100")
    assert run.code == 0, f"`mesh route set api v1=100` failed:\n{run}"
    with background_load(lab, f"{WEB_TO_API}/", concurrency=4) as during:
        rollout = _rollout(inventory)
    assert rollout.code == 0, f"the rollout of a healthy v2 did not finish:\n{rollout}"
    assert during.load is not None and during.load.all_ok(), during.load
    wait_routed(inventory, {"v2": 100})
    after = send(lab, f"{WEB_TO_API}/", 200, 4)
    assert after.all_ok() and after.ok_by(V2) == 200, after.brief()


def test_rollout_rolls_back_a_v2_that_answers_errors(clean: Routed) -> None:
    lab, inventory = clean.lab, clean.inventory
    run = mesh_cli(inventory, "route", "set", "api", "v1=100")
    assert run.code == 0, f"`mesh route set api v1=100` failed:\n{run}"
    behave(lab, V2, {"status": 500})
    with background_load(lab, f"{WEB_TO_API}/", concurrency=4) as during:
        rollout = _rollout(inventory)
    assert rollout.code == 1, f"the rollout of a failing v2 was not rolled back:\n{rollout}"
    assert during.load is not None and during.load.status(500) > 0, during.load  # real callers met v2's errors
    wait_routed(inventory, {"v1": 100})
    after = send(lab, f"{WEB_TO_API}/", 200, 4)
    assert after.all_ok() and after.ok_by(V1) == 200, after.brief()

