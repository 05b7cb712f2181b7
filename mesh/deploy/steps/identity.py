"""Whose certificate a step manages (a proxy's or the health checker's) and whether the host's one must be
renewed. It reads the certificate and the key's public half from the host; it must not read private keys.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.config import paths
from mesh.deploy.steps.ownership import Owned
from mesh.errors import MeshError
from mesh.healthcheck.config import CERT_FILE as CHECKER_CERT
from mesh.healthcheck.config import CHECKER_USER
from mesh.healthcheck.config import CONFIG_DIR as CHECKER_DIR
from mesh.healthcheck.config import KEY_FILE as CHECKER_KEY
from mesh.hosts.connection import Connector, RemoteError
from mesh.inventory.model import health_checker_spiffe_id
from mesh.pki import CertificateAuthority, leaf_info
from mesh.pki.leaf import node_id_reason

CHECKER_LEDGER_NAME = "health-checker"
TTL_SLACK = timedelta(minutes=5)  # a leaf issued a moment ago with this ttl is not renewed again


@dataclass(frozen=True)
class Identity:
    """A SPIFFE identity and where its key and certificate live on the host."""

    spiffe_id: str
    key: str
    cert: str
    owner: str  # owns the key (0600)
    common_name: str
    ledger_name: str  # the `proxy` column of the CA's ledger
    proxy: str | None = None  # set for a proxy: a new certificate restarts it
    # The key and certificate live in a versioned folder of this ownership behind the `tls` link in `home`: a
    # new key and its certificate are written into a new folder, then the link is swapped in one rename.
    folder: Owned | None = None
    home: str | None = None
    node_id: str | None = None  # a proxy's node id: its leaf's DNS SAN (the checker has none)

    @property
    def dns_names(self) -> tuple[str, ...]:
        """The DNS SANs its leaf carries (passed to CertificateAuthority.sign)."""
        return (self.node_id,) if self.node_id else ()


def proxy_identity(proxy: str, spiffe_id: str, owner: str | None = None,
                   folder: Owned | None = None, node_id: str | None = None) -> Identity:
    """A proxy's identity; owner owns its key (a name on VMs, the sidecar's uid on container hosts); folder is
    the ownership of its key-and-certificate folders (the proxy folder's); node_id its Envoy's node id, which
    its leaf carries as a DNS SAN."""
    owner = owner or paths.envoy_user(proxy)
    return Identity(spiffe_id, paths.key_path(proxy), paths.cert_path(proxy), owner,
                    spiffe_id.rsplit("/", 1)[-1], proxy, proxy,
                    folder or Owned("root", owner, 0o750), paths.proxy_dir(proxy), node_id)


def in_new_folder(identity: Identity, version: str) -> Identity:
    """The identity with its key and certificate in a new versioned folder (not yet behind the link)."""
    if identity.home is None or identity.folder is None:
        return identity
    folder = f"{identity.home}/{paths.TLS_VERSION_PREFIX}{version}"
    return replace(identity, key=f"{folder}/key.pem", cert=f"{folder}/cert.pem")


def swap_command(identity: Identity, version: str) -> str:
    """Point the identity's `tls` link at the new folder in one rename, then remove the folders (and the files
    of mesh before versioned folders) that held the old key."""
    assert identity.home is not None
    home, link = identity.home, f"{identity.home}/tls"
    name = f"{paths.TLS_VERSION_PREFIX}{version}"
    temp = shlex.quote(f"{home}/.tls.new")
    return (f"ln -sfn {shlex.quote(name)} {temp} && mv -fT {temp} {shlex.quote(link)} && "
            f"for old in {shlex.quote(home)}/{paths.TLS_VERSION_PREFIX}*; do "
            f"[ \"$old\" = {shlex.quote(f'{home}/{name}')} ] || rm -rf -- \"$old\"; done; "
            f"rm -f -- {shlex.quote(f'{home}/key.pem')} {shlex.quote(f'{home}/cert.pem')}")


def checker_identity(trust_domain: str) -> Identity:
    """The health checker's identity: its key and certificate behind the `tls` link of its folder, like a
    proxy's, readable by the checker's user alone."""
    return Identity(health_checker_spiffe_id(trust_domain), CHECKER_KEY, CHECKER_CERT, CHECKER_USER, "health",
                    CHECKER_LEDGER_NAME, folder=Owned("root", CHECKER_USER, 0o750), home=CHECKER_DIR)


def renewal_reason(connector: Connector, identity: Identity, ca: CertificateAuthority,
                   ttl: timedelta | None = None) -> str | None:
    """Why the host's certificate must be replaced (see certificate_reason), read from the host, or None."""
    try:
        cert = connector.get(identity.cert)
    except RemoteError:
        return "unreadable"
    if cert is None:
        return "missing"
    public = connector.run(f"openssl pkey -in {shlex.quote(identity.key)} -pubout")
    return certificate_reason(cert, public.stdout if public.ok else None, identity.spiffe_id, ca, ttl,
                              identity.node_id)


def certificate_reason(cert: bytes | None, public_key: bytes | None, spiffe_id: str, ca: CertificateAuthority,
                       ttl: timedelta | None = None, node_id: str | None = None) -> str | None:
    """Why a certificate must be replaced (missing, unreadable, another SPIFFE ID, without the proxy's node id
    as a DNS SAN when `node_id` is given, another CA, past half its lifetime, valid for longer than `ttl` allows,
    not matching the key beside it), or None when it is good.
    Pure: the certificate and the key's public half are given (the private key is never read)."""
    if cert is None:
        return "missing"
    try:
        info = leaf_info(cert)
    except MeshError:
        return "unreadable"
    if info.spiffe_id != spiffe_id:
        return f"issued for {info.spiffe_id}, not {spiffe_id}"
    if (missing := node_id_reason(cert, node_id)) is not None:
        return missing
    if ca.needs_renewal(cert):
        return "past half its lifetime or not from this CA"
    if ttl is not None and info.not_after - datetime.now(UTC) > ttl + TTL_SLACK:
        return f"valid until {info.not_after:%Y-%m-%d %H:%M} UTC, longer than mesh_cert_ttl allows"
    if public_key is None or _public_key(cert) != public_key.strip():
        return "does not match the key on the host"
    return None


def _public_key(cert_pem: bytes) -> bytes:
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    return leaf.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo).strip()
