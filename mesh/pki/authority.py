"""The mesh CA (Citadel's job): a root and an intermediate in `<state_dir>/ca/` (mesh's own, or an intermediate
brought by its owner), made once, loaded at its rotation phase (mesh/pki/phases.py), and signing workload CSRs into
SPIFFE leaves. Keys stay in that folder: never logged, returned or pushed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from cryptography import x509

from mesh.errors import MeshError
from mesh.pki.byo import GivenCA
from mesh.pki.certs import Issuer, LeafRequest, build_leaf, checked_csr, leaf_validity
from mesh.pki.files import PRIVATE_DIR, read_file, require_private, sync_dir
from mesh.pki.leaf import fingerprint, is_ca, leaf_needs_renewal, load_chain, serial_hex, signed_by
from mesh.pki.ledger import IssuedRecord, append_record, read_records
from mesh.pki.material import (
    CONTROLLER_CERT,
    CONTROLLER_KEY,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    META_FILE,
    ROOT_CERT,
    ROOT_KEY,
    ControllerIssuer,
    Material,
    pem,
    read_material,
    write_given,
    write_own,
)
from mesh.pki.phases import NEXT_FOLDER, Phase, archived_folders, read_phase
from mesh.pki.spiffe import spiffe_path
from mesh.pki.vcs import GITIGNORE, protect_keys

__all__ = ["CA_FOLDER", "CONTROLLER_CERT", "CONTROLLER_KEY", "INTERMEDIATE_CERT", "INTERMEDIATE_KEY", "META_FILE",
           "ROOT_CERT", "ROOT_KEY", "CertificateAuthority", "ControllerIssuer", "IssuedCertificate"]

CA_FOLDER = "ca"


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed leaf: cert_pem is the leaf alone, chain_pem the leaf then the intermediate (and, for a CA brought
    to mesh, the intermediate's own issuers below the root): what Envoy serves."""

    cert_pem: bytes
    chain_pem: bytes
    not_before: datetime
    not_after: datetime
    serial: str


@dataclass(frozen=True)
class CertificateAuthority:
    """The loaded CA at its rotation phase. `ensure(state_dir, trust_domain)` makes or finds it; `sign(...)`
    issues leaves with the phase's intermediate; `bundle_pem` is the phase's trust bundle (one root, or two
    during a rotation)."""

    state_dir: str
    trust_domain: str
    signing: Material = field(repr=False)
    trusted: tuple[x509.Certificate, ...] = field(repr=False)
    phase: Phase = "idle"

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.state_dir, CA_FOLDER)

    @property
    def root(self) -> x509.Certificate:
        """The root the signing intermediate chains to."""
        return self.signing.root

    @property
    def intermediate(self) -> x509.Certificate:
        return self.signing.intermediate

    @property
    def brought(self) -> bool:
        """The signing intermediate was brought by its owner: mesh holds no root key."""
        return self.signing.brought

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def intermediate_pem(self) -> bytes:
        return _pem(self.intermediate)

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root)

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle every proxy, the checker and the controllers get at this phase."""
        return b"".join(_pem(cert) for cert in self.trusted)

    @property
    def bundle_fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(cert) for cert in self.trusted)

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
    def bring(cls, state_dir: str, trust_domain: str, given: GivenCA) -> CertificateAuthority:
        """A CA from the owner's intermediate (checked by byo.check_given_ca) in state_dir, with the controllers'
        intermediate made under it; MeshError when state_dir already has a CA."""
        state_dir = os.path.abspath(state_dir)
        if os.path.lexists(os.path.join(state_dir, CA_FOLDER)):
            raise MeshError(f"{os.path.join(state_dir, CA_FOLDER)} already holds a mesh CA: refusing to replace it",
                            "to move an existing CA to your own intermediate, run `mesh ca rotate start INVENTORY "
                            "--intermediate CERT KEY --root ROOT_CERT`")
        if not _create(state_dir, trust_domain, given):
            raise MeshError(f"another process made a CA in {state_dir} at the same time")
        return cls.load(state_dir)

    @classmethod
    def load(cls, state_dir: str) -> CertificateAuthority:
        """The CA in state_dir at its rotation phase; MeshError if absent, incomplete, corrupt, or a key others
        may read."""
        state_dir = os.path.abspath(state_dir)
        ca_dir = os.path.join(state_dir, CA_FOLDER)
        if not os.path.isdir(ca_dir):
            raise MeshError(f"no mesh CA in {state_dir}", "run `mesh ca init` (or a deploy) to make one")
        require_private(ca_dir, "the CA folder")
        phase = read_phase(ca_dir)  # first: an interrupted finish is named as such, not as a corrupt CA
        current = read_material(ca_dir)
        if phase == "idle":
            return cls(state_dir, current.trust_domain, current, (current.root,), phase)
        upcoming = read_material(os.path.join(ca_dir, NEXT_FOLDER))
        trusted = (current.root,) if fingerprint(current.root) == fingerprint(upcoming.root) \
            else (current.root, upcoming.root)
        return cls(state_dir, current.trust_domain, current if phase == "start" else upcoming, trusted, phase)

    def next_material(self) -> Material | None:
        """The material a rotation brings (None when no rotation is under way)."""
        if self.phase == "idle":
            return None
        return read_material(os.path.join(self.ca_dir, NEXT_FOLDER))

    def archived_roots(self) -> tuple[x509.Certificate, ...]:
        """The roots of finished rotations (archive/*/root.pem), oldest first."""
        found = []
        for folder in archived_folders(self.ca_dir):
            path = os.path.join(folder, ROOT_CERT)
            if os.path.exists(path):
                found += load_chain(read_file(path, "an archived root"))[:1]
        return tuple(found)

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl: timedelta, host: str, proxy: str,
             now: datetime | None = None, dns_names: tuple[str, ...] = ()) -> IssuedCertificate:
        """A leaf for the CSR's key with exactly one URI SAN, spiffe_id, and the DNS SANs dns_names (a proxy's
        node id; the CSR's own names are ignored), valid from a little before now (certs.backdate: 5 minutes, at most ttl/10) for ttl (never past the
        intermediate), signed by the phase's intermediate; recorded."""
        segments = spiffe_path(spiffe_id, self.trust_domain)
        if ttl <= timedelta(0):
            raise MeshError(f"a certificate lifetime must be positive, got {ttl}")
        csr = checked_csr(csr_pem)
        now = now or datetime.now(UTC)
        not_before, not_after = leaf_validity(now, ttl, self.intermediate.not_valid_after_utc)
        request = LeafRequest(csr=csr, spiffe_id=spiffe_id, common_name=segments[-1], not_before=not_before,
                              not_after=not_after, dns_names=dns_names)
        leaf = build_leaf(request, Issuer(self.intermediate, self.signing.key))
        issued = IssuedCertificate(cert_pem=_pem(leaf), chain_pem=_pem(leaf) + self.signing.chain_pem,
                                   not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
                                   serial=serial_hex(leaf))
        append_record(self.ca_dir, IssuedRecord(host=host, proxy=proxy, spiffe_id=spiffe_id, serial=issued.serial,
                                                not_before=issued.not_before, not_after=issued.not_after,
                                                issued_at=now))
        structlog.get_logger().info("leaf_signed", host=host, proxy=proxy, spiffe_id=spiffe_id,
                                    serial=issued.serial, not_after=issued.not_after.isoformat())
        return issued

    def signers(self) -> tuple[x509.Certificate, ...]:
        """The intermediates that sign leaves at this phase: the deploy's and (once made) the controllers'."""
        controllers = self.signing.controller_cert()
        return (self.intermediate,) if controllers is None else (self.intermediate, controllers)

    def issued_here(self, cert_pem: bytes) -> bool:
        """Whether the first certificate of cert_pem was signed by one of this phase's signers, or by a CA of its
        own chain that the phase's root (a brought CA: its intermediate) signed (a controllers' intermediate)."""
        try:
            certs = load_chain(cert_pem)
        except MeshError:
            return False
        leaf = certs[0]
        if any(signed_by(leaf, signer) for signer in self.signers()):
            return True
        above = self.intermediate if self.brought else self.root
        return any(is_ca(middle) and signed_by(middle, above) and signed_by(leaf, middle) for middle in certs[1:])

    def needs_renewal(self, cert_pem: bytes, now: datetime | None = None) -> bool:
        """leaf_needs_renewal (unreadable, past half its lifetime), or not signed by this phase's signers: a
        rotation's `switch` re-issues every leaf of the old intermediates."""
        return leaf_needs_renewal(cert_pem, now) or not self.issued_here(cert_pem)

    def controller_issuer(self, create: bool = True) -> ControllerIssuer | None:
        """The controllers' intermediate of the phase (`controller-intermediate.{pem,key}` beside the signing
        intermediate, key 0600), made once when `create` (under the root mesh made, or under a brought
        intermediate); None when it does not exist and `create` is False (check mode)."""
        return self.signing.controller_issuer(create)

    def issued(self) -> list[IssuedRecord]:
        """Every leaf recorded in issued.json, oldest first."""
        return read_records(self.ca_dir)


def _create(state_dir: str, trust_domain: str, given: GivenCA | None = None) -> bool:
    """Make the CA (mesh's own, or from a `given` intermediate) in a private temp folder, then rename it into
    place: a reader never sees half a CA, and of two concurrent creators one wins (False for the other)."""
    os.makedirs(state_dir, exist_ok=True)
    building = tempfile.mkdtemp(prefix=".ca-", dir=state_dir)  # mode 0700
    try:
        os.chmod(building, PRIVATE_DIR)
        if given is None:
            write_own(building, trust_domain, datetime.now(UTC))
        else:
            write_given(building, trust_domain, given, datetime.now(UTC), with_controllers=True)
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
    structlog.get_logger().info("ca_created", state_dir=state_dir, trust_domain=trust_domain,
                                brought=given is not None)
    if protect_keys(state_dir):
        structlog.get_logger().info("ca_keys_git_ignored", gitignore=os.path.join(state_dir, GITIGNORE))
    return True


def _pem(cert: x509.Certificate) -> bytes:
    return pem(cert)
