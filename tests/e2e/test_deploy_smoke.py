"""A quick end-to-end check of `mesh deploy` on the lab: requests to web reach api and db through the mesh, and
a second deploy changes nothing and restarts no Envoy. The full acceptance tests are test_deploy_vms.py.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator

import pytest
from lab_helpers import LabUp, mesh

LAB_LOCK = "/tmp/mesh-lab-dev.lock"  # the lab is one per machine: whoever uses it holds this lock
PROXIES = {"vm1": ["web-0"], "vm2": ["api-0", "db-1"]}


@pytest.fixture(scope="session")
def lab_lock() -> Iterator[None]:
    """Held from before the lab comes up until after it goes down (session fixtures end in reverse)."""
    with open(LAB_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def deployed(lab_lock: None, request: pytest.FixtureRequest) -> LabUp:
    lab: LabUp = request.getfixturevalue("lab")
    first = mesh("deploy", str(lab.inventory), timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    return lab


def _envoy_pids(lab: LabUp) -> dict[str, str]:
    pids = {}
    for host, proxies in PROXIES.items():
        for proxy in proxies:
            shown = lab.ssh(host, f"systemctl show -p MainPID --value mesh-envoy-{proxy}.service")
            pids[proxy] = shown.stdout.strip()
            assert pids[proxy] not in ("", "0"), f"{proxy}'s Envoy is not running: {shown.stderr}"
    return pids


def test_requests_to_web_reach_api_and_db_through_the_mesh(deployed: LabUp) -> None:
    answer = deployed.ssh("vm1", "curl -s -m 5 127.0.0.1:8080/")
    hops = json.loads(answer.stdout)["hops"]
    assert [hop["service"] for hop in hops] == ["web", "api", "db"], hops
    assert hops[1]["host"] == "vm2" and "error" not in hops[2], hops


def test_second_deploy_changes_nothing_and_restarts_no_envoy(deployed: LabUp) -> None:
    before = _envoy_pids(deployed)
    second = mesh("deploy", str(deployed.inventory), timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    recap = second.stdout.split("PLAY RECAP", 1)[1]
    changed = dict(re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", recap, flags=re.MULTILINE))
    assert changed and set(changed.values()) == {"0"}, recap
    assert _envoy_pids(deployed) == before
