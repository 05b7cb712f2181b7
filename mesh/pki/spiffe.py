"""SPIFFE IDs as the CA accepts them in a leaf: `spiffe://<trust domain>/<path>` (the SPIFFE ID spec).

It owns parsing and the trust-domain check; it must not build certificates.
"""

from __future__ import annotations

import re

from mesh.errors import MeshError

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_PREFIX = "spiffe://"


def spiffe_path(spiffe_id: str, trust_domain: str) -> tuple[str, ...]:
    """The path segments of spiffe_id; MeshError unless it is a valid SPIFFE ID inside trust_domain."""
    if not spiffe_id.startswith(_PREFIX):
        raise MeshError(f"{spiffe_id!r} is not a SPIFFE ID (expected spiffe://{trust_domain}/...)")
    domain, slash, path = spiffe_id[len(_PREFIX):].partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise MeshError(f"{spiffe_id!r}: the trust domain may hold only a-z, 0-9, '.', '-' and '_'")
    if domain != trust_domain:
        raise MeshError(f"{spiffe_id!r} is outside this CA's trust domain {trust_domain!r}; refusing to sign")
    segments = tuple(path.split("/")) if slash else ()
    if not segments or any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise MeshError(f"{spiffe_id!r}: a workload SPIFFE ID needs a path of segments of A-Z, a-z, 0-9, "
                        "'.', '-' and '_' (no empty, '.' or '..' segment, no query or fragment)")
    return segments
