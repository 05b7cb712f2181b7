"""Renewing the certificates of one host's identities through its link: `csr NAME`, sign, `install NAME VERSION`,
record the leaf. It owns the order and the retry of a failed renewal; when a leaf is due is rotation.py's.

Never logs key material: only names, serials and times travel into the logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import consul
import structlog

from mesh.controller.consul_watch import backoff_s
from mesh.controller.protocol import CertState, CtlProtocolError, command, parse_installed, parse_pending
from mesh.controller.pusher import HostLink, MayPush
from mesh.controller.rotation import SignedLeaf, Signer, renewal_due
from mesh.controller.spec import ControllerSpec, IdentitySpec
from mesh.controller.transport import TransportError
from mesh.errors import MeshError

Record = Callable[[str, IdentitySpec, SignedLeaf, datetime], None]  # (host, identity, leaf, issued_at)


class Renewer:
    """Renews every due identity of a host (call `renew(link, may_push)` from the host's push task)."""

    def __init__(self, spec: ControllerSpec, signer: Signer, record: Record,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.signer = signer
        self.record = record
        self.now = now
        self.clock = clock
        self.failures: dict[tuple[str, str], int] = {}
        self.retry_at: dict[tuple[str, str], float] = {}
        self.log = structlog.get_logger()

    def due(self, host: str, identities: tuple[IdentitySpec, ...],
            certs: Mapping[str, CertState | None]) -> list[IdentitySpec]:
        """The host's identities to renew now: listed by the host, due, and not waiting after a failure."""
        now = self.now()
        return [identity for identity in identities if identity.name in certs
                and renewal_due(certs[identity.name], now, self.spec.cert_ttl_s, self.spec.renew_fraction)
                and self.clock() >= self.retry_at.get((host, identity.name), float("-inf"))]

    def renew(self, link: HostLink, may_push: MayPush) -> None:
        state = link.state
        if state is None:
            return
        for identity in self.due(link.spec.name, link.spec.identities, state.certs):
            if not may_push():
                return
            self._renew_one(link, identity)

    def _renew_one(self, link: HostLink, identity: IdentitySpec) -> None:
        host, key = link.spec.name, (link.spec.name, identity.name)
        try:
            asked = link.run(command("csr", identity.name))
            if asked.exit_code != 0:
                raise MeshError(f"mesh-ctl csr exited {asked.exit_code}: {_tail(asked.stderr)}")
            version, csr_pem = parse_pending(asked.stdout)
            issued_at = self.now()
            leaf = self.signer.sign(csr_pem, identity.spiffe_id, timedelta(seconds=self.spec.cert_ttl_s), issued_at,
                                    dns_names=leaf_dns_names_of(identity))
            installed = link.run(command("install", identity.name, version), leaf.chain_pem)
            if installed.exit_code != 0:
                raise MeshError(f"mesh-ctl install exited {installed.exit_code}: {_tail(installed.stderr)}")
            serial = parse_installed(installed.stdout, identity.name)
        except (TransportError, CtlProtocolError, MeshError) as exc:
            failures = self.failures.get(key, 0) + 1
            self.failures[key] = failures
            self.retry_at[key] = self.clock() + backoff_s(failures)
            self.log.error("certificate_renewal_failed", host=host, identity=identity.name, error=str(exc),
                           failures=failures)
            return
        self.failures.pop(key, None)
        self.retry_at.pop(key, None)
        if link.state is not None:
            link.state.certs[identity.name] = CertState(serial, leaf.not_before, leaf.not_after)
        self.log.info("certificate_renewed", host=host, identity=identity.name, serial=serial,
                      not_after=leaf.not_after.isoformat())
        try:
            self.record(host, identity, leaf, issued_at)
        except (consul.ConsulException, MeshError, OSError) as exc:  # installed: reported, not undone
            self.log.warning("certificate_record_failed", host=host, identity=identity.name, serial=leaf.serial,
                             error=str(exc))


def leaf_dns_names_of(identity: IdentitySpec) -> tuple[str, ...]:
    """The DNS SANs of an identity's leaf: a proxy's node id; none for the checker (or a spec without node ids)."""
    return (identity.node_id,) if identity.node_id else ()


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[:1000]
