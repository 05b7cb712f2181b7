"""Certificate rotation by the controller: when an identity's leaf is due, and signing a host's CSR with the
controller's intermediate (the root signed it; the deploy's own intermediate never leaves the state dir).

Pure but for load_signer (reads the intermediate's files). It must not log or return key material, and knows
nothing of SSH: the daemon runs `csr` and `install` through the transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.controller.protocol import CertState
from mesh.controller.spec import INTERMEDIATE_CERT, INTERMEDIATE_KEY
from mesh.errors import MeshError
from mesh.pki.certs import CLOCK_SKEW, Issuer, LeafRequest, build_leaf, checked_csr
from mesh.pki.leaf import serial_hex
from mesh.pki.ledger import IssuedRecord
from mesh.pki.spiffe import spiffe_path


def renew_at(cert: CertState, cert_ttl_s: int, renew_fraction: float) -> datetime:
    """When a leaf is renewed: `renew_fraction` of the configured lifetime after it started, counted back from
    its end (not_after - (1 - renew_fraction) * ttl), so backdating never makes a leaf renew late."""
    return cert.not_after - timedelta(seconds=(1.0 - renew_fraction) * cert_ttl_s)


def renewal_due(cert: CertState | None, now: datetime, cert_ttl_s: int, renew_fraction: float) -> bool:
    """True when the identity has no certificate, or it is at or past renew_at."""
    return cert is None or now >= renew_at(cert, cert_ttl_s, renew_fraction)


def backdate(ttl: timedelta) -> timedelta:
    """How far before now a leaf starts (clock skew): 5 minutes, at most a tenth of its lifetime."""
    return min(CLOCK_SKEW, ttl / 10)


@dataclass(frozen=True)
class SignedLeaf:
    """A leaf the controller signed: the chain to install (leaf then intermediate) and what is recorded."""

    chain_pem: bytes = field(repr=False)
    serial: str  # mesh.pki's serial_hex, the KV key's last segment
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Signer:
    """The controller's intermediate with its key (never shown, not even in repr)."""

    trust_domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain_pem: bytes = b""  # the certificates between cert and the root (a CA brought to mesh has some)

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl: timedelta, now: datetime,
             dns_names: tuple[str, ...] = ()) -> SignedLeaf:
        """A leaf for the CSR's key (checked: signature, key type) with the one URI SAN spiffe_id and the DNS SANs
        dns_names (a proxy's node id); valid from now - backdate(ttl) to now + ttl, never past the intermediate."""
        segments = spiffe_path(spiffe_id, self.trust_domain)
        csr = checked_csr(csr_pem)
        request = LeafRequest(csr=csr, spiffe_id=spiffe_id, common_name=segments[-1],
                              not_before=now - backdate(ttl),
                              not_after=min(now + ttl, self.cert.not_valid_after_utc), dns_names=dns_names)
        leaf = build_leaf(request, Issuer(self.cert, self.key))
        pem = serialization.Encoding.PEM
        return SignedLeaf(chain_pem=leaf.public_bytes(pem) + self.cert.public_bytes(pem) + self.chain_pem,
                          serial=serial_hex(leaf),
                          not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc)


def load_signer(trust_domain: str, cert_path: str = INTERMEDIATE_CERT, key_path: str = INTERMEDIATE_KEY) -> Signer:
    """The intermediate at cert_path (then its chain below the root, if any) with its key; MeshError naming the file
    (never its content)."""
    try:
        with open(cert_path, "rb") as handle:
            certs = x509.load_pem_x509_certificates(handle.read())
        with open(key_path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        raise MeshError(f"cannot read the controller's intermediate: {exc.filename}: {exc.strerror}") from None
    except ValueError:
        raise MeshError(f"the controller's intermediate ({cert_path}, {key_path}) is not PEM") from None
    cert = certs[0]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise MeshError(f"the key {key_path} is not the key of {cert_path}")
    pem = serialization.Encoding.PEM
    return Signer(trust_domain, cert, key, b"".join(item.public_bytes(pem) for item in certs[1:]))


def issued_record(host: str, proxy: str, spiffe_id: str, leaf: SignedLeaf, issued_at: datetime) -> dict[str, str]:
    """What `mesh ca check` reads at issued_prefix(mesh_id) + serial: the CA ledger's own record format."""
    return IssuedRecord(host=host, proxy=proxy, spiffe_id=spiffe_id, serial=leaf.serial, not_before=leaf.not_before,
                        not_after=leaf.not_after, issued_at=issued_at).as_json()


def remaining_s(certs: Mapping[str, CertState | None], now: datetime) -> dict[str, float]:
    """Seconds each identity's leaf has left (negative once expired; identities without one left out)."""
    return {name: (cert.not_after - now).total_seconds() for name, cert in certs.items() if cert is not None}
