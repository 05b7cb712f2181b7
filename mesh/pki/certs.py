"""Builds the CA's certificates (root, intermediate) and workload leaves from a checked CSR: pure functions
of keys, names and times. It must not touch files, clocks or the ledger of issued leaves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import MeshError

CLOCK_SKEW = timedelta(minutes=5)  # a leaf's not_before is set back this much, or a tenth of its lifetime if less
ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=1826)
MIN_RSA_BITS = 2048

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # mesh makes EC keys; a CA brought to it may be RSA


@dataclass(frozen=True)
class Issuer:
    """A certificate with the key that signs under it."""

    cert: x509.Certificate
    key: CAKey


def backdate(ttl: timedelta) -> timedelta:
    """How far before its signing a leaf of lifetime `ttl` starts: CLOCK_SKEW, at most a tenth of the lifetime
    (a one-minute leaf is backdated 6 s, not 5 minutes that would make most of it past already)."""
    return min(CLOCK_SKEW, ttl / 10)


def leaf_validity(now: datetime, ttl: timedelta, ceiling: datetime) -> tuple[datetime, datetime]:
    """(not_before, not_after) of a leaf signed at `now` for `ttl`: backdated (backdate()), never past
    `ceiling` (the issuer's own not_after)."""
    return now - backdate(ttl), min(now + ttl, ceiling)


def validity_start(not_before: datetime, not_after: datetime) -> datetime:
    """When a leaf mesh signed really started (its signing time): not_before plus the backdate, found from its
    validity as leaf_validity made it (lifetime = ttl + min(CLOCK_SKEW, ttl/10)). Renewal and expiry count
    fractions of a lifetime from here, so a short-lived leaf is not judged a tenth older than it is."""
    total = not_after - not_before
    if total <= timedelta(0):
        return not_before
    skew = total / 11 if total < CLOCK_SKEW * 11 else CLOCK_SKEW
    return not_before + skew


def new_ca_key() -> CAKey:
    """A fresh ECDSA P-256 key for the root or the intermediate."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def build_root(key: CAKey, trust_domain: str, now: datetime) -> x509.Certificate:
    """The self-signed root: CA:TRUE, keyCertSign + cRLSign, about ten years."""
    name = _name(f"mesh root CA {trust_domain}", trust_domain)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_intermediate(root: Issuer, key: CAKey, trust_domain: str, now: datetime) -> x509.Certificate:
    """The intermediate that signs leaves: CA:TRUE pathlen 0, about five years, signed by the root."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"mesh intermediate CA {trust_domain}", trust_domain))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(min(now + INTERMEDIATE_LIFETIME,
                                                                 root.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(root.cert), critical=False)
        .sign(root.key, hashes.SHA256())
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # an intermediate brought to mesh may lack one
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def checked_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """The CSR, once its signature holds and its key is EC P-256 or RSA of 2048 bits or more."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise MeshError("the certificate request is not a PEM CSR") from None
    if not csr.is_signature_valid:
        raise MeshError("the certificate request's signature does not verify; refusing to sign")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise MeshError(f"the certificate request has an EC key on {key.curve.name}; mesh signs P-256 only")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise MeshError(f"the certificate request has a {key.key_size}-bit RSA key; at least "
                            f"{MIN_RSA_BITS} bits are needed")
    else:
        raise MeshError(f"the certificate request has a {type(key).__name__}; mesh signs EC P-256 or RSA keys")
    return csr


_DNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,1024}", re.ASCII)


def check_dns_name(name: str) -> str:
    """`name` when it can be a certificate's DNS SAN as written: 1 to 1024 ASCII letters, digits, '-', '_' and '.'.
    A node id (`api-vm2-9090`, `api-vm_1-api_v2`) is one: every host, service and container name the inventory
    accepts makes one (an underscore is no DNS host name's, but the ADS server compares the string, and a node id
    refused here would fail a deploy halfway)."""
    if not _DNS_NAME.fullmatch(name):
        raise MeshError(f"{name!r} cannot be a certificate's DNS name (ASCII letters, digits, '-', '_' and '.')")
    return name


def _leaf_usage(is_ec: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=is_ec, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class LeafRequest:
    """What goes into a leaf; the CSR gives only its public key (its names are ignored). dns_names: a proxy's
    node id (its ADS stream's name, checked against its certificate), none for other identities."""

    csr: x509.CertificateSigningRequest
    spiffe_id: str
    common_name: str
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...] = ()


def build_leaf(request: LeafRequest, issuer: Issuer) -> x509.Certificate:
    """A workload leaf: one URI SAN (the SPIFFE ID) and the request's DNS SANs (a proxy's node id), serverAuth +
    clientAuth, not a CA, random serial. MeshError for a DNS name that is not a plain host name."""
    key = request.csr.public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise TypeError(f"unchecked key type {type(key).__name__}")  # checked_csr() refuses these
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(request.spiffe_id)]
    names += [x509.DNSName(check_dns_name(name)) for name in request.dns_names]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(request.not_before).not_valid_after(request.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(isinstance(key, ec.EllipticCurvePublicKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(_aki(issuer.cert), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
