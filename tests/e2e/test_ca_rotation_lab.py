"""End to end: a full root rotation of the lab's CA under traffic (issue 21), `mesh ca rotate start`, `switch`,
`finish`, while web on vm1 calls api (vm2 and the container host dock1), which calls db: zero failed requests.
Steps run out of order are refused (exit 5), a step is refused while a host lags the previous phase (exit 1),
and `mesh ca status` shows the phase and no laggard at the end.

The module holds the lab lock (shared_lab()); it uses the lab inventory's state dir and leaves the lab deployed,
with a working CA (the rotated one) and no rotation under way.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from deploy_helpers import INVENTORY, Run, out, run_mesh, sh, shared_lab
from lab_helpers import LabUp
from traffic_helpers import background_load

from mesh.config import paths
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.pki import CertificateAuthority, fingerprint
from mesh.pki.leaf import load_chain

STEP_TIMEOUT = 400.0
WEB = "http://127.0.0.1:8080/"  # the web app on vm1: it calls api through its Envoy, api calls db
LAGGING_HOST = "vm2"


def state_dir() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


def ca_run(*args: str) -> Run:
    return run_mesh("ca", *args, "-i", str(INVENTORY), timeout=STEP_TIMEOUT)


def step(name: str) -> Run:
    started = time.monotonic()
    done = ca_run("rotate", name)
    print(f"mesh ca rotate {name}: exit {done.code} in {time.monotonic() - started:.1f} s")
    return done


def roots_on(lab: LabUp, host: str, path: str) -> list[str]:
    return [fingerprint(cert) for cert in load_chain(out(lab, host, f"cat {shlex.quote(path)}").encode())]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    """The shared lab, deployed, with no rotation under way (one a failed run left is finished first, and again
    when the module ends, so the next module finds a lab with one root)."""
    asked = time.monotonic()
    with shared_lab() as up:
        print(f"the lab lock and `mesh lab up`: {time.monotonic() - asked:.1f} s")
        finish_rotation()
        started = time.monotonic()
        deployed = run_mesh("deploy", str(INVENTORY), timeout=STEP_TIMEOUT)
        assert deployed.code == 0, f"the lab's deploy failed:\n{deployed}"
        print(f"deploy before the rotation: {time.monotonic() - started:.1f} s")
        archived = archives()
        try:
            yield up
        finally:
            finish_rotation()
            # the old CA's keys this module archived: test_deploy_vms finds only the live CA's keys in the state dir
            for folder in archives() - archived:
                shutil.rmtree(folder)


def archives() -> set[Path]:
    folder = Path(state_dir()) / "ca" / "archive"
    return set(folder.iterdir()) if folder.is_dir() else set()


def finish_rotation() -> None:
    phase = CertificateAuthority.load(state_dir()).phase if _has_ca() else "idle"
    if phase != "idle":  # the phase reaches every host first, or the next step is refused
        run_mesh("deploy", str(INVENTORY), timeout=STEP_TIMEOUT)
    for name in {"start": ("switch", "finish"), "switch": ("finish",)}.get(phase, ()):
        done = step(name)
        assert done.code == 0, f"finishing the rotation left at {phase} failed:\n{done}"


def _has_ca() -> bool:
    try:
        CertificateAuthority.load(state_dir())
    except Exception:  # noqa: BLE001 - no CA yet: the deploy makes one
        return False
    return True


def test_a_root_rotation_under_traffic_fails_no_request(lab: LabUp) -> None:
    started = time.monotonic()
    old_root = CertificateAuthority.load(state_dir()).root_fingerprint
    before = ca_run("status")
    assert before.code == 0 and "CA rotation phase: idle" in before.stdout and "no laggard" in before.stdout, \
        str(before)
    for name in ("switch", "finish"):
        refused = step(name)
        assert refused.code == 5 and "no rotation is under way" in refused.stderr, str(refused)

    with background_load(lab, WEB, concurrency=4, pause=0.01) as during:
        begun = step("start")
        assert begun.code == 0, str(begun)
        ca = CertificateAuthority.load(state_dir())
        assert ca.phase == "start" and ca.bundle_fingerprints[0] == old_root and len(ca.bundle_fingerprints) == 2
        new_root = ca.bundle_fingerprints[1]
        assert set(roots_on(lab, "dock1", paths.proxy_ca_path("api-api-v2-1"))) == {old_root, new_root}
        for name, why in (("start", "at phase `start`"), ("finish", "at phase `start`")):
            refused = step(name)
            assert refused.code == 5 and why in refused.stderr, str(refused)

        # a host that lags the phase holds the next step back, naming the file
        record = paths.CA_PATH
        saved = out(lab, LAGGING_HOST, f"cat {record}")
        out(lab, LAGGING_HOST, f"cp -p {record} {record}.e2e && cat > {record}", input=ca.trusted[0].public_bytes(
            serialization.Encoding.PEM))
        try:
            held = step("switch")
            assert held.code == 1, str(held)
            assert f"{LAGGING_HOST} proxies {record}" in held.stderr and "nothing was changed" in held.stderr, \
                str(held)
            lagging = ca_run("status")
            assert lagging.code == 2 and f"lagging or unread: {LAGGING_HOST}" in lagging.stdout, str(lagging)
        finally:
            sh(lab, LAGGING_HOST, f"mv -f {record}.e2e {record}")
        assert out(lab, LAGGING_HOST, f"cat {record}") == saved

        switched = step("switch")
        assert switched.code == 0, str(switched)
        leaf = load_chain(out(lab, "vm2", f"cat {paths.cert_path('api-9090')}").encode())
        assert fingerprint(leaf[1]) == fingerprint(CertificateAuthority.load(state_dir()).intermediate)
        finished = step("finish")
        assert finished.code == 0, str(finished)
        archive = next(line.rsplit(" ", 1)[-1] for line in finished.stdout.splitlines()
                       if line.startswith("the old CA material is archived in "))
        assert stat.S_IMODE(os.stat(archive).st_mode) == 0o700
        assert {name: stat.S_IMODE(os.stat(os.path.join(archive, name)).st_mode) for name in os.listdir(archive)
                if name.endswith(".key")} == {"root.key": 0o600, "intermediate.key": 0o600,
                                              "controller-intermediate.key": 0o600}
        assert fingerprint(load_chain(Path(archive, "root.pem").read_bytes())[0]) == old_root

    load = during.load
    assert load is not None
    print(f"requests during the rotation: {load.answered}, statuses {load.data['status']}, errors {load.errors}, "
          f"chains {load.chains}")
    assert load.answered >= 500, load.brief()
    assert load.all_ok(), f"failed requests during the rotation: {load.brief()}"
    assert any("api/vm2" in chain and "db/" in chain for chain in load.chains), load.brief()
    assert any("api/api-v2-1" in chain and "db/" in chain for chain in load.chains), load.brief()

    after = ca_run("status")
    assert after.code == 0, str(after)
    assert "CA rotation phase: idle" in after.stdout and "no laggard" in after.stdout, str(after)
    assert new_root in after.stdout and old_root not in after.stdout, str(after)
    assert roots_on(lab, "vm1", paths.proxy_ca_path("web-8080")) == [new_root]
    assert CertificateAuthority.load(state_dir()).root_fingerprint == new_root
    print(f"the rotation test took {time.monotonic() - started:.1f} s")
