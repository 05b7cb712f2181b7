"""End to end: the mesh CA cannot be replaced by accident, and expiry is never silent (issue 16), on the lab.

A deploy whose mesh_state_dir is new and empty, or holds another CA, against hosts that trust the lab's CA
stops with exit 1 naming hosts and fingerprints, and changes nothing on any host (every file mesh writes hashed
before and after, units, sidecars, rules) nor makes a CA. `mesh ca check` exits 2 once the lab runs certificates
under a third of their lifetime, 0 after a redeploy. The module holds the lab lock (shared_lab()) and leaves the
lab deployed with inventory/lab.yaml.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from deploy_helpers import INVENTORY, Run, host_files, inventory_copy, out, run_mesh, shared_lab
from lab_helpers import LabUp

from mesh.config import paths
from mesh.deploy.hostcerts import CHECKER_CA_PATH, leaves
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.pki import CertificateAuthority
from mesh.pki.certs import validity_start
from mesh.pki.expiry import WARN_REMAINING

DEPLOY_TIMEOUT = 600.0
MANAGED = ("vm1", "vm2", "dock1", "ctl1", "ctl2")  # hosts with workloads and the controllers; consul1 is left alone
CONTROLLERS = ("ctl1", "ctl2")
SHORT_TTL = "2m"  # short enough to wait for; a deploy of the whole lab fits well within a third of it
MAX_WAIT_S = 2 * 60  # a 2m leaf (backdated a tenth: 12s) crosses a third 1m20s after its signing
# the controllers run until the short deploy is done: at this fraction they renew no 2m leaf before it crosses a
# third (1m48s after its signing), so every leaf the test reads is one the deploy issued
SHORT_RENEW_FRACTION = 0.9

# Beyond deploy_helpers.host_files (/etc/mesh, Envoy, the units): the checker's venv (no bytecode, which Python may
# add at any time), /var/lib/mesh, mesh's units' processes, sidecar containers and images, and the firewall rules.
_MORE_STATE = r"""
for p in /var/lib/mesh /opt/mesh; do [ -d $p ] && find $p -type f ! -name '*.pyc' -print0 | sort -z \
  | xargs -0 -r sha256sum; done
for u in $(systemctl list-units --all --plain --no-legend 'mesh-*' | awk '{print $1}'); do
  systemctl show -p Id -p MainPID -p ActiveState -p ActiveEnterTimestamp "$u"; done
if command -v docker >/dev/null; then
  docker ps -a -q --filter name=mesh- | sort | xargs -r docker inspect \
    --format '{{.Id}} {{.Name}} {{.State.StartedAt}} {{.Image}} {{index .Config.Labels "mesh.config-hash"}}'
  docker image ls --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' | grep -i mesh | sort
  iptables-save 2>/dev/null | grep -i mesh | sed 's/\[[0-9]*:[0-9]*\]//'
fi
command -v nft >/dev/null && nft -s list ruleset 2>/dev/null | sed -n '/table .* mesh/,/^}/p'
true
"""


def fleet_state(lab: LabUp) -> dict[str, str]:
    """Per managed host: every file mesh writes (path, mode, owner, SHA-256) and what runs from them."""
    with ThreadPoolExecutor(len(MANAGED)) as pool:  # every host at once
        found = pool.map(lambda host: host_files(lab, host) + out(lab, host, _MORE_STATE, timeout=180), MANAGED)
        state = dict(zip(MANAGED, found, strict=True))
    # the snapshot sees what a deploy would change: the trust bundles, the units' processes, the sidecars
    for host in MANAGED:
        bundle = CHECKER_CA_PATH if host in CONTROLLERS else paths.CA_PATH
        assert any(line.startswith(f"{bundle} ") for line in state[host].splitlines()), \
            f"{host}: no trust bundle in the snapshot:\n{state[host]}"
        assert "MainPID=" in state[host], f"{host}: no mesh unit in the snapshot"
    assert " /mesh-envoy-api-api-v2-1 " in state["dock1"], f"dock1: no sidecar in the snapshot:\n{state['dock1']}"
    return state


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    for host in MANAGED:
        if before[host] != after[host]:
            old, new = set(before[host].splitlines()), set(after[host].splitlines())
            pytest.fail(f"{host} changed: gone {sorted(old - new)[:20]}, new {sorted(new - old)[:20]}")


def lab_state_dir() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


# whether the lab runs inventory/lab.yaml's deployment: its last deploy was that one and passed, and no test changed
# anything since (the module's end then need not deploy it again)
_NORMAL = {"deployed": False}


def deploy_normal() -> Run:
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    _NORMAL["deployed"] = run.code == 0
    return run


def changing_the_lab() -> None:
    _NORMAL["deployed"] = False


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    """The shared lab under its lock; deployed with inventory/lab.yaml again when the module ends."""
    with shared_lab() as up:
        try:
            yield up
        finally:
            if not _NORMAL["deployed"]:
                restored = deploy_normal()
                assert restored.code == 0, f"restoring the lab's normal deployment failed:\n{restored}"


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    """The lab deployed with the normal inventory (a deploy with nothing to do changes nothing)."""
    first = deploy_normal()
    if first.code != 0:
        pytest.fail(f"the lab's deploy failed, so there are no hosts trusting its CA:\n{first}")
    return lab


@pytest.fixture(scope="module")
def lab_root() -> str:
    return CertificateAuthority.load(lab_state_dir()).root_fingerprint


def refused_deploy(lab: LabUp, tmp_path: Path, state_dir: Path) -> tuple[Run, Run]:
    """A deploy and a check-mode deploy of the lab's inventory with mesh_state_dir at state_dir, with every
    host's state hashed before and after; fails the test when anything changed."""
    copy = inventory_copy(tmp_path / "inventory", str(state_dir))
    before = fleet_state(lab)
    changing_the_lab()
    started = time.monotonic()
    refused = run_mesh("deploy", str(copy), timeout=DEPLOY_TIMEOUT)
    print(f"refused deploy: {time.monotonic() - started:.1f} s")
    checked = run_mesh("deploy", "--check", str(copy), timeout=DEPLOY_TIMEOUT)
    assert_unchanged(before, fleet_state(lab))
    return refused, checked


def assert_refusal(run: Run, fingerprints: list[str]) -> None:
    assert run.code == 1, str(run)
    assert "refusing to deploy" in run.stderr, str(run)
    assert "PLAY RECAP" not in run.stdout, str(run)
    for host in MANAGED:
        assert f"  {host} /etc/mesh/" in run.stderr, f"{host} not named:\n{run}"
    for fingerprint in fingerprints:
        assert fingerprint in run.stderr, f"{fingerprint} not named:\n{run}"
    assert "mesh ca init" in run.stderr and "--replace-ca" in run.stderr, str(run)


# ---- the CA cannot change by accident ----------------------------------------------------------------------

def test_a_fresh_empty_state_dir_is_refused_and_nothing_changes(deployed: LabUp, lab_root: str,
                                                               tmp_path: Path) -> None:
    empty = tmp_path / "state"
    empty.mkdir()
    refused, checked = refused_deploy(deployed, tmp_path, empty)
    assert_refusal(refused, [lab_root])
    assert "no CA in the state dir" in refused.stderr, str(refused)
    assert_refusal(checked, [lab_root])
    assert list(empty.iterdir()) == [], "a CA (or anything else) was made in the new state dir"


def test_a_state_dir_holding_another_ca_is_refused_and_nothing_changes(deployed: LabUp, lab_root: str,
                                                                      tmp_path: Path) -> None:
    other = tmp_path / "other-state"
    made = run_mesh("ca", "init", "--state-dir", str(other), "--trust-domain", "lab.mesh")
    assert made.code == 0, str(made)
    other_root = CertificateAuthority.load(str(other)).root_fingerprint
    assert other_root != lab_root
    contents = sorted(p.relative_to(other).as_posix() for p in other.rglob("*"))
    refused, checked = refused_deploy(deployed, tmp_path, other)
    assert_refusal(refused, [lab_root, other_root])
    assert_refusal(checked, [lab_root, other_root])
    assert sorted(p.relative_to(other).as_posix() for p in other.rglob("*")) == contents, \
        "the other CA's state dir changed (no leaf may be signed, no cache built)"


# ---- expiry is never silent --------------------------------------------------------------------------------

def _leaf_times(lab: LabUp, host: str, path: str) -> tuple[datetime, datetime]:
    cert = x509.load_pem_x509_certificates(out(lab, host, f"cat {path}").encode())[0]
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _short_inventory(tmp_path: Path) -> Path:
    def short(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_cert_ttl"] = SHORT_TTL
        document["all"]["vars"]["mesh_cert_renew_fraction"] = SHORT_RENEW_FRACTION

    return inventory_copy(tmp_path / "short", lab_state_dir(), short)


def test_ca_check_exits_2_under_a_third_left_and_0_after_a_redeploy(deployed: LabUp, tmp_path: Path) -> None:
    short = _short_inventory(tmp_path)
    mesh = build_mesh(load_inventory(str(short)), str(short))
    files = [item for host in mesh.hosts for item in leaves(host)]
    assert {item.host for item in files} == set(MANAGED) and any(item.name == "health-checker" for item in files)
    # a deploy renews only leaves past half their lifetime: take them away so that it issues short ones
    changing_the_lab()
    for item in files:
        out(deployed, item.host, f"rm -f {item.path}")
    started = time.monotonic()
    short_deploy = run_mesh("deploy", str(short), timeout=DEPLOY_TIMEOUT)
    print(f"deploy with mesh_cert_ttl {SHORT_TTL}: {time.monotonic() - started:.1f} s")
    assert short_deploy.code == 0, str(short_deploy)
    # the controllers would renew every leaf at half its lifetime: this test is about a fleet nobody renews
    for host in CONTROLLERS:
        out(deployed, host, "systemctl stop mesh-controller.service")
    try:
        _expiry_is_reported(deployed, short, files)
    finally:
        for host in CONTROLLERS:
            out(deployed, host, "systemctl start mesh-controller.service")

    started = time.monotonic()
    renewed = deploy_normal()
    print(f"redeploy with the normal ttl: {time.monotonic() - started:.1f} s")
    assert renewed.code == 0, str(renewed)
    again = _ca_check_from_env()
    assert again.code == 0, str(again)


def _expiry_is_reported(deployed: LabUp, short: Path, files: list[Any]) -> None:
    """`mesh ca check` and `mesh status` say so once every short leaf has under a third of its lifetime left."""
    fresh = run_mesh("ca", "check", str(short))
    assert fresh.code == 0, f"fresh {SHORT_TTL} certificates are not under a third yet:\n{fresh}"
    for item in files:
        assert any(line.split()[:3] == [item.host, item.name, item.path] for line in fresh.stdout.splitlines()), \
            f"no line for {item}:\n{fresh}"

    times = [_leaf_times(deployed, item.host, item.path) for item in files]
    crossings = [after - (after - validity_start(before, after)) * WARN_REMAINING for before, after in times]
    crossing = max(crossings)
    print(f"the first leaf crosses a third {(min(crossings) - datetime.now(UTC)).total_seconds():.0f} s after "
          "the fresh check")
    wait = (crossing - datetime.now(UTC)).total_seconds() + 5
    assert wait < MAX_WAIT_S, f"the short leaves cross a third only in {wait:.0f} s"
    print(f"waiting {wait:.0f} s for every leaf to have under a third of its lifetime left")
    time.sleep(max(wait, 0))

    low = run_mesh("ca", "check", "-i", str(short))
    assert low.code == 2, str(low)
    for item in files:
        assert any(line.split()[:3] == [item.host, item.name, item.path] and "under 1/3 left" in line
                   for line in low.stdout.splitlines()), f"{item} not reported under a third:\n{low}"
    status = run_mesh("status", str(short), timeout=300)
    assert status.code == 2, str(status)
    assert "lifetime left" in status.text and "health-checker" in status.text, str(status)


def _ca_check_from_env() -> Run:
    """`mesh ca check` with the inventory from $MESH_INVENTORY, as a cron job would run it."""
    previous = os.environ.get("MESH_INVENTORY")
    os.environ["MESH_INVENTORY"] = str(INVENTORY)
    try:
        return run_mesh("ca", "check")
    finally:
        if previous is None:
            del os.environ["MESH_INVENTORY"]
        else:
            os.environ["MESH_INVENTORY"] = previous
