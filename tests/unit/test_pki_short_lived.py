"""Leaves the controllers make: one-minute lifetimes (backdated a tenth of it, renewed at half of it counted
from the signing) and leaves signed by an intermediate of the controllers' own that the root signed, which the
deploy must accept as this CA's (never renew them as foreign)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.deploy.steps.identity import certificate_reason
from mesh.inventory.model import spiffe_id
from mesh.pki import CertificateAuthority, chains_to, leaf_needs_renewal, leaf_remaining_fraction
from mesh.pki.certs import (
    Issuer,
    LeafRequest,
    backdate,
    build_intermediate,
    build_leaf,
    checked_csr,
    leaf_validity,
    new_ca_key,
    validity_start,
)
from mesh.pki.expiry import Expiry, judge

TD = "lab.mesh"
WEB = spiffe_id(TD, "web")
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.ensure(str(tmp_path / "state"), TD)[0]


def root_issuer(authority: CertificateAuthority) -> Issuer:
    key = serialization.load_pem_private_key((Path(authority.ca_dir) / "root.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issuer(authority.root, key)


def csr() -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, checked_csr(request.public_bytes(serialization.Encoding.PEM))


def controller_leaf(issuer: Issuer, ttl: timedelta = timedelta(minutes=1),
                    now: datetime = NOW) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf as a controller signs it: its own intermediate, mesh's validity rule."""
    key, request = csr()
    not_before, not_after = leaf_validity(now, ttl, issuer.cert.not_valid_after_utc)
    return key, build_leaf(LeafRequest(request, WEB, "web", not_before, not_after), issuer)


@pytest.mark.parametrize(("ttl", "expected"), [
    (timedelta(minutes=1), timedelta(seconds=6)), (timedelta(minutes=10), timedelta(minutes=1)),
    (timedelta(minutes=50), timedelta(minutes=5)), (timedelta(hours=24), timedelta(minutes=5)),
])
def test_backdate_is_five_minutes_or_a_tenth_of_the_lifetime(ttl: timedelta, expected: timedelta) -> None:
    assert backdate(ttl) == expected


@pytest.mark.parametrize("ttl", [timedelta(minutes=1), timedelta(minutes=10), timedelta(minutes=49),
                                 timedelta(minutes=50), timedelta(minutes=55), timedelta(hours=24),
                                 timedelta(days=90)])
def test_the_real_start_is_found_back_from_the_validity(ttl: timedelta) -> None:
    not_before, not_after = leaf_validity(NOW, ttl, NOW + timedelta(days=365))
    assert validity_start(not_before, not_after) == NOW


def test_a_one_minute_leaf_is_renewed_at_thirty_seconds_after_its_signing(authority: CertificateAuthority) -> None:
    _, request = csr()
    issued = authority.sign(request.public_bytes(serialization.Encoding.PEM), WEB, timedelta(minutes=1),
                            host="vm1", proxy="web-8080", now=NOW)
    assert (issued.not_before, issued.not_after) == (NOW - timedelta(seconds=6), NOW + timedelta(minutes=1))
    assert leaf_remaining_fraction(issued.chain_pem, NOW) == 1.0
    assert not authority.needs_renewal(issued.chain_pem, NOW + timedelta(seconds=29))
    assert authority.needs_renewal(issued.chain_pem, NOW + timedelta(seconds=31))
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert judge(leaf, NOW + timedelta(seconds=30)).state is Expiry.OK
    assert judge(leaf, NOW + timedelta(seconds=41)).state is Expiry.LOW  # under a third of 60 s left
    assert judge(leaf, NOW + timedelta(seconds=10)).describe().endswith("50s left (83%)")


def test_a_leaf_signed_by_the_controllers_intermediate_is_this_cas(authority: CertificateAuthority) -> None:
    controllers = Issuer(*_intermediate(root_issuer(authority)))
    key, leaf = controller_leaf(controllers, ttl=timedelta(hours=1))
    chain = pem(leaf) + pem(controllers.cert)  # what `mesh-ctl install` writes: leaf first
    soon = NOW + timedelta(minutes=10)
    assert chains_to(chain, authority.root_pem)
    assert not authority.needs_renewal(chain, soon), "a controller's leaf is not foreign to the deploy"
    assert not leaf_needs_renewal(chain, soon, authority.root_pem, authority.intermediate_pem)
    # the leaf alone chains through a bundle naming both intermediates
    bundle = authority.intermediate_pem + pem(controllers.cert)
    assert chains_to(pem(leaf), authority.root_pem, bundle)
    assert not chains_to(pem(leaf), authority.root_pem, authority.intermediate_pem)
    # the deploy's judgement reads the clock: a leaf signed now
    key, leaf = controller_leaf(controllers, ttl=timedelta(hours=1), now=datetime.now(UTC))
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert certificate_reason(pem(leaf) + pem(controllers.cert), public, WEB, authority) is None


def test_a_leaf_from_an_intermediate_another_root_signed_is_foreign(authority: CertificateAuthority,
                                                                    tmp_path: Path) -> None:
    other = CertificateAuthority.ensure(str(tmp_path / "other"), TD)[0]
    stranger = Issuer(*_intermediate(root_issuer(other)))
    _, leaf = controller_leaf(stranger, ttl=timedelta(hours=1))
    chain = pem(leaf) + pem(stranger.cert)
    assert not chains_to(chain, authority.root_pem, authority.intermediate_pem)
    assert authority.needs_renewal(chain, NOW + timedelta(minutes=1))
    # a chain that carries this root's intermediate beside the stranger's does not make the leaf ours
    assert not chains_to(pem(leaf) + authority.intermediate_pem + pem(stranger.cert), authority.root_pem)


def _intermediate(root: Issuer) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_ca_key()
    return build_intermediate(root, key, TD, NOW - timedelta(days=1)), key
