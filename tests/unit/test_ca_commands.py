"""`mesh ca init`, `mesh ca show` and `mesh ca check` through the CLI: where the CA goes (inventory or options),
created once, the table of root, intermediate and leaves with their state, the warning for a root key git would
track, every certificate of a fake fleet judged with its exit code, and the exit codes of bad usage."""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_samples import FLEET_INVENTORY

from mesh.ca_commands import check_fleet, remaining_text
from mesh.cli import run
from mesh.config.paths import CA_PATH, cert_path
from mesh.deploy.hostcerts import CHECKER_CA_PATH, CHECKER_CERT_PATH
from mesh.pki import CertificateAuthority
from mesh.testing.fake_connector import FakeFleet

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://10.77.0.2:8500
    mesh_state_dir: state
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.77.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.77.0.11
          mesh_workloads:
            - {service: web, port: 8080}
"""


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    """The CLI binds structlog to the stderr of the moment, which pytest closes after the test: unbind it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def write_inventory(folder: Path, text: str = INVENTORY) -> Path:
    path = folder / "inventory.yml"
    path.write_text(textwrap.dedent(text))
    return path


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_init_twice_creates_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path)
    assert run(["ca", "init", str(inventory)]) == 0
    first = capsys.readouterr().out
    assert run(["ca", "init", str(inventory)]) == 0
    second = capsys.readouterr().out
    ca_dir = tmp_path / "state" / "ca"
    assert first.startswith(f"created mesh CA in {ca_dir} (trust domain lab.mesh)")
    assert second.startswith(f"found existing mesh CA in {ca_dir}")
    openssl = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                              str(ca_dir / "root.pem")], capture_output=True, text=True, check=True)
    expected = openssl.stdout.strip().split("=", 1)[1]
    assert f"root SHA-256 fingerprint: {expected}" in first and expected in second
    assert "PRIVATE" not in first + second


def test_init_without_inventory_uses_options_or_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["ca", "init", "--state-dir", str(tmp_path / "s"), "--trust-domain", "corp.mesh"]) == 0
    assert CertificateAuthority.load(str(tmp_path / "s")).trust_domain == "corp.mesh"
    monkeypatch.chdir(tmp_path)
    assert run(["ca", "init"]) == 0
    assert CertificateAuthority.load(str(tmp_path / ".mesh")).trust_domain == "mesh.local"
    assert "(trust domain mesh.local)" in capsys.readouterr().out


def test_init_refuses_another_trust_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path)
    assert run(["ca", "init", "--state-dir", str(tmp_path / "state"), "--trust-domain", "other.mesh"]) == 0
    assert run(["ca", "init", str(inventory)]) == 1
    assert "belongs to trust domain 'other.mesh', not 'lab.mesh'" in capsys.readouterr().err


def test_bad_usage_exits_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path)
    assert run(["ca", "init", str(inventory), "--state-dir", str(tmp_path)]) == 5
    assert "not both" in capsys.readouterr().err
    assert run(["ca", "init", "--state-dir", str(tmp_path), "--trust-domain", "Not Valid"]) == 5
    assert "--trust-domain" in capsys.readouterr().err
    assert run(["ca", "init", "--no-such-option"]) == 5


def test_broken_inventory_exits_4(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, INVENTORY.replace("mesh_state_dir", "mesh_state_dri"))
    assert run(["ca", "init", str(inventory)]) == 4
    assert not (tmp_path / "state").exists()


def test_show_without_ca_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ca", "show", "--state-dir", str(tmp_path)]) == 1
    assert "no mesh CA" in capsys.readouterr().err


def _row(out: str, needle: str) -> str:
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out
    return lines[0]


def test_show_lists_root_intermediate_and_leaves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(tmp_path)
    authority, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    now = datetime.now(UTC)
    web = "spiffe://lab.mesh/svc/web"
    authority.sign(csr(), web, timedelta(hours=1), "vm1", "expired-0", now=now - timedelta(days=2))
    authority.sign(csr(), web, timedelta(hours=10), "vm1", "late-0", now=now - timedelta(hours=8))
    old = authority.sign(csr(), web, timedelta(hours=24), "vm2", "web-0", now=now - timedelta(hours=1))
    fresh = authority.sign(csr(), web, timedelta(hours=24), "vm2", "web-0")
    capsys.readouterr()
    assert run(["ca", "show", str(inventory)]) == 0
    out = capsys.readouterr().out
    assert "trust domain lab.mesh" in out
    assert re.search(r"root\s.*mesh root CA lab\.mesh.*\s3649d 2\dh\s.*ok", _row(out, "mesh root CA"))
    assert re.search(r"intermediate.*\s182[56]d \d+h\s.*ok", _row(out, "mesh intermediate CA"))
    assert "EXPIRED" in _row(out, "expired-0") and " - " in _row(out, "expired-0")
    assert "UNDER 1/3 LEFT" in _row(out, "late-0")
    assert "superseded" in _row(out, old.serial)
    fresh_row = _row(out, fresh.serial)
    assert re.search(r"spiffe://lab\.mesh/svc/web .*2[34]h \d+m .*ok", fresh_row)
    assert fresh.not_after.strftime("%Y-%m-%d %H:%M") in fresh_row
    assert "PRIVATE" not in out and "BEGIN" not in out


def test_remaining_text() -> None:
    assert remaining_text(timedelta(days=3, hours=4, minutes=5)) == "3d 4h"
    assert remaining_text(timedelta(hours=4, minutes=5)) == "4h 5m"
    assert remaining_text(timedelta(minutes=5, seconds=9)) == "5m"
    assert remaining_text(timedelta(seconds=-1)) == "-"


# ---- the root key and git ----------------------------------------------------------------------------------

def _git_repo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    return folder


def test_show_warns_when_the_root_key_is_in_a_git_work_tree_and_not_ignored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = _git_repo(tmp_path / "repo")
    assert run(["ca", "init", "--state-dir", str(repo / "state")]) == 0
    capsys.readouterr()
    assert run(["ca", "show", "--state-dir", str(repo / "state")]) == 0
    assert "WARNING" not in capsys.readouterr().err  # the .gitignore made with the CA covers the keys
    (repo / "state" / ".gitignore").unlink()
    assert run(["ca", "show", "--state-dir", str(repo / "state")]) == 0
    err = capsys.readouterr().err
    assert "[WARNING]: the root key" in err and str(repo / "state" / "ca" / "root.key") in err
    assert "/ca/*.key" in err


def test_show_does_not_warn_outside_git(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ca", "init", "--state-dir", str(tmp_path / "state")]) == 0
    assert run(["ca", "show", "--state-dir", str(tmp_path / "state")]) == 0
    assert "WARNING" not in capsys.readouterr().err


# ---- mesh ca check -----------------------------------------------------------------------------------------

CHECK_INVENTORY = FLEET_INVENTORY  # every kind of managed host


def _fleet(authority: CertificateAuthority, now: datetime, api_issued: timedelta,
           checker: bool = True) -> FakeFleet:
    """vm1's web-8080 fresh, dock1's api-api-1 issued api_issued ago (24 h), ctl1's checker fresh (or missing)."""
    fleet = FakeFleet()
    ttl = timedelta(hours=24)
    web = authority.sign(csr(), "spiffe://lab.mesh/svc/web", ttl, "vm1", "web-8080", now=now)
    api = authority.sign(csr(), "spiffe://lab.mesh/svc/api", ttl, "dock1", "api-api-1", now=now - api_issued)
    fleet.host("vm1").write(cert_path("web-8080"), web.chain_pem)
    fleet.host("dock1").write(cert_path("api-api-1"), api.chain_pem)
    for host in ("vm1", "dock1"):
        fleet.host(host).write(CA_PATH, authority.root_pem)
    fleet.host("ctl1").write(CHECKER_CA_PATH, authority.root_pem)
    if checker:
        health = authority.sign(csr(), "spiffe://lab.mesh/mesh/health", ttl, "ctl1", "health-checker", now=now)
        fleet.host("ctl1").write(CHECKER_CERT_PATH, health.chain_pem)
    return fleet


def test_ca_check_reads_every_certificate_of_every_managed_host(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, CHECK_INVENTORY)
    authority, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    now = datetime.now(UTC)
    certs, code = check_fleet(str(inventory), _fleet(authority, now, timedelta(hours=1)).connect, now)
    assert code == 0
    assert [(c.host, c.name, c.path) for c in certs] == [
        ("ctl1", "trust bundle (health-checker)", CHECKER_CA_PATH),
        ("ctl1", "health-checker", CHECKER_CERT_PATH),
        ("vm1", "trust bundle (proxies)", CA_PATH),
        ("vm1", "web-8080", cert_path("web-8080")),
        ("dock1", "trust bundle (proxies)", CA_PATH),
        ("dock1", "api-api-1", cert_path("api-api-1")),
    ]
    line = certs[3].line((5, 6, 40))
    assert re.search(rf"^vm1\s+web-8080\s+{re.escape(cert_path('web-8080'))}\s+ok\s+expires .* 2[34]h \d+m left "
                     r"\(\d+%\)$", line), line


def test_ca_check_exits_2_under_a_third_left_or_missing(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, CHECK_INVENTORY)
    authority, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    now = datetime.now(UTC)
    # 24 h leaves are backdated 5 minutes: 15 h after issuance about 37% is left, 17 h after about 29%
    certs, code = check_fleet(str(inventory), _fleet(authority, now, timedelta(hours=15)).connect, now)
    assert code == 0 and all(c.state == "ok" for c in certs)
    certs, code = check_fleet(str(inventory), _fleet(authority, now, timedelta(hours=17)).connect, now)
    assert code == 2 and [c.name for c in certs if c.state != "ok"] == ["api-api-1"]
    assert certs[-1].state == "under 1/3 left"
    certs, code = check_fleet(str(inventory), _fleet(authority, now, timedelta(hours=25)).connect, now)
    assert code == 2 and certs[-1].state == "EXPIRED"
    certs, code = check_fleet(str(inventory), _fleet(authority, now, timedelta(0), checker=False).connect, now)
    assert code == 2 and [(c.name, c.state) for c in certs if c.state != "ok"] == [("health-checker", "missing")]


def test_ca_check_exits_3_when_a_host_is_unreachable(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, CHECK_INVENTORY)
    authority, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    now = datetime.now(UTC)
    fleet = _fleet(authority, now, timedelta(hours=20))
    fleet.host("ctl1").unreachable = "timed out"
    certs, code = check_fleet(str(inventory), fleet.connect, now)
    assert code == 3
    assert certs[0].state == "UNREACHABLE" and "timed out" in certs[0].line((4, 4, 4))


def test_ca_check_takes_the_inventory_as_argument_option_or_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    assert run(["ca", "check"]) == 5
    assert "no inventory" in capsys.readouterr().err
    assert run(["ca", "check", "a.yml", "-i", "b.yml"]) == 5
    broken = write_inventory(tmp_path, INVENTORY.replace("mesh_state_dir", "mesh_state_dri"))
    monkeypatch.setenv("MESH_INVENTORY", str(broken))
    assert run(["ca", "check"]) == 4  # read from the environment, refused before any host is reached
    assert run(["ca", "check", "-i", str(broken)]) == 4
