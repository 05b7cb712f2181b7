"""Bringing an existing CA: checking an intermediate (certificate, its chain up to a root, its key) handed to mesh
by its owner before mesh signs anything with it. Pure: bytes in, a checked `GivenCA` or a MeshError out.

mesh never needs the owner's root key; it must not read one, print a key, or repeat a key's bytes in a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.errors import MeshError
from mesh.pki.certs import CAKey
from mesh.pki.leaf import fingerprint, signed_by

MIN_RSA_BITS = 2048


class GivenCAError(MeshError):
    """The intermediate, key or root given to mesh cannot be used (exit 1)."""


@dataclass(frozen=True)
class GivenCA:
    """A checked intermediate with its key: `chain` is the intermediate then its issuers below the root (what a
    leaf's chain carries), `root` the trust anchor. key is secret: never logged or printed."""

    root: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: CAKey = field(repr=False)

    @property
    def intermediate(self) -> x509.Certificate:
        return self.chain[0]


def _certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise GivenCAError(f"{what} is not a PEM certificate") from None
    return certs


def _key(data: bytes, what: str) -> CAKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise GivenCAError(f"{what} is encrypted", "give mesh the key without a passphrase (it is kept at mode "
                           "0600 in mesh_state_dir/ca/)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise GivenCAError(f"{what} is not a PEM private key") from None  # the error text could quote the key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise GivenCAError(f"{what} is a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are needed")
        return key
    raise GivenCAError(f"{what} is a {type(key).__name__}; mesh signs with EC or RSA keys")


def _constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _is_signing_ca(cert: x509.Certificate) -> bool:
    basic = _constraints(cert)
    if basic is None or not basic.ca:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or fingerprint(cert)


def check_given_ca(intermediate_pem: bytes, key_pem: bytes, root_pem: bytes, trust_domain: str,
                   now: datetime) -> GivenCA:
    """The intermediate (first certificate of intermediate_pem; any more are its issuers, below the root), checked:
    a CA allowed to sign certificates, in date, chaining to the root certificate, its key the given one, its
    name constraints (if any) allowing `spiffe://<trust_domain>`, and room in every path length for one more CA
    (mesh signs the controllers' intermediate under it). GivenCAError naming what is wrong otherwise."""
    chain = _certs(intermediate_pem, "the intermediate certificate")
    roots = _certs(root_pem, "the root certificate")
    if len(roots) != 1:
        raise GivenCAError(f"the root certificate file holds {len(roots)} certificates; give exactly one")
    root = roots[0]
    key = _key(key_pem, "the intermediate key")
    intermediate = chain[0]
    if key.public_key() != intermediate.public_key():
        raise GivenCAError(f"the key is not the intermediate's ({_name(intermediate)}): they were not made "
                           "together", "give the key the intermediate certificate was issued for")
    for cert, what in ((intermediate, "the intermediate"), *((c, "a certificate of its chain") for c in chain[1:]),
                       (root, "the root")):
        if not _is_signing_ca(cert):
            raise GivenCAError(f"{what} ({_name(cert)}) is not a CA: it may not sign certificates "
                               "(basic constraints CA:TRUE and key usage keyCertSign are needed)")
        if cert.not_valid_after_utc <= now:
            raise GivenCAError(f"{what} ({_name(cert)}) expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if cert.not_valid_before_utc > now:
            raise GivenCAError(f"{what} ({_name(cert)}) is not valid before "
                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    path = [*chain, root]
    for lower, upper in pairwise(path):
        if not signed_by(lower, upper):
            raise GivenCAError(f"{_name(lower)} is not signed by {_name(upper)}: the intermediate does not chain "
                               f"to the root {fingerprint(root)}",
                               "give the intermediate's whole chain in its file (intermediate first), and the "
                               "root it was issued under")
    _check_path_lengths(path)
    for cert in path:
        _check_name_constraints(cert, trust_domain)
    return GivenCA(root, tuple(chain), key)


def _check_path_lengths(path: list[x509.Certificate]) -> None:
    """Each CA's pathLenConstraint counts the CAs below it; under the intermediate comes the controllers' one."""
    for index, cert in enumerate(path):
        basic = _constraints(cert)
        below = index + 1  # CAs under this one: the ones before it in `path`, and the controllers' intermediate
        if basic is not None and basic.path_length is not None and basic.path_length < below:
            what = "the intermediate" if index == 0 else _name(cert)
            raise GivenCAError(f"{what} has path length {basic.path_length}: mesh signs the controllers' own "
                               f"intermediate under the intermediate, which needs a path length of at least "
                               f"{below} there",
                               "ask the CA's owner for an intermediate with pathlen >= 1 (or none)")


def _check_name_constraints(cert: x509.Certificate, trust_domain: str) -> None:
    try:
        names = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    permitted = [n.value for n in names.permitted_subtrees or () if isinstance(n, x509.UniformResourceIdentifier)]
    excluded = [n.value for n in names.excluded_subtrees or () if isinstance(n, x509.UniformResourceIdentifier)]
    if permitted and not any(uri_host_matches(value, trust_domain) for value in permitted):
        raise GivenCAError(f"{_name(cert)} permits URI names only under {', '.join(permitted)}: it cannot issue "
                           f"spiffe://{trust_domain}/... identities",
                           "use the trust domain it allows (mesh_trust_domain) or another intermediate")
    hit = [value for value in excluded if uri_host_matches(value, trust_domain)]
    if hit:
        raise GivenCAError(f"{_name(cert)} excludes URI names under {', '.join(hit)}: it cannot issue "
                           f"spiffe://{trust_domain}/... identities")
    _check_dns_constraints(cert, names)


def _check_dns_constraints(cert: x509.Certificate, names: x509.NameConstraints) -> None:
    """A proxy's leaf names its node id (a bare name such as web-vm1-8080) as a DNS SAN: a CA that permits DNS
    names only under some domain, or excludes every DNS name, cannot issue it."""
    permitted = [n.value for n in names.permitted_subtrees or () if isinstance(n, x509.DNSName)]
    excluded = [n.value for n in names.excluded_subtrees or () if isinstance(n, x509.DNSName)]
    if permitted and "" not in permitted:
        raise GivenCAError(f"{_name(cert)} permits DNS names only under {', '.join(permitted)}: it cannot issue "
                           "proxy leaves, which name their node id (such as web-vm1-8080) as a DNS name",
                           "use an intermediate without DNS name constraints")
    if "" in excluded:
        raise GivenCAError(f"{_name(cert)} excludes every DNS name: it cannot issue proxy leaves, which name "
                           "their node id (such as web-vm1-8080) as a DNS name")


def uri_host_matches(constraint: str, host: str) -> bool:
    """RFC 5280 4.2.1.10 for URIs: the constraint names the host exactly, or (starting with a dot) any host
    below it."""
    constraint, host = constraint.lower(), host.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint
