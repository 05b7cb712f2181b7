"""The controller's own serving certificate (the span receiver's): a P-256 key made here in memory, a CSR, a leaf
for controller_spiffe_id(trust_domain) signed by the controller's intermediate (mesh.controller.rotation's Signer),
so proxies check it against the trust bundle and that one SPIFFE ID.

Renewed once past half its life, and re-signed when the intermediate's file changes (a CA switch or rotation
writes a new one). The key never leaves the process: not written, not logged, not in any repr.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config.tracing import CONTROLLER_SERVER_NAME
from mesh.controller.rotation import Signer, load_signer
from mesh.controller.spec import INTERMEDIATE_CERT, INTERMEDIATE_KEY
from mesh.errors import MeshError
from mesh.inventory.model import controller_spiffe_id

RETRY_AFTER = timedelta(minutes=1)  # a renewal that failed is tried again this much later


@dataclass(frozen=True)
class ServingCert:
    """A certificate to serve with: chain (leaf, then the intermediates) and its key, both PEM."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    serial: str
    issued_at: datetime
    not_after: datetime

    @property
    def renew_at(self) -> datetime:
        """Half way from its signing to its end."""
        return self.issued_at + (self.not_after - self.issued_at) / 2


class CertSource(Protocol):
    def current(self) -> ServingCert:
        """The certificate to serve with now; MeshError when there is none."""
        ...


class ControllerCertificate:
    """The controller's serving certificate, made on first use and kept current (thread-safe)."""

    def __init__(self, trust_domain: str, ttl_s: int, intermediate_cert: str = INTERMEDIATE_CERT,
                 intermediate_key: str = INTERMEDIATE_KEY,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 signer: Callable[[str, str, str], Signer] = load_signer) -> None:
        self.trust_domain, self.ttl = trust_domain, timedelta(seconds=ttl_s)
        self.intermediate_cert, self.intermediate_key = intermediate_cert, intermediate_key
        self.now, self.load_signer = now, signer
        self.log = structlog.get_logger()
        self._lock = threading.Lock()
        self._cert: ServingCert | None = None
        self._signed_with: tuple[int, int, int] | None = None  # the intermediate file's (inode, size, mtime)
        self._retry_at = datetime.min.replace(tzinfo=UTC)  # after a failed renewal: not before this

    def current(self) -> ServingCert:
        with self._lock:
            now = self.now()
            stamp = self._stamp()
            cert = self._cert
            if cert is not None and now < cert.not_after and (
                    now < self._retry_at or (now < cert.renew_at and stamp == self._signed_with)):
                return cert
            try:
                self._cert, self._signed_with = self._issue(now), stamp
            except MeshError as exc:
                if cert is not None and now < cert.not_after:
                    self.log.error("controller_certificate_not_renewed", error=str(exc),
                                   effect="the current certificate is served until it expires",
                                   not_after=cert.not_after.isoformat())
                    self._retry_at = now + RETRY_AFTER
                    return cert
                raise
            reason = "first" if cert is None else "intermediate changed" if stamp != self._signed_with else "due"
            self.log.info("controller_certificate_issued", spiffe_id=controller_spiffe_id(self.trust_domain),
                          serial=self._cert.serial, not_after=self._cert.not_after.isoformat(), reason=reason)
            return self._cert

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.intermediate_cert)
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def _issue(self, now: datetime) -> ServingCert:
        signer = self.load_signer(self.trust_domain, self.intermediate_cert, self.intermediate_key)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controller")]))
               .sign(key, hashes.SHA256()))
        # the SNI proxies send (controller.<trust domain>) as a DNS name too: gRPC's TLS matches SNI to it
        leaf = signer.sign(csr.public_bytes(serialization.Encoding.PEM), controller_spiffe_id(self.trust_domain),
                           self.ttl, now, dns_names=(CONTROLLER_SERVER_NAME.format(trust_domain=self.trust_domain),))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return ServingCert(leaf.chain_pem, key_pem, leaf.serial, now, leaf.not_after)
