"""The `mesh ca` commands: find the state folder and trust domain (inventory or options), call the CA once,
print; `check` reads the hosts' certificates through deploy/hostcerts.py and judges them with pki/expiry.py,
then lists the newest leaf issued to each proxy: from the state dir's ledger (deploys) and from the records the
controllers keep in Consul KV (mesh.controller.spec.issued_prefix).
No PKI here (mesh/pki/ does it), and never a key: only certificates, serials and fingerprints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import click
from cryptography import x509
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.table import Table

from mesh.ca_rotation import GivenFiles
from mesh.cli_inventory import fleet_inventory, inventory_argument, inventory_option
from mesh.deploy.hostcerts import CertFile, HostFiles, all_cert_files, read_hosts
from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, MeshError, UsageError
from mesh.hosts.connection import Connector
from mesh.inventory.model import ManagedHost, Mesh, MeshSettings
from mesh.pki import CertificateAuthority, IssuedRecord, fingerprint
from mesh.pki.authority import CA_FOLDER, ROOT_KEY
from mesh.pki.expiry import WARN_REMAINING, Expiry, Lifetime, judge, judge_pem, judge_times
from mesh.pki.leaf import load_chain, serial_hex
from mesh.pki.ledger import read_records
from mesh.pki.phases import Step
from mesh.pki.vcs import GITIGNORE, git_work_tree, key_in_git

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
    """mesh's certificate authority: a root and an intermediate (ECDSA P-256, or your own intermediate) in
    mesh_state_dir/ca/, rotated in phases by `mesh ca rotate`."""


_GIVEN = click.option("--intermediate", "intermediate", nargs=2, default=None, metavar="CERT KEY",
                      type=click.Path(dir_okay=False),
                      help="Your own intermediate (PEM, its chain below the root after it) and its key: mesh signs "
                           "with it and never needs the root key.")
_ROOT = click.option("--root", "root", default=None, metavar="ROOT_CERT", type=click.Path(dir_okay=False),
                     help="The root certificate the --intermediate chains to.")


@ca.command("init")
@_INVENTORY
@_STATE_DIR
@click.option("--trust-domain", default=None, help="SPIFFE trust domain when no INVENTORY is given "
              "[default: mesh.local].")
@_GIVEN
@_ROOT
def init(inventory: str | None, state_dir: str | None, trust_domain: str | None,
         intermediate: tuple[str, str] | None, root: str | None) -> None:
    """Make the mesh CA unless it exists; print the root's fingerprint. With --intermediate CERT KEY --root
    ROOT_CERT, the CA is your intermediate (checked: a CA, in date, chaining to the root, its key, name
    constraints, room for the controllers' intermediate under it)."""
    target = resolve_target(inventory, state_dir, trust_domain)
    if intermediate is None:
        if root is not None:
            raise UsageError("--root goes with --intermediate CERT KEY")
        authority, created = CertificateAuthority.ensure(target.state_dir, target.trust_domain)
        verb = "created" if created else "found existing"
    else:
        from mesh.ca_rotation import GivenFiles, read_given

        if root is None:
            raise UsageError("--intermediate needs --root ROOT_CERT: the root it chains to")
        given = read_given(GivenFiles(intermediate[0], intermediate[1], root), target.trust_domain, None)
        authority = CertificateAuthority.bring(target.state_dir, target.trust_domain, given)
        verb = "created from your intermediate the"
    click.echo(f"{verb} mesh CA in {authority.ca_dir} (trust domain {authority.trust_domain})")
    click.echo(f"root SHA-256 fingerprint: {authority.root_fingerprint}")
    if authority.brought:
        click.echo(f"signing intermediate SHA-256 fingerprint: {fingerprint(authority.intermediate)} (mesh holds "
                   "no root key)")


@ca.command("show")
@_INVENTORY
@_STATE_DIR
def show(inventory: str | None, state_dir: str | None) -> None:
    """List the root, the intermediate and every issued leaf with its expiry and the time left; warn when the
    root key is in a git work tree and not ignored."""
    target = resolve_target(inventory, state_dir, None)
    authority = CertificateAuthority.load(target.state_dir)
    click.echo(f"mesh CA in {authority.ca_dir} (trust domain {authority.trust_domain})")
    click.echo(f"root SHA-256 fingerprint: {fingerprint(authority.root)}")
    if authority.phase != "idle":
        click.echo(f"rotation under way, phase {authority.phase}: the bundle trusts "
                   + ", ".join(authority.bundle_fingerprints) + " (`mesh ca status INVENTORY` shows the hosts)")
    console = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)
    console.print(ca_table(authority, datetime.now(UTC)))
    root_key = os.path.join(authority.ca_dir, ROOT_KEY)
    if os.path.exists(root_key) and key_in_git(root_key):
        click.echo(f"[WARNING]: the root key {root_key} is inside the git work tree {git_work_tree(root_key)} and "
                   "git does not ignore it: whoever gets the repository can sign mesh certificates. Add "
                   f"`/ca/*.key` to {os.path.join(authority.state_dir, GITIGNORE)}; if it was ever committed, purge "
                   "it from the history and replace the CA on purpose (`mesh ca init`, then `mesh deploy "
                   "--replace-ca`)", err=True)


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
    """`EXPIRED`, `UNDER 1/3 LEFT` (the threshold of `mesh ca check` and `mesh status`), `superseded` (a newer
    leaf went to the same proxy) or `ok`."""
    if row.not_after <= now:
        return "EXPIRED"
    if row.superseded:
        return "superseded"
    lifetime = (row.not_after - row.not_before).total_seconds()
    if lifetime > 0 and (row.not_after - now).total_seconds() / lifetime < WARN_REMAINING:
        return "UNDER 1/3 LEFT"
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


_STYLES = {"EXPIRED": "bold red", "UNDER 1/3 LEFT": "yellow", "superseded": "dim", "ok": "green"}


def ca_table(authority: CertificateAuthority, now: datetime) -> Table:
    table = Table(title=None)
    for column in ("kind", "name", "SPIFFE ID", "serial", "expires (UTC)", "left", "state"):
        table.add_column(column, no_wrap=column in ("serial", "SPIFFE ID", "expires (UTC)"))
    for row in ca_rows(authority):
        state = row_state(row, now)
        table.add_row(row.kind, row.name, row.spiffe_id, row.serial, row.not_after.strftime("%Y-%m-%d %H:%M"),
                      remaining_text(row.not_after - now), f"[{_STYLES[state]}]{state}[/]")
    return table


# ---- mesh ca status and mesh ca rotate: the rotation phases (mesh/ca_rotation.py) -----------------------------

@ca.command("status")
@inventory_argument
@inventory_option
@click.pass_context
def status_command(ctx: click.Context, inventory_path: str | None, inventory_option: str | None) -> None:
    """The CA's rotation phase, the roots of the trust bundle, and every host's trust bundles, leaves and the
    controllers' intermediate against the phase. Exit 2 when one lags, 3 when a host is unreachable."""
    from mesh.ca_rotation import status
    from mesh.hosts.connection import connect

    ctx.exit(status(fleet_inventory(inventory_path, inventory_option), connect, sys.stdout))


@ca.group("rotate")
def rotate() -> None:
    """Rotate the CA under traffic, in three phases, each pushed to every host by a deploy and refused until the
    previous one reached every host: `start` (new root and intermediates; bundles trust both roots), `switch`
    (the new intermediates sign; every leaf re-issued), `finish` (bundles trust the new root only; the old
    material archived)."""


def _rotate(ctx: click.Context, step: Step, inventory_path: str | None, inventory_option: str | None,
            given: GivenFiles | None = None) -> None:
    from mesh.ca_rotation import rotate as run_step
    from mesh.deploy.command import DeployOptions, deploy
    from mesh.hosts.connection import connect

    ctx.exit(run_step(fleet_inventory(inventory_path, inventory_option), step, connect,
                      lambda inventory, factory: deploy(inventory, DeployOptions(), connector_factory=factory),
                      sys.stdout, given))


@rotate.command("start")
@inventory_argument
@inventory_option
@_GIVEN
@_ROOT
@click.pass_context
def rotate_start(ctx: click.Context, inventory_path: str | None, inventory_option: str | None,
                 intermediate: tuple[str, str] | None, root: str | None) -> None:
    """Make the next root and intermediates beside the current ones (or take your next --intermediate) and push
    trust bundles holding both roots to every proxy, the checker and the controllers."""
    if intermediate is None and root is not None:
        raise UsageError("--root goes with --intermediate CERT KEY")
    given = GivenFiles(intermediate[0], intermediate[1], root) if intermediate is not None else None
    _rotate(ctx, "start", inventory_path, inventory_option, given)


@rotate.command("switch")
@inventory_argument
@inventory_option
@click.pass_context
def rotate_switch(ctx: click.Context, inventory_path: str | None, inventory_option: str | None) -> None:
    """The next intermediates sign from now on (the deploy's and the controllers'): every leaf, the checker's
    included, is re-issued; bundles keep both roots."""
    _rotate(ctx, "switch", inventory_path, inventory_option)


@rotate.command("finish")
@inventory_argument
@inventory_option
@click.pass_context
def rotate_finish(ctx: click.Context, inventory_path: str | None, inventory_option: str | None) -> None:
    """Bundles trust the new root only; the old root and intermediates are archived in mesh_state_dir/ca/archive/."""
    _rotate(ctx, "finish", inventory_path, inventory_option)


# ---- mesh ca check: every certificate on every managed host, for cron --------------------------------------

@dataclass(frozen=True)
class HostCert:
    """One certificate as `mesh ca check` prints it; lifetime None when its host could not be read."""

    host: str
    name: str
    path: str
    lifetime: Lifetime | None
    note: str = ""

    @property
    def state(self) -> str:
        return "UNREACHABLE" if self.lifetime is None else self.lifetime.state.value

    def line(self, widths: tuple[int, int, int]) -> str:
        """`host  name  path  state  expires ..., 5h 2m left (21%) (note)`, padded to widths."""
        detail = self.note
        if self.lifetime is not None and self.lifetime.not_after is not None:
            detail = self.lifetime.describe() + (f" ({self.note})" if self.note else "")
        return (f"{self.host:<{widths[0]}}  {self.name:<{widths[1]}}  {self.path:<{widths[2]}}  "
                f"{self.state:<14}  {detail}").rstrip()


def host_certs(wanted: Sequence[CertFile], seen: HostFiles, now: datetime) -> list[HostCert]:
    """Pure: one entry per certificate of host `seen` (each certificate of a trust bundle; a leaf's first)."""
    if seen.unreachable is not None:
        return [HostCert(seen.host, "-", "-", None, f"unreachable: {seen.unreachable}")]
    found: list[HostCert] = []
    for item in wanted:
        name = f"trust bundle ({item.name})" if item.kind == "bundle" else item.name
        if item.path in seen.errors:
            found.append(HostCert(item.host, name, item.path, Lifetime(Expiry.UNREADABLE), seen.errors[item.path]))
            continue
        data = seen.files.get(item.path)
        if item.kind == "bundle" and data is not None:
            try:
                certs = load_chain(data)
            except MeshError:
                certs = []
            found += [HostCert(item.host, name, item.path, judge(cert, now), f"root {fingerprint(cert)[:23]}...")
                      for cert in certs] or [HostCert(item.host, name, item.path, Lifetime(Expiry.UNREADABLE))]
        else:
            found.append(HostCert(item.host, name, item.path, judge_pem(data, now)))
    return found


def check_exit_code(certs: Sequence[HostCert]) -> int:
    """3 when a host was unreachable, else 2 when any certificate is low, expired, missing or unreadable, else 0."""
    if any(cert.lifetime is None for cert in certs):
        return EXIT_UNREACHABLE
    return EXIT_HOST_FAILED if any(cert.lifetime is not None and cert.lifetime.state.bad for cert in certs) else EXIT_OK


def check_fleet(inventory_path: str, factory: Callable[[ManagedHost], Connector] | None = None,
                now: datetime | None = None) -> tuple[list[HostCert], int]:
    """Read every certificate on every managed host of the inventory (in parallel) and judge it."""
    return check_mesh(_checked_mesh(inventory_path), factory, now)


def _checked_mesh(inventory_path: str) -> Mesh:
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    return check_inventory(load_inventory(inventory_path), inventory_path).mesh


def check_mesh(mesh: Mesh, factory: Callable[[ManagedHost], Connector] | None = None,
               now: datetime | None = None) -> tuple[list[HostCert], int]:
    """check_fleet of a loaded mesh."""
    from mesh.hosts.connection import connect

    seen = read_hosts(list(mesh.hosts), all_cert_files, factory or connect)
    when = now or datetime.now(UTC)
    certs = [cert for host, got in zip(mesh.hosts, seen, strict=True)
             for cert in host_certs(all_cert_files(host), got, when)]
    return certs, check_exit_code(certs)


@ca.command("check")
@inventory_argument
@inventory_option
@click.pass_context
def check(ctx: click.Context, inventory_path: str | None, inventory_option: str | None) -> None:
    """Read every certificate on every managed host (proxies, sidecars, the checker, trust bundles) and print
    its remaining lifetime. Exit 2 when one has under a third of its lifetime left (or is expired, missing or
    unreadable), 3 when a host is unreachable, 0 otherwise: meant for cron or a monitor."""
    mesh = _checked_mesh(fleet_inventory(inventory_path, inventory_option))
    certs, code = check_mesh(mesh)
    widths = (max([len(c.host) for c in certs] + [4]), max([len(c.name) for c in certs] + [4]),
              max([len(c.path) for c in certs] + [4]))
    for cert in certs:
        click.echo(cert.line(widths))
    bad = sum(cert.lifetime is None or cert.lifetime.state.bad for cert in certs)
    click.echo(f"{len(certs)} certificate(s), {bad} need attention" + (" (run mesh deploy to renew)" if bad else ""))
    for line in issued_lines(mesh, datetime.now(UTC)):
        click.echo(line)
    ctx.exit(code)


# ---- the leaves issued: the state dir's ledger (deploys) and the controllers' records in Consul KV ---------

CHECKER_NAMES = ("checker", "health-checker")  # the controllers' identity name and the deploy's ledger name


@dataclass(frozen=True)
class IssuedLeaf:
    """The newest leaf issued to one proxy (or checker), by whom, and how many were issued to it before."""

    source: str  # `deploy` (the state dir's ledger) or `controller` (Consul KV)
    record: IssuedRecord
    earlier: int

    def line(self, now: datetime, widths: tuple[int, int]) -> str:
        lifetime = judge_times(self.record.not_before, self.record.not_after, now)
        earlier = f" ({self.earlier} earlier)" if self.earlier else ""
        return (f"{self.record.host:<{widths[0]}}  {self.record.proxy:<{widths[1]}}  {self.source:<10}  "
                f"serial {self.record.serial}  {lifetime.state.value:<14}  {lifetime.describe()}{earlier}")


def newest_leaves(ledger: Iterable[IssuedRecord], controllers: Iterable[IssuedRecord],
                  wanted: frozenset[tuple[str, str]] | None = None) -> list[IssuedLeaf]:
    """Pure: per (host, proxy) the newest record of either source (the checker's two names are one), with the
    count of older ones; by host, then proxy; with `wanted`, only those (host, proxy) pairs."""
    groups: dict[tuple[str, str], list[tuple[str, IssuedRecord]]] = {}
    for source, records in (("deploy", ledger), ("controller", controllers)):
        for record in records:
            proxy = CHECKER_NAMES[1] if record.proxy in CHECKER_NAMES else record.proxy
            if wanted is None or (record.host, proxy) in wanted:
                groups.setdefault((record.host, proxy), []).append((source, record))
    leaves = []
    for key in sorted(groups):
        source, newest = max(groups[key], key=lambda item: item[1].issued_at)
        leaves.append(IssuedLeaf(source, newest, len(groups[key]) - 1))
    return leaves


def parse_controller_records(entries: Iterable[tuple[str, bytes | None]], prefix: str) -> tuple[
        list[IssuedRecord], list[str]]:
    """Pure: the records of Consul KV entries (key, value) under `prefix` (JSON as IssuedRecord.as_json, the
    serial from the key when the value lacks it), and one problem per entry that is not such a record."""
    records, problems = [], []
    for key, value in entries:
        try:
            data = json.loads(value or b"")
            records.append(IssuedRecord.from_json({**data, "serial": data.get("serial") or key[len(prefix):]}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{key}: not a record of an issued leaf ({type(exc).__name__})")
    return records, problems


def controller_records(mesh: Mesh) -> tuple[list[IssuedRecord], list[str]]:
    """The leaves the controllers recorded in Consul KV for this mesh id (CatalogError when Consul fails)."""
    from mesh import catalog
    from mesh.controller.spec import issued_prefix

    prefix = issued_prefix(mesh.settings.id)
    with catalog.client_for(catalog.access_for(mesh)) as client:
        _, entries = client.kv.get(prefix, recurse=True)
    return parse_controller_records(((str(e["Key"]), e.get("Value")) for e in entries or []), prefix)


RecordReader = Callable[[Mesh], tuple[list[IssuedRecord], list[str]]]


def current_identities(mesh: Mesh) -> frozenset[tuple[str, str]]:
    """(host, proxy) of every proxy the inventory has, and (controller, health-checker) of every controller."""
    from mesh.config.paths import proxy_name

    found = {(host.name, proxy_name(workload)) for host in mesh.hosts for workload in host.workloads}
    return frozenset(found | {(host.name, CHECKER_NAMES[1]) for host in mesh.controllers})


def issued_lines(mesh: Mesh, now: datetime, read_controllers: RecordReader | None = None) -> list[str]:
    """`mesh ca check`'s list of the newest leaf issued to each proxy, deploys' and controllers'; a Consul that
    cannot be read is said in one line (the hosts' own certificates were judged above)."""
    from mesh.catalog import CatalogError
    from mesh.controller.spec import issued_prefix

    ca_dir = os.path.join(mesh.settings.state_dir, CA_FOLDER)
    notes: list[str] = []
    ledger: list[IssuedRecord] = []
    controllers: list[IssuedRecord] = []
    try:
        ledger = read_records(ca_dir)
    except MeshError as exc:
        notes.append(str(exc))
    if mesh.settings.consul_url:
        try:
            controllers, problems = (read_controllers or controller_records)(mesh)
            notes += problems
        except CatalogError as exc:
            notes.append(f"the controllers' records were not read: {exc}")
    leaves = newest_leaves(ledger, controllers, current_identities(mesh))
    title = (f"leaves issued, newest per proxy of the inventory ({len(ledger)} in {ca_dir}/issued.json, "
             f"{len(controllers)} by controllers in Consul KV {issued_prefix(mesh.settings.id)}):")
    lines = [title]
    widths = (max([len(leaf.record.host) for leaf in leaves] + [4]),
              max([len(leaf.record.proxy) for leaf in leaves] + [4]))
    lines += [leaf.line(now, widths) for leaf in leaves] or ["(none)"]
    return lines + [f"[WARNING]: {note}" for note in notes]
