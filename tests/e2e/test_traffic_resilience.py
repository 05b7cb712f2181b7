"""End to end on the lab (issue 20): load balancing, outlier detection, circuit breaking and zones, as a user
sees them, with real requests.

The module deploys one copy of inventory/lab.yaml (RESILIENCE below): api balanced by least request, with a
circuit breaker and a quick outlier detection; zones on the hosts (vm2 `a`, vm1 `b`, dock1 `c`: web on vm1 sees
both api instances as "another zone", so api's balancing is not zoned); and the lab's spare db on vm1 listed, so
db has two instances. Load comes from traffic_client.py run on vm1 against web's outbound listener to api; each
answer names who answered at every hop (api, then db). So:
- api on vm2 (zone a) talks to the db in its own zone (vm2) until that db's app stops, then to vm1's, then back;
- api in dock1's container (zone c, no db of its own zone) spreads its connections over both db instances.
The last test compares least request with round robin: it measures least request, deploys inventory/lab.yaml
back (no policy: round robin) and measures round robin with the same load.

The module holds the shared lab lock throughout, resets the behaviour files, and leaves inventory/lab.yaml
deployed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import inventory_copy, out, shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import deploy, deploy_lab_back, lab_state_dir
from traffic_helpers import (
    V1,
    V2,
    WEB_TO_API,
    Load,
    behave,
    behave_normally,
    counter,
    metrics_url,
    send,
)

from mesh.lab.topology import LabSize, build_topology, workload_vars

MAX_REQUESTS = 10
ZONES = {"vm2": "a", "vm1": "b", "dock1": "c"}
RESILIENCE: dict[str, Any] = {
    "api": {
        "lb": {"policy": "least_request"},
        "circuit_breaker": {"max_connections": MAX_REQUESTS, "max_pending_requests": 5,
                            "max_requests": MAX_REQUESTS},
        "outlier_detection": {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "3s",
                              "max_ejection_percent": 50},
    },
}
DB_UNIT = "mesh-demo-db.service"
# Chains as traffic_client.py writes them: service/instance at each hop.
API_VM2_DB_VM2 = "api/vm2 db/vm2"
API_VM2_DB_VM1 = "api/vm2 db/vm1"
API_DOCK1_DB_VM2 = "api/api-v2-1 db/vm2"
API_DOCK1_DB_VM1 = "api/api-v2-1 db/vm1"


@dataclass
class Balanced:
    lab: LabUp
    inventory: Path
    restored: list[bool] = field(default_factory=lambda: [False])  # inventory/lab.yaml deployed back already


def _spare_db() -> dict[str, object]:
    vm1 = build_topology(LabSize()).node("vm1")
    spares = [workload for workload in vm1.workloads if workload.spare]
    assert spares, "the lab has no spare db on vm1"
    return workload_vars(spares[0])


def _resilience_inventory(folder: Path) -> Path:
    def policies(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_services"] = RESILIENCE

    def zone(name: str) -> Any:
        def edit(variables: dict[str, Any]) -> None:
            variables["mesh_zone"] = ZONES[name]
            if name == "vm1":
                variables["mesh_workloads"].append(_spare_db())
        return edit

    return inventory_copy(folder, lab_state_dir(), edit=policies, hosts={name: zone(name) for name in ZONES})


def _chain_ok(lab: LabUp) -> Load:
    return send(lab, f"{WEB_TO_API}/", 40)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balanced]:
    with shared_lab() as lab:
        inventory = _resilience_inventory(tmp_path_factory.mktemp("traffic-resilience"))
        behave_normally(lab)
        state = Balanced(lab, inventory)
        try:
            run = deploy(inventory)
            assert run.code == 0, f"the resilience policy could not be deployed:\n{run}"
            wait_for(lambda: _chain_ok(lab), Load.all_ok, "web -> api -> db through the mesh after the deploy",
                     timeout=120, interval=1.0)
            yield state
        finally:
            behave_normally(lab)
            out(lab, "vm2", f"systemctl start {DB_UNIT}")
            if not state.restored[0]:
                deploy_lab_back(lab)


@pytest.fixture
def clean(balanced: Balanced) -> Iterator[Balanced]:
    try:
        yield balanced
    finally:
        behave_normally(balanced.lab)


# ---- zones and TCP balancing ----------------------------------------------------------------------------------

def test_api_on_vm2_stays_in_its_zone_while_dock1s_api_spreads_connections_over_both_dbs(
        balanced: Balanced) -> None:
    load = send(balanced.lab, f"{WEB_TO_API}/", 400, 4)
    assert load.all_ok(), load.brief()
    chains = load.chains
    assert chains.get(API_VM2_DB_VM1, 0) == 0 and chains.get(API_VM2_DB_VM2, 0) > 0, (
        f"api on vm2 (zone a) left its zone for db: {chains}")
    from_dock1 = chains.get(API_DOCK1_DB_VM1, 0) + chains.get(API_DOCK1_DB_VM2, 0)
    assert from_dock1 >= 40, f"too few requests reached dock1's api to judge its balancing: {chains}"
    for chain in (API_DOCK1_DB_VM1, API_DOCK1_DB_VM2):
        assert chains.get(chain, 0) >= from_dock1 // 5, f"dock1's api hardly used one db instance: {chains}"


def _vm2_chains(lab: LabUp) -> dict[str, int]:
    load = send(lab, f"{WEB_TO_API}/", 60, 4)
    return {chain: count for chain, count in load.chains.items() if chain.startswith("api/vm2 ")}


def test_zone_failover_when_the_local_db_stops_and_return_when_it_is_back(balanced: Balanced) -> None:
    lab = balanced.lab
    out(lab, "vm2", f"systemctl stop {DB_UNIT}")
    try:
        wait_for(lambda: _vm2_chains(lab), lambda chains: set(chains) == {API_VM2_DB_VM1},
                 "api on vm2 failing over to the db on vm1 (another zone) once vm2's db stopped",
                 timeout=120, interval=1.0)
    finally:
        out(lab, "vm2", f"systemctl start {DB_UNIT}")
    wait_for(lambda: _vm2_chains(lab), lambda chains: set(chains) == {API_VM2_DB_VM2},
             "api on vm2 back to the db of its own zone once vm2's db runs again", timeout=120, interval=1.0)


# ---- outlier detection and circuit breaking --------------------------------------------------------------------

def test_outlier_detection_ejects_an_instance_answering_500_and_lets_it_back(clean: Balanced) -> None:
    lab = clean.lab
    behave(lab, V1, {"status": 500})
    ejected = wait_for(lambda: send(lab, f"{WEB_TO_API}/", 40, 2), lambda load: load.ok_by(V2) == 40,
                       "v1 (answering 500) ejected: every request answered by v2", timeout=90, interval=0.5)
    assert ejected.instance(V1) == 0, ejected.brief()
    behave(lab, V1, None)
    wait_for(lambda: send(lab, f"{WEB_TO_API}/", 40, 2), lambda load: load.all_ok() and load.ok_by(V1) > 0,
             "v1 (recovered) answering again after its ejection", timeout=90, interval=1.0)


def test_a_circuit_breaker_rejects_overflow_with_503_and_envoy_counts_it(clean: Balanced) -> None:
    lab, inventory = clean.lab, clean.inventory
    web = metrics_url(inventory, "vm1", "web")
    names = ("envoy_cluster_upstream_rq_pending_overflow", "envoy_cluster_upstream_cx_overflow")
    before = counter(lab, web, *names)
    for instance in (V1, V2):
        behave(lab, instance, {"delay_ms": 1000})
    load = send(lab, f"{WEB_TO_API}/", 60, 60)
    assert load.errors == {} and load.status(503) + load.status(200) == 60, load.brief()
    assert load.status(503) > 0 and load.status(200) >= MAX_REQUESTS // 2, load.brief()
    wait_for(lambda: counter(lab, web, *names) - before, lambda seen: seen > 0,
             "web's Envoy counting the requests its circuit breaker rejected", timeout=60, interval=2.0)


# ---- least request against round robin (last: it deploys inventory/lab.yaml back) --------------------------------

def _slow_share(lab: LabUp) -> tuple[float, Load]:
    """The share of 400 requests (8 at a time) that the slowed v2 answered."""
    load = send(lab, f"{WEB_TO_API}/", 400, 8)
    assert load.all_ok() and load.instance(V1) + load.instance(V2) == 400, load.brief()
    return load.instance(V2) / 400, load


def test_least_request_sends_a_slow_instance_fewer_requests_than_round_robin(clean: Balanced) -> None:
    lab = clean.lab
    behave(lab, V2, {"delay_ms": 100})
    least_request, lr_load = _slow_share(lab)
    clean.restored[0] = True
    deploy_lab_back(lab)  # no policy: round robin
    behave(lab, V2, {"delay_ms": 100})
    round_robin, rr_load = _slow_share(lab)
    print(f"slow v2's share: least request {least_request:.1%}, round robin {round_robin:.1%}")
    assert least_request < round_robin - 0.1, (
        f"the slow v2 got {least_request:.0%} under least request and {round_robin:.0%} under round robin:\n"
        f"{lr_load.brief()}\n{rr_load.brief()}")
