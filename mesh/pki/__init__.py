"""mesh's certificate authority (Citadel's job): the CA in `<state_dir>/ca/`, signing CSRs into SPIFFE leaves,
and reading leaves back for renewal. Private keys of workloads never come here; the CA's own never leave.
"""

from mesh.pki.authority import CertificateAuthority, IssuedCertificate
from mesh.pki.leaf import (
    LeafInfo,
    chains_to,
    fingerprint,
    leaf_dns_names,
    leaf_info,
    leaf_needs_renewal,
    leaf_remaining_fraction,
)
from mesh.pki.ledger import IssuedRecord

__all__ = [
    "CertificateAuthority", "IssuedCertificate", "IssuedRecord", "LeafInfo", "chains_to", "fingerprint",
    "leaf_dns_names", "leaf_info", "leaf_needs_renewal", "leaf_remaining_fraction",
]
