"""Reading a workload leaf back: its SPIFFE ID, validity and serial, whether it chains to this CA (through
the deploy's intermediate or any other the root signed, such as the controllers'), and whether it needs renewal
(unreadable, foreign, or past half its lifetime counted from its real start). It must not sign anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from mesh.errors import MeshError
from mesh.pki.certs import validity_start

RENEW_AT_REMAINING = 0.5


@dataclass(frozen=True)
class LeafInfo:
    """What mesh reads from a leaf: its SPIFFE ID (None if it has none), validity, serial (hex) and DNS SANs (a
    proxy's node id)."""

    spiffe_id: str | None
    not_before: datetime
    not_after: datetime
    serial: str
    dns_names: tuple[str, ...] = ()


def serial_hex(cert: x509.Certificate) -> str:
    """A certificate's serial number as lower-case hex, as `mesh ca show` and issued.json write it."""
    return f"{cert.serial_number:x}"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as openssl prints it: upper-case hex pairs joined by colons."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, leaf first; MeshError if there is none or it is not PEM."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise MeshError("not a PEM certificate") from None
    return certs


def leaf_info(cert_pem: bytes) -> LeafInfo:
    """The first certificate of cert_pem (a leaf or leaf + chain) as LeafInfo; MeshError if unreadable."""
    leaf = load_chain(cert_pem)[0]
    return LeafInfo(
        spiffe_id=_spiffe_id(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=serial_hex(leaf),
        dns_names=_dns_names(leaf),
    )


def leaf_dns_names(cert_pem: bytes) -> tuple[str, ...]:
    """The DNS SANs of the first certificate of cert_pem (a proxy's leaf: its node id), in order; () when it has
    none; MeshError if unreadable."""
    return _dns_names(load_chain(cert_pem)[0])


def _dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(names.get_values_for_type(x509.DNSName))


def node_id_reason(cert_pem: bytes | None, node_id: str | None) -> str | None:
    """Why a proxy's leaf must be re-issued for its node id: it does not name it as a DNS SAN (leaves issued
    before they did). None when it does, when no node id is asked for (the checker), or when there is no readable
    leaf (the other reasons cover those)."""
    if not node_id or cert_pem is None:
        return None
    try:
        names = leaf_dns_names(cert_pem)
    except MeshError:
        return None
    return None if node_id in names else f"without its node id {node_id} as a DNS name"


def _spiffe_id(leaf: x509.Certificate) -> str | None:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [uri for uri in names.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def leaf_remaining_fraction(cert_pem: bytes, now: datetime | None = None) -> float:
    """The part of the leaf's lifetime still ahead at now, from 1.0 (just issued) to 0.0 (expired); the
    lifetime runs from the real start (certs.validity_start: not_before plus the backdate) to not_after."""
    info = leaf_info(cert_pem)
    now = now or datetime.now(UTC)
    lifetime = (info.not_after - validity_start(info.not_before, info.not_after)).total_seconds()
    if lifetime <= 0:
        return 0.0
    return min(1.0, max(0.0, (info.not_after - now).total_seconds() / lifetime))


def leaf_needs_renewal(cert_pem: bytes, now: datetime | None = None, root_pem: bytes | None = None,
                       intermediate_pem: bytes | None = None) -> bool:
    """True when the leaf is unreadable, past half its lifetime, or (root_pem given) does not chain to that
    root through an intermediate of cert_pem (a leaf + chain bundle: a controller's leaf carries the controllers'
    intermediate) or of intermediate_pem (one or more PEM certificates)."""
    try:
        if leaf_remaining_fraction(cert_pem, now) <= RENEW_AT_REMAINING:
            return True
        if root_pem is None:
            return False
        return not chains_to(cert_pem, root_pem, intermediate_pem)
    except MeshError:
        return True


def chains_to(cert_pem: bytes, root_pem: bytes, intermediate_pem: bytes | None = None) -> bool:
    """Whether the first certificate of cert_pem was signed by root_pem's root, directly or through any one
    CA certificate (from cert_pem's chain or the bundle intermediate_pem) that the root signed: the deploy's
    intermediate or the controllers' own. Signatures only, not times."""
    certs = load_chain(cert_pem)
    root = load_chain(root_pem)[0]
    middles = certs[1:] + (load_chain(intermediate_pem) if intermediate_pem else [])
    leaf = certs[0]
    if signed_by(leaf, root):
        return True
    return any(is_ca(middle) and signed_by(middle, root) and signed_by(leaf, middle) for middle in middles)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`issuer`'s key signed `cert` (its signature checks out; names are not compared)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
