"""`mesh ca check` lists the newest leaf issued to each proxy: the deploys' (the state dir's issued.json) and
the controllers' (their records in Consul KV, read here through a fake), with who issued it and its lifetime;
a Consul that cannot be read is a warning line, never a failure of the check."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fleet_samples import FLEET_INVENTORY

from mesh import ca_commands
from mesh.ca_commands import issued_lines, newest_leaves, parse_controller_records
from mesh.catalog import CatalogError
from mesh.cli import run
from mesh.controller.spec import issued_prefix
from mesh.inventory.model import Mesh
from mesh.pki import CertificateAuthority, IssuedRecord

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
PREFIX = issued_prefix("lab.mesh")


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def record(host: str, proxy: str, serial: str, issued_ago: timedelta, ttl: timedelta = timedelta(minutes=1),
           service: str = "web") -> IssuedRecord:
    issued_at = NOW - issued_ago
    return IssuedRecord(host=host, proxy=proxy, spiffe_id=f"spiffe://lab.mesh/svc/{service}", serial=serial,
                        not_before=issued_at - ttl / 10, not_after=issued_at + ttl, issued_at=issued_at)


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    """The sample fleet with a CA whose ledger holds the deploy's leaves of vm1's web-8080 and ctl1's checker."""
    (tmp_path / "hosts.yml").write_text(textwrap.dedent(FLEET_INVENTORY))
    authority, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    authority.sign(csr(), "spiffe://lab.mesh/svc/web", timedelta(hours=24), "vm1", "web-8080",
                   now=NOW - timedelta(hours=2))
    authority.sign(csr(), "spiffe://lab.mesh/mesh/health", timedelta(hours=24), "ctl1", "health-checker",
                   now=NOW - timedelta(hours=2))
    return ca_commands._checked_mesh(str(tmp_path / "hosts.yml"))


def test_kv_entries_are_records_with_the_serial_from_the_key() -> None:
    kept = record("vm1", "web-8080", "a1", timedelta(seconds=10))
    without_serial = {k: v for k, v in kept.as_json().items() if k != "serial"}
    records, problems = parse_controller_records(
        [(PREFIX + "a1", json.dumps(kept.as_json()).encode()), (PREFIX + "b2", json.dumps(without_serial).encode()),
         (PREFIX + "c3", b"{not json"), (PREFIX + "d4", None)], PREFIX)
    assert records == [kept, IssuedRecord(**{**kept.__dict__, "serial": "b2"})]
    assert problems == [f"{PREFIX}c3: not a record of an issued leaf (JSONDecodeError)",
                        f"{PREFIX}d4: not a record of an issued leaf (JSONDecodeError)"]


def test_the_newest_leaf_per_proxy_wins_whoever_issued_it() -> None:
    ledger = [record("vm1", "web-8080", "d1", timedelta(hours=2)),
              record("ctl1", "health-checker", "d2", timedelta(hours=2))]
    controllers = [record("vm1", "web-8080", "c1", timedelta(seconds=40)),
                   record("vm1", "web-8080", "c2", timedelta(seconds=10)),
                   record("ctl1", "checker", "c3", timedelta(seconds=5))]
    leaves = newest_leaves(ledger, controllers)
    assert [(leaf.record.host, leaf.source, leaf.record.serial, leaf.earlier) for leaf in leaves] == [
        ("ctl1", "controller", "c3", 1), ("vm1", "controller", "c2", 2)]
    assert newest_leaves(ledger, [])[1].source == "deploy"


def test_check_lists_the_ledger_and_the_controllers_records(mesh: Mesh) -> None:
    fresh = record("vm1", "web-8080", "c0ffee", timedelta(seconds=10))
    gone = record("vm1", "web-9999", "0ld", timedelta(seconds=5))  # a proxy the inventory no longer has
    lines = issued_lines(mesh, NOW, lambda _: ([fresh, record("dock1", "api-api-1", "beef", timedelta(seconds=45),
                                                              service="api"), gone], []))
    assert lines[0] == (f"leaves issued, newest per proxy of the inventory (2 in {mesh.settings.state_dir}/ca/"
                        f"issued.json, 3 by controllers in Consul KV {PREFIX}):")
    assert lines[1].split()[:6] == ["ctl1", "health-checker", "deploy", "serial", lines[1].split()[4], "ok"]
    assert lines[2].split()[:6] == ["dock1", "api-api-1", "controller", "serial", "beef", "under"]
    assert lines[3].split()[:6] == ["vm1", "web-8080", "controller", "serial", "c0ffee", "ok"]
    assert lines[3].endswith("50s left (83%) (1 earlier)")
    assert len(lines) == 4


def test_a_consul_that_cannot_be_read_is_a_warning(mesh: Mesh) -> None:
    def unreachable(_: Mesh) -> tuple[list[IssuedRecord], list[str]]:
        raise CatalogError("Consul is unreachable at http://127.0.0.1:1: refused")

    lines = issued_lines(mesh, NOW, unreachable)
    assert lines[-1] == ("[WARNING]: the controllers' records were not read: Consul is unreachable at "
                         "http://127.0.0.1:1: refused")
    assert [line.split()[2] for line in lines[1:-1]] == ["deploy", "deploy"]


def test_the_cli_prints_the_leaves_after_the_hosts_certificates(
        mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ca_commands, "check_mesh", lambda m: ([], 0))
    monkeypatch.setattr(ca_commands, "controller_records",
                        lambda m: ([record("vm1", "web-8080", "c0ffee", timedelta(seconds=10))], []))
    assert run(["ca", "check", "-i", str(tmp_path / "hosts.yml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "0 certificate(s), 0 need attention"
    assert out[1].startswith("leaves issued, newest per proxy of the inventory (2 in ")
    assert [line.split()[:3] for line in out[2:]] == [["ctl1", "health-checker", "deploy"],
                                                      ["vm1", "web-8080", "controller"]]
