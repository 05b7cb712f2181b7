"""CA rotation in phases (mesh/pki/phases.py, the CA at each phase, mesh/ca_rotation.py on fake hosts): the order
of steps, the bundle and the signer of each phase, leaves chaining to the right root, the archive and file modes,
and a step refused while a host lags the previous phase."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_samples import FLEET_INVENTORY

from mesh.ca_rotation import (
    RotationRefused,
    RotationUnread,
    phase_target,
    read_fleet,
    rotate,
    status,
    watched_files,
)
from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from mesh.hosts.connection import Connector
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh
from mesh.pki import CertificateAuthority, chains_to, fingerprint
from mesh.pki.phases import OutOfOrder, begin, finish, read_phase, switch
from mesh.testing.fake_connector import FakeFleet

TD = "lab.mesh"


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def csr_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def leaf(ca: CertificateAuthority, name: str = "web") -> bytes:
    return ca.sign(csr_pem(), f"spiffe://{TD}/svc/{name}", timedelta(hours=1), "vm1", name).chain_pem


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def state(tmp_path: Path) -> str:
    CertificateAuthority.ensure(str(tmp_path / "state"), TD)
    return str(tmp_path / "state")


# ---- the phases on disk ------------------------------------------------------------------------------------

def test_steps_out_of_order_are_refused_with_exit_5_and_change_nothing(state: str) -> None:
    ca_dir = os.path.join(state, "ca")
    for step in (switch, finish):
        with pytest.raises(OutOfOrder, match="no rotation is under way; the next step is `mesh ca rotate start`"):
            step(ca_dir)
    assert OutOfOrder("x").exit_code == EXIT_USAGE
    begin(ca_dir, TD, None)
    with pytest.raises(OutOfOrder, match="at phase `start`; the next step is `mesh ca rotate switch`"):
        begin(ca_dir, TD, None)
    with pytest.raises(OutOfOrder, match="at phase `start`"):
        finish(ca_dir)
    switch(ca_dir)
    with pytest.raises(OutOfOrder, match="at phase `switch`; the next step is `mesh ca rotate finish`"):
        switch(ca_dir)
    assert read_phase(ca_dir) == "switch"


def test_each_phase_has_its_bundle_and_signer_and_leaves_chain_to_its_root(state: str) -> None:
    ca_dir = os.path.join(state, "ca")
    idle = CertificateAuthority.load(state)
    old_root, old_leaf, old_issuer = idle.root_pem, leaf(idle), idle.controller_issuer(create=True)
    assert idle.phase == "idle" and idle.bundle_pem == old_root

    begin(ca_dir, TD, None)
    started = CertificateAuthority.load(state)
    upcoming = started.next_material()
    assert upcoming is not None
    new_root = pem(upcoming.root)
    assert started.phase == "start" and started.bundle_pem == old_root + new_root
    assert started.root_pem == old_root  # the current intermediate still signs
    assert chains_to(leaf(started), old_root) and not started.needs_renewal(old_leaf)
    start_issuer = started.controller_issuer(create=False)
    assert start_issuer is not None and start_issuer == old_issuer

    switch(ca_dir)
    switched = CertificateAuthority.load(state)
    assert switched.bundle_pem == old_root + new_root and switched.root_pem == new_root
    new_leaf = leaf(switched)
    assert chains_to(new_leaf, new_root) and not chains_to(new_leaf, old_root)
    assert switched.needs_renewal(old_leaf), "switch re-issues every leaf of the old intermediate"
    assert not switched.needs_renewal(new_leaf)
    issuer = switched.controller_issuer(create=False)
    assert issuer is not None and issuer != start_issuer and chains_to(issuer.cert_pem, new_root)

    archive = finish(ca_dir)
    done = CertificateAuthority.load(state)
    assert done.phase == "idle" and done.bundle_pem == new_root and done.root_pem == new_root
    assert not done.needs_renewal(new_leaf) and done.controller_issuer(create=False) == issuer
    assert [fingerprint(root) for root in done.archived_roots()] == [fingerprint(idle.root)]
    assert (Path(archive) / "root.pem").read_bytes() == old_root
    assert not os.path.exists(os.path.join(ca_dir, "next")) and not os.path.exists(os.path.join(ca_dir, "rotation.json"))


def test_keys_are_0600_in_0700_folders_through_a_rotation(state: str) -> None:
    ca_dir = Path(state, "ca")
    CertificateAuthority.load(state).controller_issuer(create=True)
    begin(str(ca_dir), TD, None)
    assert mode(ca_dir / "next") == 0o700
    for key in ("root.key", "intermediate.key", "controller-intermediate.key"):
        assert mode(ca_dir / "next" / key) == 0o600
    switch(str(ca_dir))
    archive = Path(finish(str(ca_dir)))
    assert mode(archive) == 0o700 and mode(archive.parent) == 0o700 and mode(ca_dir) == 0o700
    assert sorted(p.name for p in archive.iterdir() if p.name.endswith(".key")) == [
        "controller-intermediate.key", "intermediate.key", "root.key"]
    for key in [*archive.glob("*.key"), *ca_dir.glob("*.key")]:
        assert mode(key) == 0o600, key


def test_an_interrupted_finish_completes_when_run_again(state: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ca_dir = os.path.join(state, "ca")
    begin(ca_dir, TD, None)
    switch(ca_dir)
    new_root = CertificateAuthority.load(state).root_pem
    real = os.replace
    calls = []

    def failing(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 4:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        finish(ca_dir)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(Exception, match="was interrupted"):
        CertificateAuthority.load(state)
    finish(ca_dir)
    done = CertificateAuthority.load(state)
    assert done.phase == "idle" and done.bundle_pem == new_root


# ---- the fleet against the phase (fake hosts) ---------------------------------------------------------------

class FakeDeploy:
    """Stands in for `mesh deploy`: writes the phase's bundle, the controllers' intermediate, and leaves signed
    by the phase's CA (re-issued when the CA says so) on every host but `skip`."""

    def __init__(self, fleet: FakeFleet, mesh: Mesh, state_dir: str) -> None:
        self.fleet, self.mesh, self.state_dir = fleet, mesh, state_dir
        self.skip: set[str] = set()
        self.runs = 0

    def __call__(self, inventory: str, factory: Callable[[ManagedHost], Connector]) -> int:
        self.runs += 1
        ca, _ = CertificateAuthority.ensure(self.state_dir, TD)
        for host in self.mesh.hosts:
            if host.name not in self.skip:
                self.push(host, ca)
        return EXIT_OK

    def push(self, host: ManagedHost, ca: CertificateAuthority) -> None:
        fake = self.fleet.host(host.name)
        issuer = ca.controller_issuer(create=True)
        assert issuer is not None
        for item in watched_files(host):
            if item.kind == "bundle":
                fake.write(item.path, ca.bundle_pem)
            elif item.kind == "issuer":
                fake.write(item.path, issuer.cert_pem)
            else:
                found = fake.files.get(item.path)
                if found is None or found.data is None or ca.needs_renewal(found.data):
                    fake.write(item.path, leaf(ca, "health" if item.name == "health-checker" else "web"))


@pytest.fixture
def fleet_setup(tmp_path: Path) -> tuple[str, Mesh, FakeFleet, FakeDeploy]:
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(FLEET_INVENTORY)
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    fleet = FakeFleet()
    deploy = FakeDeploy(fleet, mesh, mesh.settings.state_dir)
    deploy(str(inventory), fleet.connect)
    return str(inventory), mesh, fleet, deploy


def test_a_full_rotation_on_fake_hosts_reaches_every_file(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                          ) -> None:
    inventory, mesh, fleet, deploy = fleet_setup
    old = CertificateAuthority.load(mesh.settings.state_dir)
    for step in ("start", "switch", "finish"):
        out = io.StringIO()
        assert rotate(inventory, step, fleet.connect, deploy, out) == EXIT_OK, out.getvalue()
        assert "no laggard" in out.getvalue()
    done = CertificateAuthority.load(mesh.settings.state_dir)
    assert done.root_fingerprint != old.root_fingerprint and deploy.runs == 4
    fleet_now = read_fleet(mesh, done, fleet.connect)
    assert fleet_now.exit_code == EXIT_OK and len(fleet_now.files) == 10
    vm1 = fleet.host("vm1").files["/etc/mesh/proxies/web-8080/tls/cert.pem"].data
    assert vm1 is not None and chains_to(vm1, done.root_pem) and not chains_to(vm1, old.root_pem)


def test_a_step_is_refused_while_a_host_lags_the_phase(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                       ) -> None:
    inventory, mesh, fleet, deploy = fleet_setup
    deploy.skip = {"dock1"}
    out = io.StringIO()
    assert rotate(inventory, "start", fleet.connect, deploy, out) == EXIT_HOST_FAILED
    assert "lagging or unread: dock1" in out.getvalue()
    with pytest.raises(RotationRefused) as refused:
        rotate(inventory, "switch", fleet.connect, deploy, io.StringIO())
    assert refused.value.exit_code == EXIT_ERROR
    assert "dock1 proxies /etc/mesh/ca.pem: roots" in refused.value.message
    assert "dock1 api-api-1 /etc/mesh/proxies/api-api-1/ca.pem" in refused.value.message
    assert "vm1" not in refused.value.message and "mesh deploy" in str(refused.value)
    assert CertificateAuthority.load(mesh.settings.state_dir).phase == "start", "nothing changed"
    text = io.StringIO()
    assert status(inventory, fleet.connect, text) == EXIT_HOST_FAILED
    assert "CA rotation phase: start (next: mesh ca rotate switch)" in text.getvalue()
    deploy.skip = set()
    deploy(inventory, fleet.connect)
    assert rotate(inventory, "switch", fleet.connect, deploy, io.StringIO()) == EXIT_OK


def test_a_leaf_of_the_old_intermediate_lags_the_switch(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                        ) -> None:
    inventory, _, fleet, deploy = fleet_setup
    assert rotate(inventory, "start", fleet.connect, deploy, io.StringIO()) == EXIT_OK
    old_leaf = fleet.host("ctl1").files["/etc/mesh/checker/tls/cert.pem"].data
    assert rotate(inventory, "switch", fleet.connect, deploy, io.StringIO()) == EXIT_OK
    assert old_leaf is not None
    fleet.host("ctl1").write("/etc/mesh/checker/tls/cert.pem", old_leaf)
    with pytest.raises(RotationRefused, match="ctl1 health-checker /etc/mesh/checker/tls/cert.pem: leaf from .*, not "
                                               "this phase's intermediates"):
        rotate(inventory, "finish", fleet.connect, deploy, io.StringIO())


def test_an_unreachable_host_refuses_a_step_with_exit_3(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                        ) -> None:
    inventory, mesh, fleet, deploy = fleet_setup
    fleet.host("vm1").unreachable = "timed out"
    with pytest.raises(RotationUnread, match="cannot read vm1 \\(timed out\\)") as refused:
        rotate(inventory, "start", fleet.connect, deploy, io.StringIO())
    assert refused.value.exit_code == EXIT_UNREACHABLE and deploy.runs == 1
    assert CertificateAuthority.load(mesh.settings.state_dir).phase == "idle"
    assert status(inventory, fleet.connect, io.StringIO()) == EXIT_UNREACHABLE


def test_the_phase_target_names_the_controllers_intermediate(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                             ) -> None:
    _, mesh, _, _ = fleet_setup
    ca = CertificateAuthority.load(mesh.settings.state_dir)
    issuer = ca.controller_issuer(create=False)
    assert issuer is not None
    target = phase_target(ca)
    assert target.controller_issuer == fingerprint(issuer.cert) and target.bundle == {ca.root_fingerprint}


def test_the_cli_refuses_a_step_out_of_order_with_exit_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(FLEET_INVENTORY)
    CertificateAuthority.ensure(str(tmp_path / "state"), TD)
    assert run(["ca", "rotate", "finish", "-i", str(inventory)]) == EXIT_USAGE
    assert "no rotation is under way" in capsys.readouterr().err


def test_switch_and_finish_take_no_intermediate(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]) -> None:
    from mesh.ca_rotation import GivenFiles
    from mesh.errors import UsageError

    inventory, _, fleet, deploy = fleet_setup
    assert rotate(inventory, "start", fleet.connect, deploy, io.StringIO()) == EXIT_OK
    with pytest.raises(UsageError, match="--intermediate is given to `mesh ca rotate start` only"):
        rotate(inventory, "switch", fleet.connect, deploy, io.StringIO(), GivenFiles("a", "b"))


def test_a_deploy_during_and_after_a_rotation_trusts_the_state_dirs_roots(state: str) -> None:
    from mesh.deploy.hostcerts import HostFiles
    from mesh.deploy.trust import judge, lineage

    ca_dir = os.path.join(state, "ca")
    old = CertificateAuthority.load(state)
    stranger = CertificateAuthority.ensure(os.path.join(state, "..", "other"), TD)[0]
    begin(ca_dir, TD, None)
    started = CertificateAuthority.load(state)
    both = started.bundle_pem

    def verdict(*bundles: bytes) -> tuple[str, ...]:
        ca = CertificateAuthority.load(state)
        rotation, archived = lineage(state)
        seen = [HostFiles(f"h{i}", {"/etc/mesh/ca.pem": data}) for i, data in enumerate(bundles)]
        return judge(ca.root_fingerprint, seen, rotation, archived).foreign_hosts

    assert verdict(old.root_pem, both) == ()  # not reached yet, and reached
    assert verdict(stranger.root_pem, old.root_pem + stranger.root_pem) == ("h0", "h1")
    switch(ca_dir)
    assert verdict(old.root_pem, both) == ()
    finish(ca_dir)
    done = CertificateAuthority.load(state)
    assert verdict(both, done.root_pem) == ()  # a host the finish has not reached yet is still ours
    assert verdict(old.root_pem, stranger.root_pem) == ("h0", "h1")  # only an archived root: foreign


def test_ca_show_names_a_rotation_under_way(state: str, capsys: pytest.CaptureFixture[str]) -> None:
    begin(os.path.join(state, "ca"), TD, None)
    ca = CertificateAuthority.load(state)
    assert run(["ca", "show", "--state-dir", state]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "rotation under way, phase start: the bundle trusts " + ", ".join(ca.bundle_fingerprints) in shown


def test_a_step_is_refused_while_a_deploy_holds_the_lock(fleet_setup: tuple[str, Mesh, FakeFleet, FakeDeploy]
                                                         ) -> None:
    from mesh.deploy.lock import DeployLocked, deploy_lock

    inventory, mesh, fleet, deploy = fleet_setup
    with deploy_lock(mesh, lambda _: None), pytest.raises(DeployLocked) as refused:
        rotate(inventory, "start", fleet.connect, deploy, io.StringIO())
    assert refused.value.exit_code == EXIT_ERROR and deploy.runs == 1
    assert CertificateAuthority.load(mesh.settings.state_dir).phase == "idle"
