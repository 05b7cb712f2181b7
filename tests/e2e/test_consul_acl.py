"""End to end: the lab's Consul with ACLs on (deny by default, a master token and mesh's token, the README's
policy). deploy, status and the checker work with the inventory's token; with a wrong one each says Consul
refused it (deploy and status exit 1, the checker's journal); two inventories with different mesh ids share
the lab's Consul and neither deregisters the other's instances.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab()), and leaves the lab
deployed with its own inventory, as it found it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    CONSUL_TOKEN_FILE,
    INVENTORY,
    check_status,
    consul,
    inventory_copy,
    out,
    run_mesh,
    shared_lab,
    wait_for,
)
from lab_helpers import LabUp

from mesh import catalog
from mesh.healthcheck.config import TOKEN_FILE
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.lab import consul_acl

CONSUL = "http://10.77.0.2:8500"
DEPLOY_TIMEOUT = 600.0
CHECKER_UNIT = "mesh-health-checker.service"
WRONG_TOKEN = "3b7ce0a4-0000-4000-8000-00000000dead"
REFUSED = "Consul refused the token"
TOKEN_ON_CONTROLLER = TOKEN_FILE
OTHER_ID = "lab-b"
# Consul ID -> service of the lab's instances (inventory/lab.yaml at --vms 2 --containers 1)
INSTANCES = {"web-vm1-8080": "web", "api-vm2-9090": "api", "db-vm2-5432": "db", "api-dock1-api-v2-1": "api"}


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        yield up
        restored = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)  # as it was: the lab's token
        assert restored.code == 0, f"restoring the lab's deployment failed:\n{restored}"


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    done = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    if done.code != 0:
        pytest.fail(f"deploying the lab with its Consul token failed:\n{done}")
    return lab


@pytest.fixture(scope="module")
def state_dir() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


def anonymous(path: str) -> Any:
    with urllib.request.urlopen(CONSUL + path, timeout=10) as answer:
        return json.load(answer)


def journal_since(lab: LabUp, since: str) -> str:
    return out(lab, "ctl1", f"journalctl -u {CHECKER_UNIT} --no-pager -o cat --since '{since}'")


def now_on(lab: LabUp, host: str) -> str:
    return out(lab, host, "date '+%Y-%m-%d %H:%M:%S'").strip()


def wrong_token_inventory(folder: Path, state_dir: str) -> Path:
    token = folder / "wrong-token"
    consul_acl.write_secret(token, WRONG_TOKEN + "\n")

    def point_at_wrong_token(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_consul_token_file"] = str(token)

    return inventory_copy(folder, state_dir, point_at_wrong_token)


def other_mesh_inventory(folder: Path, state_dir: str) -> Path:
    """The lab inventory as another team's: mesh_id lab-b, every host renamed b-NAME (same addresses)."""
    def as_other_mesh(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_id"] = OTHER_ID
        for group in document["all"]["children"].values():
            group["hosts"] = {f"b-{name}": host for name, host in (group.get("hosts") or {}).items()}

    return inventory_copy(folder, state_dir, as_other_mesh)


# ---- with the lab's token ----------------------------------------------------------------------------------

def test_the_labs_consul_denies_anonymous_reads_and_the_token_file_is_private(deployed: LabUp) -> None:
    variables = yaml.safe_load(INVENTORY.read_text())["all"]["vars"]
    assert variables["mesh_consul_token_file"] == str(CONSUL_TOKEN_FILE)
    assert CONSUL_TOKEN_FILE.stat().st_mode & 0o777 == 0o600
    assert anonymous("/v1/catalog/service/api") == [], "default deny: an anonymous read sees nothing"
    assert {e["ServiceID"] for e in consul(CONSUL, "/v1/catalog/service/api")} == {"api-vm2-9090", "api-dock1-api-v2-1"}


def test_deploy_registers_with_the_mesh_id_and_the_checker_writes_passing(deployed: LabUp) -> None:
    for service_id, service in INSTANCES.items():
        [entry] = [e for e in consul(CONSUL, f"/v1/catalog/service/{service}") if e["ServiceID"] == service_id]
        assert entry["ServiceMeta"]["mesh-id"] == "lab.mesh" and entry["NodeMeta"]["mesh-id"] == "lab.mesh"
    statuses = wait_for(lambda: {sid: check_status(CONSUL, service, sid) for sid, service in INSTANCES.items()},
                        lambda seen: set(seen.values()) == {"passing"}, "every instance passing in Consul")
    assert set(statuses) == set(INSTANCES)
    wait_for(lambda: consul(CONSUL, "/v1/kv/mesh/lab.mesh/health-checker/leader")[0].get("Session"), bool,
             "the checker holds the lock under the mesh id's own KV prefix")


def test_status_works_with_the_token(deployed: LabUp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per row: the cells are not wrapped
    done = run_mesh("status", str(INVENTORY), timeout=300)
    assert REFUSED not in done.text and "consul ?" not in done.text, done
    assert "api: consul 2/2" in done.stdout, done


def test_the_checker_runs_as_its_own_user_and_its_token_is_private(deployed: LabUp) -> None:
    pid = out(deployed, "ctl1", f"systemctl show -p MainPID --value {CHECKER_UNIT}").strip()
    assert out(deployed, "ctl1", f"ps -o user= -p {pid}").strip() == "mesh-checker"
    token = CONSUL_TOKEN_FILE.read_text().strip()
    assert out(deployed, "ctl1", "stat -c '%a %U' /etc/mesh/checker/consul-token").strip() == "600 mesh-checker"
    assert out(deployed, "ctl1", "cat /etc/mesh/checker/consul-token").strip() == token
    assert out(deployed, "ctl1", "stat -c '%a %U %G' /etc/mesh/checker").strip() == "750 root mesh-checker"
    assert out(deployed, "ctl1", "stat -c '%U' /etc/mesh/checker/tls/key.pem").strip() == "mesh-checker"
    seen = out(deployed, "ctl1", f"cat /proc/{pid}/cmdline /proc/{pid}/environ /etc/mesh/checker/checker.json "
                                 f"/etc/systemd/system/{CHECKER_UNIT}; journalctl -u {CHECKER_UNIT} --no-pager")
    assert token not in seen, "the token is only in its 0600 file"


# ---- with a wrong token ------------------------------------------------------------------------------------

def test_a_wrong_token_makes_deploy_status_and_the_checker_say_consul_refused_it(
        deployed: LabUp, tmp_path: Path, state_dir: str) -> None:
    inventory = wrong_token_inventory(tmp_path / "wrong", state_dir)
    status = run_mesh("status", str(inventory), timeout=300)
    assert status.code == 1 and REFUSED in status.text, status
    token_hash = f"sha256sum {TOKEN_ON_CONTROLLER}"
    before_deploy = out(deployed, "ctl1", token_hash)
    # deploy checks the token before any host: nothing reaches the controller, the wrong token above all
    deploy = run_mesh("deploy", str(inventory), "--limit", "ctl1", timeout=DEPLOY_TIMEOUT)
    assert deploy.code == 1 and REFUSED in deploy.text, deploy
    assert "PLAY RECAP" not in deploy.stdout, deploy
    assert WRONG_TOKEN not in deploy.text and WRONG_TOKEN not in status.text
    assert out(deployed, "ctl1", token_hash) == before_deploy, "a refused deploy changed the controller's token"
    # ctl1's checker must lead again at the end: ctl2's would keep the lock once ctl1's lost it
    out(deployed, "ctl2", f"systemctl stop {CHECKER_UNIT}")
    try:
        _a_replaced_token_is_told_and_a_deploy_restores_it(deployed, token_hash, before_deploy)
    finally:
        out(deployed, "ctl2", f"systemctl start {CHECKER_UNIT}")


def _a_replaced_token_is_told_and_a_deploy_restores_it(deployed: LabUp, token_hash: str, before_deploy: str) -> None:
    since = now_on(deployed, "ctl1")
    time.sleep(1)
    try:
        # a token revoked or replaced behind mesh's back: the checker says so in its journal and keeps retrying
        out(deployed, "ctl1", f"printf '%s\\n' {WRONG_TOKEN} > {TOKEN_ON_CONTROLLER} && "
                              f"systemctl restart {CHECKER_UNIT}")
        journal = wait_for(lambda: journal_since(deployed, since), lambda text: REFUSED in text,
                           "the checker's journal says Consul refused the token")
        assert WRONG_TOKEN not in journal
        pid_command = f"systemctl is-active {CHECKER_UNIT}; systemctl show -p MainPID --value {CHECKER_UNIT}"
        before = out(deployed, "ctl1", pid_command).split()
        time.sleep(5)
        after = out(deployed, "ctl1", pid_command).split()
        assert before == after and after[0] == "active", \
            f"the checker keeps running and retrying, no crash loop: {before} then {after}"
    finally:
        since = now_on(deployed, "ctl1")
        restored = run_mesh("deploy", str(INVENTORY), "--limit", "ctl1", timeout=DEPLOY_TIMEOUT)
    assert restored.code == 0, restored
    assert out(deployed, "ctl1", token_hash) == before_deploy
    wait_for(lambda: journal_since(deployed, since), lambda text: "checker_leading" in text,
             "the checker leads again with the lab's token")


# ---- two mesh ids on one Consul ----------------------------------------------------------------------------

def test_two_mesh_ids_share_the_labs_consul_and_neither_deregisters_the_other(
        deployed: LabUp, tmp_path: Path, state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # status prints one line per row
    other_path = other_mesh_inventory(tmp_path / "other", state_dir)
    other = build_mesh(load_inventory(str(other_path)), str(other_path))
    assert other.settings.id == OTHER_ID
    access = catalog.access_for(other)
    try:
        first = catalog.sync(access, other)  # the other inventory's catalog sync, as its deploy ends
        assert set(first.registered) == {f"{s.split('-', 1)[0]}-b-{s.split('-', 1)[1]}" for s in INSTANCES}
        assert not first.deregistered and not first.conflicts, first

        ours = run_mesh("deploy", str(INVENTORY), "--limit", "ctl1", timeout=DEPLOY_TIMEOUT)
        assert ours.code == 0 and "deregistered 0" in ours.stdout, ours
        theirs = {e["ServiceID"]: e for e in consul(CONSUL, "/v1/catalog/service/api")
                  if e["ServiceMeta"].get("mesh-id") == OTHER_ID}
        assert set(theirs) == {"api-b-vm2-9090", "api-b-dock1-api-v2-1"}, "our deploy left the other mesh's instances"

        again = catalog.sync(access, other)
        assert not again.changed, "their second sync changes nothing, and takes nothing of ours"
        api = {e["ServiceID"] for e in consul(CONSUL, "/v1/catalog/service/api")}
        assert {"api-vm2-9090", "api-dock1-api-v2-1"} <= api
        done = run_mesh("status", str(INVENTORY), timeout=300)
        assert "api: consul 2/2" in done.stdout, f"status counts only its own mesh id's instances:\n{done}"
    finally:
        gone = catalog.sync(access, replace(other, hosts=()))  # the other inventory emptied: only its own go
    assert set(gone.removed_nodes) == {"b-vm1", "b-vm2", "b-dock1"}
    assert {e["ServiceID"] for e in consul(CONSUL, "/v1/catalog/service/api")} == {"api-vm2-9090", "api-dock1-api-v2-1"}
    assert {e["Node"] for e in consul(CONSUL, "/v1/catalog/nodes")} >= {"vm1", "vm2", "dock1"}
    for service_id, service in INSTANCES.items():
        assert check_status(CONSUL, service, service_id) != "missing"

