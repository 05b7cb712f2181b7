"""What `mesh authz deny` writes: the sources it adds to (or with --undo removes from) a service's run-time deny,
checked against the inventory first (a usage error, exit 5, before Consul is asked). The check-and-set write and
the wait are mesh.runtime_kv's; the words the command prints are commands.py's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from mesh import runtime_kv
from mesh.authz.kv import AuthzStore, encode_deny, is_empty
from mesh.errors import UsageError
from mesh.inventory.model import Mesh, health_checker_spiffe_id
from mesh.inventory.policy import UNAUTHENTICATED, AuthzOverride
from mesh.inventory.services import check_authz_override
from mesh.suggest import did_you_mean

Make = Callable[[AuthzOverride | None], AuthzOverride | None]
Written = runtime_kv.Written[AuthzOverride]


def known_service(mesh: Mesh, service: str, what: str = "service") -> str:
    """`service` when the inventory has it; a UsageError with a did-you-mean otherwise."""
    if service not in mesh.services:
        raise UsageError(f"no {what} {service!r} in the inventory", did_you_mean(service, sorted(mesh.services)))
    return service


def known_source(mesh: Mesh, source: str, runtime_deny: bool = False) -> str:
    """A source of a request: a service of the inventory, a SPIFFE id of the trust domain, or `unauthenticated`;
    a UsageError otherwise. A run-time deny names neither `unauthenticated` nor the checker's id."""
    trust_domain = mesh.settings.trust_domain
    if source == UNAUTHENTICATED:
        if runtime_deny:
            raise UsageError("`unauthenticated` cannot be denied at run time: plaintext clients reach only a "
                             "permissive service", "set its mtls to strict in the inventory instead")
        return source
    if source.startswith("spiffe://"):
        if not source.startswith(f"spiffe://{trust_domain}/"):
            raise UsageError(f"{source!r} is not in the trust domain {trust_domain}: its certificate does not chain "
                             "to the mesh CA")
        if runtime_deny and source == health_checker_spiffe_id(trust_domain):
            raise UsageError(f"{source!r} is mesh's health checker: it reaches only health chains")
        return source
    return known_service(mesh, source, "source service")


def new_revision() -> str:
    return uuid.uuid4().hex


def checked(mesh: Mesh, override: AuthzOverride) -> AuthzOverride:
    """The deny, once check_authz_override finds nothing wrong with it (else a UsageError naming every problem)."""
    problems = check_authz_override(override, tuple(mesh.services), mesh.settings.trust_domain)
    if problems:
        raise UsageError("; ".join(problems))
    return override


def with_denied(mesh: Mesh, sources: Sequence[str]) -> Make:
    """`mesh authz deny DST --from SRC`: the stored sources and these."""
    def make(current: AuthzOverride | None) -> AuthzOverride:
        before = set(current.deny_from) if current is not None else set()
        if before.issuperset(sources):
            raise runtime_kv.Unchanged(f"{', '.join(sources)} {'is' if len(sources) == 1 else 'are'} denied already")
        return checked(mesh, AuthzOverride(tuple(sorted(before | set(sources))), new_revision()))
    return make


def without_denied(sources: Sequence[str]) -> Make:
    """`mesh authz deny DST --undo [--from SRC]`: the stored sources but these (every one when none is given)."""
    def make(current: AuthzOverride | None) -> AuthzOverride | None:
        if current is None:
            return None  # nothing stored (Unchanged), or a value mesh cannot read: removed
        if sources and not set(sources) & set(current.deny_from):
            raise runtime_kv.Unchanged(f"{', '.join(sources)} {'is' if len(sources) == 1 else 'are'} not denied")
        left = tuple(source for source in current.deny_from if sources and source not in sources)
        return AuthzOverride(left, new_revision()) if left else None
    return make


def update(store: AuthzStore, service: str, make: Make, who: str, now: Callable[[], datetime]) -> Written:
    """Check-and-set the service's run-time deny (mesh.runtime_kv.update); Unchanged when there is nothing to do."""
    return runtime_kv.update(store, service, make, encode_deny, is_empty, who, now)
