"""`mesh status`'s certificate of a host (here the checker's, mesh/status/judge.py) on a fake reading: expiry, time
left and serial, and a problem (exit 2) under a third of the lifetime, expired, or missing; the same threshold as
`mesh ca check`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from status_fleet import leaf_pem

from mesh.healthcheck.config import CERT_FILE as CHECKER_CERT_PATH
from mesh.hosts.connection import CommandResult
from mesh.status import reads
from mesh.status.judge import judge_checker
from mesh.status.report import CheckerStatus


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _checker(tmp_path: Path, issued_ago: timedelta | None) -> tuple[CheckerStatus, bytes]:
    pem = leaf_pem(tmp_path, issued_ago) if issued_ago is not None else b""
    readings = {reads.CHECKER: CommandResult(0, b"active\n", b""),
                reads.CHECKER_CERT: CommandResult(0, pem, b"") if pem else CommandResult(1, b"", b"No such file")}
    return judge_checker(readings, datetime.now(UTC)), pem


def test_a_fresh_certificate_shows_its_expiry_time_left_and_serial(tmp_path: Path) -> None:
    checker, pem = _checker(tmp_path, timedelta(hours=1))
    certificate = checker.certificate
    assert "UTC, 22h" in certificate.described and "left (9" in certificate.described and not checker.problems
    assert certificate.serial == format(x509.load_pem_x509_certificate(pem).serial_number, "x")
    assert certificate.state == "ok" and certificate.remaining_seconds is not None
    assert 22 * 3600 < certificate.remaining_seconds <= 23 * 3600


def test_under_a_third_left_is_a_problem(tmp_path: Path) -> None:
    checker, _ = _checker(tmp_path, timedelta(hours=17))
    assert checker.certificate.state == "under 1/3 left" and "6h" in checker.certificate.described
    assert len(checker.problems) == 1
    assert checker.problems[0].startswith("certificate has under 33% of its lifetime left (expires ")
    assert checker.problems[0].endswith("): run mesh deploy to renew it")


def test_expired_or_missing_is_a_problem(tmp_path: Path) -> None:
    expired, _ = _checker(tmp_path, timedelta(hours=25))
    assert expired.problems[0].startswith("certificate expired")
    missing, _ = _checker(tmp_path, None)
    assert missing.certificate.state == "missing" and missing.certificate.serial is None
    assert missing.problems == (f"certificate {CHECKER_CERT_PATH} is missing (run mesh deploy)",)
