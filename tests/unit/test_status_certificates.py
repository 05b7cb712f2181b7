"""`mesh status`'s certificate cell (mesh/status.py `_certificate`) on a fake host: expiry and time left, and a
problem (exit 2) under a third of the lifetime, expired, or missing; the same threshold as `mesh ca check`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.deploy.hostcerts import CHECKER_CERT_PATH
from mesh.pki import CertificateAuthority
from mesh.status import Row, _certificate
from mesh.testing.fake_connector import FakeConnector, FakeHost


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _cell(tmp_path: Path, issued_ago: timedelta | None) -> tuple[str, Row]:
    host = FakeHost("ctl1")
    if issued_ago is not None:
        ca, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
        leaf = ca.sign(_csr(), "spiffe://lab.mesh/mesh/health", timedelta(hours=24), "ctl1", "health-checker",
                       now=datetime.now(UTC) - issued_ago)
        host.write(CHECKER_CERT_PATH, leaf.chain_pem)
    row = Row("ctl1", "health-checker")
    return _certificate(FakeConnector(host), CHECKER_CERT_PATH, row), row


def test_a_fresh_certificate_shows_its_expiry_and_time_left(tmp_path: Path) -> None:
    cell, row = _cell(tmp_path, timedelta(hours=1))
    assert "UTC, 22h" in cell and "left (9" in cell and not row.problems


def test_under_a_third_left_is_a_problem(tmp_path: Path) -> None:
    cell, row = _cell(tmp_path, timedelta(hours=17))
    assert cell.startswith("[red]") and "6h" in cell
    assert len(row.problems) == 1 and row.problems[0].startswith("certificate has under 33% of its lifetime left "
                                                                 "(expires ")
    assert row.problems[0].endswith("): run mesh deploy to renew it")


def test_expired_or_missing_is_a_problem(tmp_path: Path) -> None:
    _, expired = _cell(tmp_path, timedelta(hours=25))
    assert expired.problems[0].startswith("certificate expired")
    cell, missing = _cell(tmp_path, None)
    assert "missing" in cell and missing.problems == [f"certificate {CHECKER_CERT_PATH} is missing (run mesh deploy)"]
