"""Client certificates for probing a mesh from outside: leaves signed by the mesh CA's own intermediate with
any SPIFFE ID (inside or outside the trust domain), bypassing the CA's ledger. End-to-end tests only.

It reads the CA's intermediate key from `<state_dir>/ca/` on the machine running mesh; it must never write
there, and the leaves it makes must be removed by whoever asked for them.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.pki.certs import CLOCK_SKEW, Issuer, LeafRequest, build_leaf
from mesh.testing.health_endpoint import LeafFiles

PROBE_LIFETIME = datetime.timedelta(hours=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class MeshCAProbeIssuer:
    """Signs probe leaves with the mesh CA's intermediate, as the CA would, but with no trust-domain check
    and no record in issued.json: `mesh ca sign` refuses a foreign SPIFFE ID, and a probe is no workload."""

    def __init__(self, state_dir: str | Path) -> None:
        ca_dir = Path(state_dir) / "ca"
        self.root_file = ca_dir / "root.pem"
        self.intermediate = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "intermediate.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"the mesh intermediate key is a {type(key).__name__}, not an EC key")
        self._issuer = Issuer(self.intermediate, key)

    def issue(self, spiffe_id: str, directory: Path, name: str, dns_names: tuple[str, ...] = ()) -> LeafFiles:
        """`<name>.pem` (leaf then intermediate, as Envoy presents it) and `<name>-key.pem` (0600) under
        directory; `ca` is the mesh root. dns_names: DNS SANs, such as a proxy's node id."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()))
        now = datetime.datetime.now(datetime.UTC)
        request = LeafRequest(csr=csr, spiffe_id=spiffe_id, common_name=name, not_before=now - CLOCK_SKEW,
                              not_after=now + PROBE_LIFETIME, dns_names=dns_names)
        leaf = build_leaf(request, self._issuer)
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                              + self.intermediate.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(_pem_key(key))
        return LeafFiles(cert_file, key_file, self.root_file)
