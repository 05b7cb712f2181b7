"""One folder of CA material: the root certificate (and its key when mesh made the root), the intermediate that
signs leaves (its chain below the root when the CA was brought), its key, the controllers' intermediate, and
`ca.json`. `<state_dir>/ca/` holds the current material; during a rotation `ca/next/` holds the next.

It reads, checks and writes those files; keys are never logged, printed or returned outside a `Material`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.errors import MeshError
from mesh.pki.byo import GivenCA
from mesh.pki.certs import CAKey, Issuer, build_intermediate, build_root, new_ca_key
from mesh.pki.files import PRIVATE_FILE, PUBLIC_FILE, read_file, require_private, write_atomic
from mesh.pki.leaf import load_chain, serial_hex, signed_by

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"  # absent when the CA was brought (`mesh ca init --intermediate`): mesh never holds that key
INTERMEDIATE_CERT = "intermediate.pem"  # the intermediate, then (a CA brought to mesh) its issuers below the root
INTERMEDIATE_KEY = "intermediate.key"
META_FILE = "ca.json"
CONTROLLER_CERT = "controller-intermediate.pem"  # the controllers' intermediate, then its chain below the root
CONTROLLER_KEY = "controller-intermediate.key"
MATERIAL_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, CONTROLLER_CERT, CONTROLLER_KEY,
                  META_FILE)


@dataclass(frozen=True)
class ControllerIssuer:
    """The controllers' own intermediate: what a deploy pushes to every controller, which signs leaves with it.
    cert_pem is the intermediate then its chain below the root; key_pem is secret: never logged or printed."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def cert(self) -> x509.Certificate:
        return load_chain(self.cert_pem)[0]


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CAKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Material:
    """A loaded folder of CA material: `chain` is the signing intermediate first, then its issuers below `root`."""

    folder: str
    trust_domain: str
    root: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: CAKey = field(repr=False, compare=False)
    brought: bool = False  # the owner's intermediate (`mesh ca init --intermediate`): no root key here

    @property
    def intermediate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_pem(self) -> bytes:
        return b"".join(pem(cert) for cert in self.chain)

    def controller_issuer(self, create: bool) -> ControllerIssuer | None:
        """The controllers' intermediate of this folder, made once when `create` (signed by the root mesh made,
        or by a brought intermediate: mesh has no other key); None when absent and not `create`."""
        cert_path, key_path = (os.path.join(self.folder, name) for name in (CONTROLLER_CERT, CONTROLLER_KEY))
        if not os.path.lexists(key_path):
            if not create:
                return None
            write_controller_issuer(self, datetime.now(UTC))
        require_private(key_path, "the controller intermediate key")
        certs = load_chain(read_file(cert_path, "the controller intermediate certificate"))
        key = read_key(self.folder, CONTROLLER_KEY, "the controller intermediate key")
        if key.public_key() != certs[0].public_key() or not signed_by(certs[0], self._controller_signer_cert()):
            raise MeshError(f"the controller intermediate in {self.folder} is corrupt: it does not match its key "
                            "or its issuer", "move controller-intermediate.* away: the next deploy makes a new one")
        return ControllerIssuer(b"".join(pem(cert) for cert in certs), key_pem(key))

    def controller_cert(self) -> x509.Certificate | None:
        """The controllers' intermediate certificate of this folder, if made."""
        path = os.path.join(self.folder, CONTROLLER_CERT)
        return load_chain(read_file(path, "the controller intermediate certificate"))[0] \
            if os.path.lexists(path) else None

    def _controller_signer_cert(self) -> x509.Certificate:
        return self.intermediate if self.brought else self.root


def write_controller_issuer(material: Material, now: datetime) -> None:
    """Make the controllers' intermediate of a folder: under the root when mesh holds its key, else under the
    brought intermediate (its path length was checked when it was brought)."""
    if material.brought:
        issuer, below = Issuer(material.intermediate, material.key), material.chain
    else:
        issuer, below = Issuer(material.root, read_key(material.folder, ROOT_KEY, "the root key")), ()
    key = new_ca_key()
    cert = build_intermediate(issuer, key, material.trust_domain, now)
    # the certificate first: a key alone is never read
    write_atomic(os.path.join(material.folder, CONTROLLER_CERT), pem(cert) + b"".join(pem(c) for c in below),
                 PUBLIC_FILE)
    write_atomic(os.path.join(material.folder, CONTROLLER_KEY), key_pem(key), PRIVATE_FILE)
    structlog.get_logger().info("controller_intermediate_created", folder=material.folder, serial=serial_hex(cert))


def write_own(folder: str, trust_domain: str, now: datetime, with_controllers: bool = False) -> None:
    """A new root and intermediate made by mesh (and the controllers' intermediate when asked) into folder."""
    root_key, intermediate_key = new_ca_key(), new_ca_key()
    root = build_root(root_key, trust_domain, now)
    intermediate = build_intermediate(Issuer(root, root_key), intermediate_key, trust_domain, now)
    write_atomic(os.path.join(folder, ROOT_KEY), key_pem(root_key), PRIVATE_FILE)
    write_atomic(os.path.join(folder, INTERMEDIATE_KEY), key_pem(intermediate_key), PRIVATE_FILE)
    write_atomic(os.path.join(folder, ROOT_CERT), pem(root), PUBLIC_FILE)
    write_atomic(os.path.join(folder, INTERMEDIATE_CERT), pem(intermediate), PUBLIC_FILE)
    write_meta(folder, trust_domain, False, now)
    if with_controllers:
        write_controller_issuer(read_material(folder), now)


def write_given(folder: str, trust_domain: str, given: GivenCA, now: datetime, with_controllers: bool = False) -> None:
    """An intermediate brought by its owner (checked by byo.check_given_ca) into folder: its key, its chain and
    the root certificate; never a root key."""
    write_atomic(os.path.join(folder, INTERMEDIATE_KEY), key_pem(given.key), PRIVATE_FILE)
    write_atomic(os.path.join(folder, ROOT_CERT), pem(given.root), PUBLIC_FILE)
    write_atomic(os.path.join(folder, INTERMEDIATE_CERT), b"".join(pem(cert) for cert in given.chain), PUBLIC_FILE)
    write_meta(folder, trust_domain, True, now)
    if with_controllers:
        write_controller_issuer(read_material(folder), now)


def write_meta(folder: str, trust_domain: str, brought: bool, now: datetime) -> None:
    meta = {"format": 1, "trust_domain": trust_domain, "created": now.isoformat(), "brought": brought}
    write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=2).encode() + b"\n", PUBLIC_FILE)


def read_meta(folder: str) -> tuple[str, bool]:
    """(trust domain, brought) from the folder's ca.json."""
    path = os.path.join(folder, META_FILE)
    try:
        meta = json.loads(read_file(path, "the CA's record"))
        value, brought = meta["trust_domain"], meta.get("brought", False)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MeshError(f"the mesh CA in {folder} is corrupt: {path} does not name its trust domain") from None
    if not isinstance(value, str) or not isinstance(brought, bool):
        raise MeshError(f"the mesh CA in {folder} is corrupt: {path} does not name its trust domain")
    return value, brought


def read_material(folder: str) -> Material:
    """The material in folder; MeshError if incomplete, corrupt, or a key others may read."""
    trust_domain, brought = read_meta(folder)
    keys = ((INTERMEDIATE_KEY, "the intermediate key"),) if brought else \
        ((ROOT_KEY, "the root key"), (INTERMEDIATE_KEY, "the intermediate key"))
    for name, what in keys:
        require_private(os.path.join(folder, name), what)
    root = read_certs(folder, ROOT_CERT, "the root certificate")[0]
    chain = tuple(read_certs(folder, INTERMEDIATE_CERT, "the intermediate certificate"))
    key = read_key(folder, INTERMEDIATE_KEY, "the intermediate key")
    path = [*chain, root]
    if key.public_key() != chain[0].public_key() or not all(
            signed_by(lower, upper) for lower, upper in pairwise(path)):
        raise MeshError(f"the mesh CA in {folder} is corrupt: its intermediate does not match its key or root")
    return Material(folder, trust_domain, root, chain, key, brought)


def read_certs(folder: str, name: str, what: str) -> list[x509.Certificate]:
    path = os.path.join(folder, name)
    try:
        return load_chain(read_file(path, what))
    except MeshError as exc:
        if "PEM" not in exc.message:
            raise
        raise MeshError(f"the mesh CA in {folder} is corrupt: {what} {path} is not a PEM certificate") from None


def read_key(folder: str, name: str, what: str) -> CAKey:
    path = os.path.join(folder, name)
    try:
        key = serialization.load_pem_private_key(read_file(path, what), password=None)
    except (ValueError, TypeError):
        # the exception text could quote the file: say only where it is
        raise MeshError(f"the mesh CA in {folder} is corrupt: {what} {path} is not a PEM key") from None
    if not isinstance(key, CAKey):
        raise MeshError(f"the mesh CA in {folder} is corrupt: {what} {path} is not an EC or RSA key")
    return key




