"""The mesh CA (Citadel's job): a root and an intermediate in `<state_dir>/ca/`, made once, loaded after, and
signing workload CSRs into SPIFFE leaves. Keys stay in that folder: never logged, returned or pushed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.errors import MeshError
from mesh.pki.certs import (
    CAKey,
    Issuer,
    LeafRequest,
    build_intermediate,
    build_leaf,
    build_root,
    checked_csr,
    leaf_validity,
    new_ca_key,
)
from mesh.pki.files import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    PUBLIC_FILE,
    read_file,
    require_private,
    sync_dir,
    write_atomic,
)
from mesh.pki.leaf import chains_to, fingerprint, leaf_needs_renewal, load_chain, serial_hex
from mesh.pki.ledger import IssuedRecord, append_record, read_records
from mesh.pki.spiffe import spiffe_path
from mesh.pki.vcs import GITIGNORE, protect_keys

CA_FOLDER = "ca"
ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
META_FILE = "ca.json"
CONTROLLER_CERT = "controller-intermediate.pem"
CONTROLLER_KEY = "controller-intermediate.key"


@dataclass(frozen=True)
class ControllerIssuer:
    """The controllers' own intermediate (signed by the root, never the deploy's intermediate): what a deploy
    pushes to every controller, which signs leaves with it. key_pem is secret: never logged or printed."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed leaf: cert_pem is the leaf alone, chain_pem the leaf then the intermediate (what Envoy serves)."""

    cert_pem: bytes
    chain_pem: bytes
    not_before: datetime
    not_after: datetime
    serial: str


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CAKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class CertificateAuthority:
    """The loaded CA. `ensure(state_dir, trust_domain)` makes or finds it; `sign(...)` issues leaves."""

    state_dir: str
    trust_domain: str
    root: x509.Certificate
    intermediate: x509.Certificate
    _intermediate_key: CAKey = field(repr=False, compare=False)

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.state_dir, CA_FOLDER)

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def intermediate_pem(self) -> bytes:
        return _pem(self.intermediate)

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root)

    @classmethod
    def ensure(cls, state_dir: str, trust_domain: str) -> tuple[CertificateAuthority, bool]:
        """The CA in state_dir, made first if absent; True when this call made it. A CA that exists with
        another trust domain is a MeshError (its leaves would carry the wrong SPIFFE IDs)."""
        state_dir = os.path.abspath(state_dir)
        created = False
        if not os.path.lexists(os.path.join(state_dir, CA_FOLDER)):
            created = _create(state_dir, trust_domain)
        authority = cls.load(state_dir)
        if authority.trust_domain != trust_domain:
            raise MeshError(f"the mesh CA in {authority.ca_dir} belongs to trust domain "
                            f"{authority.trust_domain!r}, not {trust_domain!r}",
                            "use the trust domain it was made for, or another mesh_state_dir")
        return authority, created

    @classmethod
    def load(cls, state_dir: str) -> CertificateAuthority:
        """The CA in state_dir; MeshError if absent, incomplete, corrupt, or a key others may read."""
        state_dir = os.path.abspath(state_dir)
        ca_dir = os.path.join(state_dir, CA_FOLDER)
        if not os.path.isdir(ca_dir):
            raise MeshError(f"no mesh CA in {state_dir}", "run `mesh ca init` (or a deploy) to make one")
        for name, what in ((CA_FOLDER, "the CA folder"), (ROOT_KEY, "the root key"),
                           (INTERMEDIATE_KEY, "the intermediate key")):
            require_private(os.path.join(state_dir, name) if name == CA_FOLDER else os.path.join(ca_dir, name),
                            what)
        trust_domain = _read_trust_domain(ca_dir)
        root = _read_cert(ca_dir, ROOT_CERT, "the root certificate")
        intermediate = _read_cert(ca_dir, INTERMEDIATE_CERT, "the intermediate certificate")
        key = _read_key(ca_dir, INTERMEDIATE_KEY, "the intermediate key")
        if key.public_key() != intermediate.public_key() or not chains_to(_pem(intermediate), _pem(root)):
            raise MeshError(f"the mesh CA in {ca_dir} is corrupt: its intermediate does not match its key or root")
        return cls(state_dir, trust_domain, root, intermediate, key)

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl: timedelta, host: str, proxy: str,
             now: datetime | None = None) -> IssuedCertificate:
        """A leaf for the CSR's key with exactly one URI SAN, spiffe_id (the CSR's own names are ignored),
        valid from a little before now (certs.backdate: 5 minutes, at most ttl/10) for ttl (never past the
        intermediate); recorded."""
        segments = spiffe_path(spiffe_id, self.trust_domain)
        if ttl <= timedelta(0):
            raise MeshError(f"a certificate lifetime must be positive, got {ttl}")
        csr = checked_csr(csr_pem)
        now = now or datetime.now(UTC)
        not_before, not_after = leaf_validity(now, ttl, self.intermediate.not_valid_after_utc)
        request = LeafRequest(csr=csr, spiffe_id=spiffe_id, common_name=segments[-1], not_before=not_before,
                              not_after=not_after)
        leaf = build_leaf(request, Issuer(self.intermediate, self._intermediate_key))
        issued = IssuedCertificate(cert_pem=_pem(leaf), chain_pem=_pem(leaf) + self.intermediate_pem,
                                   not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
                                   serial=serial_hex(leaf))
        append_record(self.ca_dir, IssuedRecord(host=host, proxy=proxy, spiffe_id=spiffe_id, serial=issued.serial,
                                                not_before=issued.not_before, not_after=issued.not_after,
                                                issued_at=now))
        structlog.get_logger().info("leaf_signed", host=host, proxy=proxy, spiffe_id=spiffe_id,
                                    serial=issued.serial, not_after=issued.not_after.isoformat())
        return issued

    def needs_renewal(self, cert_pem: bytes, now: datetime | None = None) -> bool:
        """leaf_needs_renewal against this CA's root and intermediate."""
        return leaf_needs_renewal(cert_pem, now, self.root_pem, self.intermediate_pem)

    def controller_issuer(self, create: bool = True) -> ControllerIssuer | None:
        """The controllers' intermediate (`controller-intermediate.{pem,key}` beside the CA's own, key 0600),
        made once by the root when `create`; None when it does not exist and `create` is False (check mode)."""
        cert_path = os.path.join(self.ca_dir, CONTROLLER_CERT)
        key_path = os.path.join(self.ca_dir, CONTROLLER_KEY)
        if not os.path.lexists(key_path):
            if not create:
                return None
            root_key = _read_key(self.ca_dir, ROOT_KEY, "the root key")
            key = new_ca_key()
            cert = build_intermediate(Issuer(self.root, root_key), key, self.trust_domain, datetime.now(UTC))
            write_atomic(cert_path, _pem(cert), PUBLIC_FILE)  # the certificate first: a key alone is never read
            write_atomic(key_path, _key_pem(key), PRIVATE_FILE)
            structlog.get_logger().info("controller_intermediate_created", ca_dir=self.ca_dir,
                                        serial=serial_hex(cert))
        require_private(key_path, "the controller intermediate key")
        cert = _read_cert(self.ca_dir, CONTROLLER_CERT, "the controller intermediate certificate")
        key = _read_key(self.ca_dir, CONTROLLER_KEY, "the controller intermediate key")
        if key.public_key() != cert.public_key() or not chains_to(_pem(cert), self.root_pem):
            raise MeshError(f"the controller intermediate in {self.ca_dir} is corrupt: it does not match its key "
                            "or the root", "move controller-intermediate.* away: the next deploy makes a new one")
        return ControllerIssuer(_pem(cert), _key_pem(key))

    def issued(self) -> list[IssuedRecord]:
        """Every leaf recorded in issued.json, oldest first."""
        return read_records(self.ca_dir)


def _create(state_dir: str, trust_domain: str) -> bool:
    """Make the CA in a private temp folder, then rename it into place: a reader never sees half a CA, and of
    two concurrent creators one wins (False for the other)."""
    os.makedirs(state_dir, exist_ok=True)
    building = tempfile.mkdtemp(prefix=".ca-", dir=state_dir)  # mode 0700
    try:
        os.chmod(building, PRIVATE_DIR)
        _write_ca(building, trust_domain, datetime.now(UTC))
        try:
            os.rename(building, os.path.join(state_dir, CA_FOLDER))
        except OSError:
            if os.path.isdir(os.path.join(state_dir, CA_FOLDER)):
                return False  # another process made it first
            raise
    finally:
        if os.path.lexists(building):
            shutil.rmtree(building)
    sync_dir(state_dir)
    structlog.get_logger().info("ca_created", state_dir=state_dir, trust_domain=trust_domain)
    if protect_keys(state_dir):
        structlog.get_logger().info("ca_keys_git_ignored", gitignore=os.path.join(state_dir, GITIGNORE))
    return True


def _write_ca(folder: str, trust_domain: str, now: datetime) -> None:
    root_key, intermediate_key = new_ca_key(), new_ca_key()
    root = build_root(root_key, trust_domain, now)
    intermediate = build_intermediate(Issuer(root, root_key), intermediate_key, trust_domain, now)
    write_atomic(os.path.join(folder, ROOT_KEY), _key_pem(root_key), PRIVATE_FILE)
    write_atomic(os.path.join(folder, INTERMEDIATE_KEY), _key_pem(intermediate_key), PRIVATE_FILE)
    write_atomic(os.path.join(folder, ROOT_CERT), _pem(root), PUBLIC_FILE)
    write_atomic(os.path.join(folder, INTERMEDIATE_CERT), _pem(intermediate), PUBLIC_FILE)
    meta = {"format": 1, "trust_domain": trust_domain, "created": now.isoformat()}
    write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=2).encode() + b"\n", PUBLIC_FILE)


def _read_trust_domain(ca_dir: str) -> str:
    path = os.path.join(ca_dir, META_FILE)
    try:
        value = json.loads(read_file(path, "the CA's record"))["trust_domain"]
    except (ValueError, KeyError, TypeError):
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {path} does not name its trust domain") from None
    if not isinstance(value, str):
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {path} does not name its trust domain")
    return value


def _read_cert(ca_dir: str, name: str, what: str) -> x509.Certificate:
    path = os.path.join(ca_dir, name)
    try:
        return load_chain(read_file(path, what))[0]
    except MeshError as exc:
        if "PEM" not in exc.message:
            raise
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {what} {path} is not a PEM certificate") from None


def _read_key(ca_dir: str, name: str, what: str) -> CAKey:
    path = os.path.join(ca_dir, name)
    try:
        key = serialization.load_pem_private_key(read_file(path, what), password=None)
    except (ValueError, TypeError):
        # the exception text could quote the file: say only where it is
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {what} {path} is not a PEM key") from None
    if not isinstance(key, CAKey):
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {what} {path} is not an EC key")
    return key
