"""End to end: `mesh deploy inventory/lab.yaml` with a container host (issue 13's "Done when"): api answering
from a VM and from a container, each calling db through the mesh; the sidecar's proxy_port refusing clients
without a mesh identity; the app container's port closed; an app container stopped, restarted with a new
address, and rebooted with its host; a second deploy that touches no container; `mesh status` on sidecars.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout, brings the lab up at its size (or uses it
as it is), and leaves it up and deployed. Tests run in file order; the ones that stop or reboot things come last
and each brings back what it broke.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    INVENTORY,
    Run,
    check_status,
    hops,
    out,
    run_mesh,
    sh,
    shared_lab,
    tcp_from,
    tls_from,
    wait_for,
)
from lab_helpers import LabUp

from mesh.config import paths
from mesh.containers.reachability import FORWARD_CHAIN, NAT_CHAIN, WATCHER_UNIT
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.testing.certs import MeshCAProbeIssuer
from mesh.testing.health_endpoint import TestCA

CONSUL = "http://10.77.0.2:8500"
TRUST_DOMAIN = "lab.mesh"
DEPLOY_TIMEOUT = 600.0
APP, SIDECAR = "api-v2-1", "mesh-envoy-api-api-v2-1"
CONTAINER_ID = "api-dock1-api-v2-1"  # the container instance in Consul
PROXY_PORT, ADMIN_PORT, APP_PORT, DB_LOCAL_PORT = 21000, 19000, 9090, 19102
THIEF = "mesh-e2e-ip-thief"  # takes the stopped app's address, so the app comes back with a new one
TIMINGS: dict[str, float] = {}


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deploy_lab() -> Iterator[LabUp]:
    """The lab at inventory/lab.yaml at the shared size, under the shared lock for the whole module (see
    test_deploy_vms.py for why not conftest's session lab)."""
    with shared_lab() as lab:
        yield lab
    print(f"\ndeploy times: {TIMINGS}")


@pytest.fixture(scope="module")
def first_deploy(deploy_lab: LabUp) -> Run:
    started = time.monotonic()
    done = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    TIMINGS["first"] = round(time.monotonic() - started, 1)
    return done


@pytest.fixture(scope="module")
def fleet(deploy_lab: LabUp, first_deploy: Run) -> LabUp:
    if first_deploy.code != 0:
        pytest.fail(f"the first deploy failed, so there is no mesh to examine:\n{first_deploy}")
    return deploy_lab


@pytest.fixture(scope="module")
def state_dir() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


# ---- what the tests look at --------------------------------------------------------------------------------

def _api_kind(seen: list[dict[str, Any]] | str) -> str | None:
    """The kind of the api instance that answered, when the whole chain web -> api -> db worked; else None."""
    if isinstance(seen, str) or any("error" in hop for hop in seen):
        return None
    if [hop.get("service") for hop in seen] != ["web", "api", "db"]:
        return None
    return str(seen[1].get("kind"))


def _kinds(lab: LabUp, requests: int) -> list[str | None]:
    return [_api_kind(hops(lab, "vm1", 8080)) for _ in range(requests)]


def _docker(lab: LabUp, command: str) -> str:
    return out(lab, "dock1", f"docker {command}").strip()


def _ids(lab: LabUp) -> dict[str, str]:
    return {name: _docker(lab, f"container inspect -f '{{{{.Id}}}} {{{{.State.Status}}}}' {name}")
            for name in (APP, SIDECAR)}


def _app_ip(lab: LabUp) -> str:
    return _docker(lab, f"container inspect -f '{{{{range .NetworkSettings.Networks}}}}{{{{.IPAddress}}}}"
                        f"{{{{end}}}}' {APP}")


def _sidecar_stat(lab: LabUp, name: str) -> int:
    """An Envoy stat of the sidecar, read from its admin socket in the host folder mounted into the sidecar."""
    socket = paths.admin_socket_path(SIDECAR.removeprefix("mesh-envoy-"))
    text = out(lab, "dock1", f"curl -sS -m 5 --unix-socket {socket} "
                             f"'http://localhost/stats?filter=^{re.escape(name)}$'")
    values = [int(v) for v in re.findall(r":\s*(\d+)\s*$", text, re.MULTILINE)]
    assert values, f"the sidecar has no stat {name}: {text!r}"
    return sum(values)


def _serving_both(lab: LabUp, what: str) -> None:
    """Over a run of requests to web, api answers from a VM and from a container, every chain reaching db."""
    def probe() -> list[str | None]:
        return _kinds(lab, 12)
    wait_for(probe, lambda kinds: None not in kinds and {"vm", "container"} <= set(kinds), what, interval=1)


def _rules(lab: LabUp) -> str:
    return out(lab, "dock1", f"iptables -t nat -S {NAT_CHAIN}; iptables -S {FORWARD_CHAIN}; "
                             f"iptables -t nat -S PREROUTING; iptables -S DOCKER-USER")


# ---- the tests, in order -----------------------------------------------------------------------------------

def test_first_deploy_deploys_the_container_host(first_deploy: Run) -> None:
    assert first_deploy.code == 0, first_deploy
    recap = first_deploy.recap()  # ok=0 when the lab already held the plan (another module deployed it first)
    assert recap.get("dock1", {}).get("failed") == 0 and recap["dock1"]["unreachable"] == 0, recap
    assert "is a container host" not in first_deploy.text  # no longer skipped with a warning


def test_api_answers_from_a_vm_and_a_container_each_calling_db_through_the_mesh(fleet: LabUp) -> None:
    _serving_both(fleet, "web -> api on vm2 and on dock1, each -> db")
    # The container's call to db went to 127.0.0.1:19102 in its own namespace: the sidecar's outbound listener.
    assert _sidecar_stat(fleet, f"listener.127.0.0.1_{DB_LOCAL_PORT}.downstream_cx_total") > 0
    assert check_status(CONSUL, "api", CONTAINER_ID) == "passing"


def test_container_proxy_port_refuses_clients_without_a_mesh_identity(fleet: LabUp, state_dir: str,
                                                                      tmp_path: Path) -> None:
    mesh_ca = MeshCAProbeIssuer(state_dir)
    address = fleet.hosts["dock1"]

    def probe(client: Any) -> Any:
        return tls_from(fleet, "ctl1", address, PROXY_PORT, "http", mesh_ca.root_file, client)

    valid = probe(mesh_ca.issue(f"spiffe://{TRUST_DOMAIN}/svc/web", tmp_path, "valid"))  # the control case
    assert valid.http_status() == 200, valid
    assert valid.json_body()["hops"][0] == {**valid.json_body()["hops"][0], "service": "api", "kind": "container"}
    refused = {
        "no client certificate": probe(None),
        "a certificate from another CA": probe(TestCA(tmp_path / "other", "other CA").issue(
            f"spiffe://{TRUST_DOMAIN}/svc/web", "other-ca")),
    }
    let_through = {case: seen for case, seen in refused.items() if seen.answer}
    assert not let_through, f"the sidecar's inbound listener answered: {let_through}"


def test_the_app_containers_port_is_unreachable_from_other_hosts(fleet: LabUp) -> None:
    address, app_ip = fleet.hosts["dock1"], _app_ip(fleet)
    for source in ("ctl1", "vm1"):
        seen = tcp_from(fleet, source, [(address, APP_PORT), (address, PROXY_PORT), (address, 22)])
        assert seen[f"{address}:{APP_PORT}"].startswith("closed"), (source, seen)
        assert seen[f"{address}:{PROXY_PORT}"].startswith("open"), (source, seen)  # the control case
    # Even routed straight to the container's own address through dock1, only the sidecar's port is forwarded.
    subnet = ".".join(app_ip.split(".")[:2]) + ".0.0/16"
    out(fleet, "ctl1", f"ip route replace {subnet} via {address}")
    try:
        seen = tcp_from(fleet, "ctl1", [(app_ip, APP_PORT)])
        assert seen[f"{app_ip}:{APP_PORT}"].startswith("closed"), seen
    finally:
        sh(fleet, "ctl1", f"ip route del {subnet}")


def test_mesh_status_covers_sidecars_and_exits_0_when_healthy(fleet: LabUp,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    done = wait_for(lambda: run_mesh("status", str(INVENTORY), timeout=120), lambda run: run.code == 0,
                    "mesh status exits 0", interval=2)
    rows = [" ".join(line.replace("│", " ").replace("|", " ").split()) for line in done.stdout.splitlines()]
    sidecar = [row for row in rows if row.startswith("dock1 api-api-v2-1 ")]
    assert sidecar and "sidecar running 1.40" in sidecar[0] and " applied " in sidecar[0], done
    assert "db: consul 1/1, envoy 1/1" in sidecar[0], done
    watcher = [row for row in rows if row.startswith("dock1 sidecar watcher ")]
    assert watcher and "watcher active rules applied" in watcher[0], done


def test_second_deploy_changes_nothing_on_dock1_and_keeps_its_containers(fleet: LabUp) -> None:
    before = _ids(fleet)
    started = time.monotonic()
    second = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    TIMINGS["second"] = round(time.monotonic() - started, 1)
    assert second.code == 0, second
    assert second.recap()["dock1"]["changed"] == 0, second
    assert _ids(fleet) == before


def test_a_stopped_app_container_goes_critical_and_comes_back_with_a_new_address(fleet: LabUp) -> None:
    old_ip = _app_ip(fleet)
    image = _docker(fleet, f"container inspect -f '{{{{.Config.Image}}}}' {APP}")
    _docker(fleet, f"stop {APP}")
    try:
        wait_for(lambda: check_status(CONSUL, "api", CONTAINER_ID), lambda s: s == "critical",
                 "Consul marks the stopped container instance critical")
        wait_for(lambda: _kinds(fleet, 10), lambda kinds: kinds == ["vm"] * 10,
                 "callers use only the VM instance of api, with no errors")
        # Take the app's old address, so it comes back with a new one.
        _docker(fleet, f"run --detach --name {THIEF} --network mesh-demo {image} "
                       "python3 -c 'import time; time.sleep(3600)'")
    finally:
        _docker(fleet, f"start {APP}")
    try:
        new_ip = _app_ip(fleet)
        assert new_ip != old_ip, "the app container kept its address: the new-address case was not exercised"
        wait_for(lambda: check_status(CONSUL, "api", CONTAINER_ID), lambda s: s == "passing",
                 "Consul marks the restarted container instance passing, with no deploy")
        _serving_both(fleet, "callers use the restarted container instance again")
        assert f"--to-destination {new_ip}:{PROXY_PORT}" in _rules(fleet)
    finally:
        sh(fleet, "dock1", f"docker rm --force {THIEF}")


def test_rebooting_dock1_brings_app_sidecar_and_rules_back_serving(fleet: LabUp) -> None:
    out(fleet, "dock1", "touch /run/mesh-e2e-this-boot")
    out(fleet, "dock1", "systemctl --no-block reboot")
    wait_for(lambda: sh(fleet, "dock1", "test -e /run/mesh-e2e-this-boot", timeout=10).returncode,
             lambda rc: rc == 1, "dock1 rebooting", timeout=90, interval=1)
    wait_for(lambda: sh(fleet, "dock1", "systemctl is-system-running", timeout=10).stdout.strip(),
             lambda state: state == "running", "dock1 back up and running", timeout=120, interval=1)
    wait_for(lambda: {name: state.split()[-1] for name, state in _ids(fleet).items()},
             lambda states: set(states.values()) == {"running"}, "app container and sidecar running")
    assert out(fleet, "dock1", f"systemctl is-active {WATCHER_UNIT}").strip() == "active"
    wait_for(lambda: _rules(fleet), lambda text: f"--to-destination {_app_ip(fleet)}:{PROXY_PORT}" in text
             and f"-j {NAT_CHAIN}" in text and f"-j {FORWARD_CHAIN}" in text, "reachability rules back")
    _serving_both(fleet, "api served from dock1's container again after the reboot")
    seen = tcp_from(fleet, "ctl1", [(fleet.hosts["dock1"], APP_PORT), (fleet.hosts["dock1"], PROXY_PORT)])
    assert seen[f"{fleet.hosts['dock1']}:{APP_PORT}"].startswith("closed"), seen
    assert seen[f"{fleet.hosts['dock1']}:{PROXY_PORT}"].startswith("open"), seen
    # Traffic is back; Consul follows at the health checker's next probe of the instance.
    wait_for(lambda: run_mesh("status", str(INVENTORY), timeout=120), lambda run: run.code == 0,
             "mesh status exiting 0 once the checker has seen dock1's instance again", interval=2)
    print(json.dumps(TIMINGS))
