"""The `mesh ca` commands: find the state folder and trust domain (inventory or options), call the CA once,
print. No PKI here (mesh/pki/ does it), and never a key: only certificates, serials and fingerprints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import click
from cryptography import x509
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.table import Table

from mesh.errors import UsageError
from mesh.inventory.model import MeshSettings
from mesh.pki import CertificateAuthority, IssuedRecord, fingerprint
from mesh.pki.leaf import serial_hex

QUARTER = 0.25
PIPE_WIDTH = 160  # rich wraps at 80 columns when stdout is not a terminal; rows of this table are wider


@dataclass(frozen=True)
class CATarget:
    """Where the CA lives and which trust domain it serves."""

    state_dir: str
    trust_domain: str


def resolve_target(inventory: str | None, state_dir: str | None, trust_domain: str | None) -> CATarget:
    """From the inventory (its mesh_state_dir and mesh_trust_domain), or else the options, or the defaults."""
    if inventory is not None:
        if state_dir is not None or trust_domain is not None:
            raise UsageError("give an INVENTORY or --state-dir/--trust-domain, not both",
                             "the inventory's mesh_state_dir and mesh_trust_domain say where the CA is")
        from mesh.inventory.loader import load_inventory
        from mesh.inventory.validate import build_mesh

        settings = build_mesh(load_inventory(inventory), inventory).settings
        return CATarget(settings.state_dir, settings.trust_domain)
    defaults = MeshSettings()
    if trust_domain is not None:
        from mesh.inventory.values import BadValue, check_trust_domain

        try:
            check_trust_domain(trust_domain)
        except BadValue as exc:
            raise UsageError(f"--trust-domain: {exc}") from None
    return CATarget(state_dir or defaults.state_dir, trust_domain or defaults.trust_domain)


_INVENTORY = click.argument("inventory", required=False)
_STATE_DIR = click.option("--state-dir", default=None, help="The CA's state folder when no INVENTORY is given "
                          "[default: .mesh].")


@click.group()
def ca() -> None:
    """mesh's certificate authority: a root and an intermediate (ECDSA P-256) in mesh_state_dir/ca/."""


@ca.command("init")
@_INVENTORY
@_STATE_DIR
@click.option("--trust-domain", default=None, help="SPIFFE trust domain when no INVENTORY is given "
              "[default: mesh.local].")
def init(inventory: str | None, state_dir: str | None, trust_domain: str | None) -> None:
    """Make the mesh CA unless it exists; print the root's fingerprint."""
    target = resolve_target(inventory, state_dir, trust_domain)
    authority, created = CertificateAuthority.ensure(target.state_dir, target.trust_domain)
    verb = "created" if created else "found existing"
    click.echo(f"{verb} mesh CA in {authority.ca_dir} (trust domain {authority.trust_domain})")
    click.echo(f"root SHA-256 fingerprint: {authority.root_fingerprint}")


@ca.command("show")
@_INVENTORY
@_STATE_DIR
def show(inventory: str | None, state_dir: str | None) -> None:
    """List the root, the intermediate and every issued leaf with its expiry and the time left."""
    target = resolve_target(inventory, state_dir, None)
    authority = CertificateAuthority.load(target.state_dir)
    click.echo(f"mesh CA in {authority.ca_dir} (trust domain {authority.trust_domain})")
    click.echo(f"root SHA-256 fingerprint: {fingerprint(authority.root)}")
    console = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)
    console.print(ca_table(authority, datetime.now(UTC)))


@dataclass(frozen=True)
class Row:
    """One line of `mesh ca show`."""

    kind: str
    name: str
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    superseded: bool = False


def ca_rows(authority: CertificateAuthority) -> list[Row]:
    """Root, intermediate, then the issued leaves by host and proxy, oldest first."""
    rows = [Row(kind, _common_name(cert), "", serial_hex(cert), cert.not_valid_before_utc, cert.not_valid_after_utc)
            for kind, cert in (("root", authority.root), ("intermediate", authority.intermediate))]
    records = sorted(authority.issued(), key=lambda r: (r.host, r.proxy, r.issued_at))
    return rows + [_leaf_row(record, records) for record in records]


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _leaf_row(record: IssuedRecord, records: list[IssuedRecord]) -> Row:
    newer = any(other.host == record.host and other.proxy == record.proxy and other.issued_at > record.issued_at
                for other in records)
    return Row("leaf", f"{record.host} {record.proxy}", record.spiffe_id, record.serial, record.not_before,
               record.not_after, superseded=newer)


def row_state(row: Row, now: datetime) -> str:
    """`EXPIRED`, `UNDER 1/4 LEFT`, `superseded` (a newer leaf went to the same proxy) or `ok`."""
    if row.not_after <= now:
        return "EXPIRED"
    if row.superseded:
        return "superseded"
    lifetime = (row.not_after - row.not_before).total_seconds()
    if lifetime > 0 and (row.not_after - now).total_seconds() / lifetime < QUARTER:
        return "UNDER 1/4 LEFT"
    return "ok"


def remaining_text(delta: timedelta) -> str:
    """Time left, coarse: `3649d 23h`, `11h 59m`, `4m`; `-` once past."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


_STYLES = {"EXPIRED": "bold red", "UNDER 1/4 LEFT": "yellow", "superseded": "dim", "ok": "green"}


def ca_table(authority: CertificateAuthority, now: datetime) -> Table:
    table = Table(title=None)
    for column in ("kind", "name", "SPIFFE ID", "serial", "expires (UTC)", "left", "state"):
        table.add_column(column, no_wrap=column in ("serial", "SPIFFE ID", "expires (UTC)"))
    for row in ca_rows(authority):
        state = row_state(row, now)
        table.add_row(row.kind, row.name, row.spiffe_id, row.serial, row.not_after.strftime("%Y-%m-%d %H:%M"),
                      remaining_text(row.not_after - now), f"[{_STYLES[state]}]{state}[/]")
    return table
