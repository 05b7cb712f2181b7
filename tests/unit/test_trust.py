"""The CA preflight of `mesh deploy` (mesh/deploy/trust.py) on fake hosts: the verdict of each combination of
host bundles and state dir, the refusal's message, exit codes 1 and 3, and that a refused deploy makes no CA
and sends nothing to any host but the reads."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from fleet_samples import FLEET_INVENTORY as INVENTORY

from mesh.cli import run
from mesh.config import paths
from mesh.deploy.command import DeployOptions, deploy
from mesh.deploy.hostcerts import CHECKER_CA_PATH, HostFiles
from mesh.deploy.trust import (
    UNREADABLE,
    TrustRefused,
    TrustUnread,
    bundle_roots,
    judge,
    refusal,
    trusted_ca,
)
from mesh.errors import EXIT_ERROR, EXIT_UNREACHABLE, UsageError
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.pki import CertificateAuthority
from mesh.testing.fake_connector import FakeFleet

TD = "lab.mesh"


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def ca_a(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.ensure(str(tmp_path_factory.mktemp("a")), TD)[0]


@pytest.fixture(scope="module")
def ca_b(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.ensure(str(tmp_path_factory.mktemp("b")), TD)[0]


def seen(host: str, **files: bytes | None) -> HostFiles:
    return HostFiles(host, {f"/etc/mesh/{name}.pem": data for name, data in files.items()})


# ---- the pure verdict --------------------------------------------------------------------------------------

def test_hosts_trusting_the_state_dirs_root_or_nothing_yet_pass(ca_a: CertificateAuthority) -> None:
    verdict = judge(ca_a.root_fingerprint, [seen("vm1", ca=ca_a.root_pem), seen("vm2"), seen("vm3", ca=None)])
    assert verdict.ok
    assert verdict.trusting == ("vm1",) and verdict.fresh == ("vm2", "vm3")


def test_another_root_is_foreign_with_its_fingerprint(ca_a: CertificateAuthority,
                                                     ca_b: CertificateAuthority) -> None:
    verdict = judge(ca_a.root_fingerprint, [seen("vm1", ca=ca_a.root_pem), seen("vm2", ca=ca_b.root_pem)])
    assert not verdict.ok
    assert verdict.foreign_hosts == ("vm2",)
    assert verdict.foreign[0].roots == (ca_b.root_fingerprint,)


def test_any_bundle_is_foreign_when_the_state_dir_has_no_ca(ca_a: CertificateAuthority) -> None:
    verdict = judge(None, [seen("vm1", ca=ca_a.root_pem), seen("vm2")])
    assert verdict.foreign_hosts == ("vm1",) and verdict.fresh == ("vm2",)


def test_a_bundle_with_an_extra_root_or_no_certificate_is_foreign(ca_a: CertificateAuthority,
                                                                  ca_b: CertificateAuthority) -> None:
    both = judge(ca_a.root_fingerprint, [seen("vm1", ca=ca_a.root_pem + ca_b.root_pem)])
    assert both.foreign[0].roots == (ca_a.root_fingerprint, ca_b.root_fingerprint)
    garbage = judge(ca_a.root_fingerprint, [seen("vm1", ca=b"not a certificate\n")])
    assert garbage.foreign[0].roots == (UNREADABLE,)
    unread = judge(ca_a.root_fingerprint, [HostFiles("vm1", {}, {"/etc/mesh/ca.pem": "Permission denied"})])
    assert unread.foreign[0].error == "Permission denied"


def test_each_bundle_of_a_host_counts(ca_a: CertificateAuthority, ca_b: CertificateAuthority) -> None:
    """A controller with workloads holds two bundles; one foreign is enough."""
    verdict = judge(ca_a.root_fingerprint, [seen("ctl1", ca=ca_a.root_pem, checker=ca_b.root_pem)])
    assert [item.path for item in verdict.foreign] == ["/etc/mesh/checker.pem"]


def test_unreachable_hosts_are_their_own_verdict(ca_a: CertificateAuthority) -> None:
    verdict = judge(ca_a.root_fingerprint, [HostFiles("vm1", unreachable="timed out"), seen("vm2")])
    assert not verdict.ok and verdict.unreachable == (("vm1", "timed out"),) and not verdict.foreign


def test_bundle_roots_reads_every_certificate(ca_a: CertificateAuthority, ca_b: CertificateAuthority) -> None:
    assert bundle_roots(ca_a.root_pem + ca_b.root_pem) == (ca_a.root_fingerprint, ca_b.root_fingerprint)
    assert bundle_roots(b"") == ()


def test_the_refusal_names_hosts_fingerprints_and_the_way_out(ca_a: CertificateAuthority,
                                                              ca_b: CertificateAuthority) -> None:
    verdict = judge(ca_a.root_fingerprint, [seen("vm1", ca=ca_b.root_pem), seen("vm2", ca=ca_b.root_pem)])
    error = refusal(verdict, "/srv/mesh-state")
    text = str(error)
    assert error.exit_code == EXIT_ERROR
    assert "vm1, vm2" in text and text.count(ca_b.root_fingerprint) == 2
    assert f"state dir /srv/mesh-state: root {ca_a.root_fingerprint}" in text
    assert "point mesh_state_dir at the CA" in text and "mesh ca init" in text and "--replace-ca" in text
    empty = str(refusal(judge(None, [seen("vm1", ca=ca_b.root_pem)]), "/srv/new"))
    assert "no CA in the state dir" in empty and ca_b.root_fingerprint in empty


# ---- gathering, then the CA ---------------------------------------------------------------------------------

def _mesh(tmp_path: Path) -> tuple[Mesh, str]:
    path = tmp_path / "inventory.yml"
    path.write_text(textwrap.dedent(INVENTORY))
    return check_inventory(load_inventory(str(path)), str(path)).mesh, str(path)


def test_every_managed_host_is_read_and_nothing_else_is_sent(tmp_path: Path, ca_b: CertificateAuthority) -> None:
    mesh, _ = _mesh(tmp_path)
    fleet = FakeFleet()
    fleet.host("vm1").write(paths.CA_PATH, ca_b.root_pem)
    with pytest.raises(TrustRefused):
        trusted_ca(mesh, fleet.connect)
    assert sorted(fleet.hosts) == ["ctl1", "dock1", "vm1"]  # consul1 is not managed
    assert all(host.puts == [] for host in fleet.hosts.values())
    assert all(host.commands == [] for host in fleet.hosts.values())  # the fake's get() is the only call
    assert not (tmp_path / "state").exists()


def test_the_ca_is_made_only_when_no_host_trusts_another_root(tmp_path: Path, ca_a: CertificateAuthority) -> None:
    mesh, _ = _mesh(tmp_path)
    fleet = FakeFleet()
    ca, created = trusted_ca(mesh, fleet.connect)  # no host deployed yet
    assert created and ca.ca_dir == str(tmp_path / "state" / "ca")
    fleet.host("ctl1").write(CHECKER_CA_PATH, ca.root_pem)
    again, created = trusted_ca(mesh, fleet.connect)
    assert not created and again.root_fingerprint == ca.root_fingerprint


def test_replace_ca_needs_a_ca_made_on_purpose(tmp_path: Path, ca_b: CertificateAuthority) -> None:
    mesh, _ = _mesh(tmp_path)
    fleet = FakeFleet()
    fleet.host("dock1").write(paths.CA_PATH, ca_b.root_pem)
    with pytest.raises(TrustRefused, match="never makes one"):
        trusted_ca(mesh, fleet.connect, replace=True)
    assert not (tmp_path / "state").exists()
    made, _ = CertificateAuthority.ensure(str(tmp_path / "state"), TD)  # `mesh ca init`
    warnings: list[str] = []
    ca, created = trusted_ca(mesh, fleet.connect, replace=True, warn=warnings.append)
    assert not created and ca.root_fingerprint == made.root_fingerprint
    assert warnings and "dock1" in warnings[0]


def test_deploy_refuses_before_making_a_ca_and_in_check_mode_too(tmp_path: Path,
                                                                 ca_b: CertificateAuthority) -> None:
    _, inventory = _mesh(tmp_path)
    for check in (False, True):
        fleet = FakeFleet()
        fleet.host("ctl1").write(CHECKER_CA_PATH, ca_b.root_pem)
        output = io.StringIO()
        with pytest.raises(TrustRefused) as refused:
            deploy(inventory, DeployOptions(check=check), output=output, connector_factory=fleet.connect)
        assert "ctl1" in str(refused.value) and ca_b.root_fingerprint in str(refused.value)
        assert not (tmp_path / "state").exists(), "a CA (or a cache) was made for a refused deploy"
        assert all(host.puts == [] for host in fleet.hosts.values())
        assert "PLAY" not in output.getvalue()


def test_deploy_stops_with_exit_3_when_a_host_cannot_be_read(tmp_path: Path) -> None:
    _, inventory = _mesh(tmp_path)
    fleet = FakeFleet()
    fleet.host("dock1").unreachable = "connection refused"
    with pytest.raises(TrustUnread) as unread:
        deploy(inventory, DeployOptions(limit="vm1"), output=io.StringIO(), connector_factory=fleet.connect)
    assert unread.value.exit_code == EXIT_UNREACHABLE
    assert "dock1: connection refused" in str(unread.value) and "whatever --limit says" in str(unread.value)
    assert not (tmp_path / "state").exists()


def test_replace_ca_with_limit_is_a_usage_error(tmp_path: Path) -> None:
    _, inventory = _mesh(tmp_path)
    with pytest.raises(UsageError):
        deploy(inventory, DeployOptions(limit="vm1", replace_ca=True), output=io.StringIO(),
               connector_factory=FakeFleet().connect)


def test_an_inventory_without_mesh_hosts_makes_no_ca(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text("all:\n  vars: {mesh_state_dir: state}\n  hosts:\n    consul1: {ansible_host: 10.0.0.2}\n")
    fleet = FakeFleet()
    output = io.StringIO()
    deploy(str(path), output=output, connector_factory=fleet.connect)
    assert "no CA made" in output.getvalue()
    assert not (tmp_path / "state").exists() and fleet.hosts == {}


def test_the_cli_exits_3_for_a_host_it_cannot_reach_before_any_change(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real SSH connector: a closed port on this machine."""
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "inventory.yml"
    path.write_text(textwrap.dedent(f"""\
        all:
          vars: {{mesh_consul_url: "http://127.0.0.1:1", mesh_state_dir: state,
                  mesh_known_hosts: "{tmp_path / 'known_hosts'}"}}
          children:
            mesh_controllers:
              hosts:
                ctl1: {{ansible_host: 127.0.0.1, ansible_port: 1}}
        """))
    assert run(["deploy", str(path)]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "cannot read the trust bundle of ctl1 before deploying; nothing was changed" in err
    assert not (tmp_path / "state").exists()


def test_check_mode_makes_no_ca_and_says_a_deploy_would(tmp_path: Path) -> None:
    _, inventory = _mesh(tmp_path)
    fleet = FakeFleet()
    output = io.StringIO()
    deploy(inventory, DeployOptions(check=True, limit="vm1"), output=output, connector_factory=fleet.connect)
    assert "a deploy would make one" in output.getvalue() and "PLAY RECAP" in output.getvalue()
    assert not (tmp_path / "state" / "ca").exists(), "check mode made a CA"
    assert all(host.puts == [] for host in fleet.hosts.values())
