"""`mesh ca rotate start|switch|finish` and `mesh ca status`: what every managed host holds (trust bundles, leaves,
the controllers' intermediate) judged against the CA's rotation phase, and the steps, each pushed by a deploy.

It reads hosts through deploy/hostcerts.py and changes the CA only through mesh/pki/phases.py; it never reads or
prints a key. `judge_file` and `fleet_lines` are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh.config import paths
from mesh.controller import spec as controller_spec
from mesh.deploy.hostcerts import CHECKER_CA_PATH, CertFile, HostFiles, leaves, read_hosts
from mesh.deploy.lock import deploy_lock
from mesh.errors import EXIT_ERROR, EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE, MeshError, UsageError
from mesh.hosts.connection import Connector
from mesh.inventory.model import ManagedHost, Mesh
from mesh.pki import CertificateAuthority, fingerprint
from mesh.pki.byo import GivenCA, check_given_ca
from mesh.pki.leaf import load_chain, signed_by
from mesh.pki.phases import NEXT_STEP, Phase, Step, begin, finish, require_order, switch

CONTROLLER_NAME = "controller"
KIND_ORDER = {"bundle": 0, "issuer": 1, "leaf": 2}
SHOWN_LAGGARDS = 20  # a refusal names this many lagging files, then counts the rest


class RotationRefused(MeshError):
    """The previous phase has not reached every host (exit 1): nothing was changed."""

    exit_code = EXIT_ERROR


class RotationUnread(MeshError):
    """A managed host could not be read before a rotation step (exit 3): nothing was changed."""

    exit_code = EXIT_UNREACHABLE


@dataclass(frozen=True)
class PhaseTarget:
    """What every host holds once a phase reached it: each trust bundle exactly `bundle` (root fingerprints),
    each leaf signed by one of `signers`, each controller the controllers' intermediate `controller_issuer`."""

    phase: Phase
    bundle: frozenset[str]
    signers: tuple[x509.Certificate, ...]
    controller_issuer: str | None


def phase_target(ca: CertificateAuthority) -> PhaseTarget:
    issuer = ca.signing.controller_cert()
    return PhaseTarget(ca.phase, frozenset(ca.bundle_fingerprints), ca.signers(),
                       fingerprint(issuer) if issuer is not None else None)


def watched_files(host: ManagedHost) -> tuple[CertFile, ...]:
    """Everything on host that validates peers or is presented to them: the host's and each proxy's trust bundle
    (the proxy's own copy is what its Envoy reads), each proxy's leaf, the checker's bundle and leaf, and a
    controller's bundle and intermediate."""
    found = []
    if host.workloads:
        found.append(CertFile(host.name, "proxies", paths.CA_PATH, "bundle"))
        found += [CertFile(host.name, paths.proxy_name(w), paths.proxy_ca_path(paths.proxy_name(w)), "bundle")
                  for w in host.workloads]
    if host.is_controller:
        found += [CertFile(host.name, "health-checker", CHECKER_CA_PATH, "bundle"),
                  CertFile(host.name, CONTROLLER_NAME, controller_spec.ROOT_CERT, "bundle"),
                  CertFile(host.name, CONTROLLER_NAME, controller_spec.INTERMEDIATE_CERT, "issuer")]
    return tuple(found) + leaves(host)


@dataclass(frozen=True)
class FileVerdict:
    """One watched file against the phase: at it or not, and what it holds, in words."""

    item: CertFile
    at_phase: bool
    detail: str


def _short(fp: str) -> str:
    return fp[:11]


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def judge_file(item: CertFile, data: bytes | None, error: str | None, target: PhaseTarget) -> FileVerdict:
    """Pure: whether a file holds what the phase wants."""
    if error is not None:
        return FileVerdict(item, False, f"unreadable: {error}")
    if data is None:
        return FileVerdict(item, False, "missing")
    try:
        certs = load_chain(data)
    except MeshError:
        return FileVerdict(item, False, "not a PEM certificate")
    if item.kind == "bundle":
        roots = [fingerprint(cert) for cert in certs]
        return FileVerdict(item, set(roots) == target.bundle and len(roots) == len(target.bundle),
                           "roots " + ", ".join(_short(fp) for fp in roots))
    if item.kind == "issuer":
        found = fingerprint(certs[0])
        return FileVerdict(item, found == target.controller_issuer,
                           f"controllers' intermediate {_short(found)}")
    signer = next((s for s in target.signers if signed_by(certs[0], s)), None)
    if signer is not None:
        return FileVerdict(item, True, f"leaf from {_common_name(signer)} {_short(fingerprint(signer))}")
    return FileVerdict(item, False, f"leaf from {certs[0].issuer.rfc4514_string()}, not this phase's intermediates")


@dataclass(frozen=True)
class FleetRotation:
    """Every watched file of the fleet judged against the phase, and the hosts that could not be read."""

    target: PhaseTarget
    files: tuple[FileVerdict, ...]
    unreachable: tuple[tuple[str, str], ...] = ()

    @property
    def lagging(self) -> tuple[FileVerdict, ...]:
        return tuple(verdict for verdict in self.files if not verdict.at_phase)

    @property
    def exit_code(self) -> int:
        """3 when a host was unreachable, else 2 when a file lags, else 0 (`mesh ca status`)."""
        if self.unreachable:
            return EXIT_UNREACHABLE
        return EXIT_HOST_FAILED if self.lagging else EXIT_OK


def judge_fleet(target: PhaseTarget, hosts: Sequence[ManagedHost], seen: Sequence[HostFiles]) -> FleetRotation:
    """Pure: each host's watched files (read into `seen`, in the order of hosts) against the phase."""
    files: list[FileVerdict] = []
    unreachable: list[tuple[str, str]] = []
    for host, got in zip(hosts, seen, strict=True):
        if got.unreachable is not None:
            unreachable.append((host.name, got.unreachable))
            continue
        items = sorted(watched_files(host), key=lambda item: (item.name, KIND_ORDER[item.kind]))
        files += [judge_file(item, got.files.get(item.path), got.errors.get(item.path), target) for item in items]
    return FleetRotation(target, tuple(files), tuple(unreachable))


def read_fleet(mesh: Mesh, ca: CertificateAuthority, factory: Callable[[ManagedHost], Connector],
               forks: int = 20) -> FleetRotation:
    hosts = list(mesh.hosts)
    return judge_fleet(phase_target(ca), hosts, read_hosts(hosts, watched_files, factory, forks))


# ---- printing ------------------------------------------------------------------------------------------------

def ca_lines(ca: CertificateAuthority) -> list[str]:
    """The phase, the roots of the bundle, and who signs."""
    next_step = NEXT_STEP[ca.phase]
    lines = [f"CA rotation phase: {ca.phase}" + ("" if ca.phase == "idle" else f" (next: mesh ca rotate {next_step})"),
             f"trust bundle: {len(ca.trusted)} root(s)"]
    for root in ca.trusted:
        role = "signing" if fingerprint(root) == ca.root_fingerprint else "old" if ca.phase == "switch" else "next"
        lines.append(f"  {fingerprint(root)}  {_common_name(root)} ({role})")
    lines.append(f"signing intermediate: {_common_name(ca.intermediate)} {_short(fingerprint(ca.intermediate))}"
                 + (" (brought by its owner: mesh holds no root key)" if ca.brought else ""))
    return lines


def fleet_lines(fleet: FleetRotation) -> list[str]:
    """One line per watched file (host, name, what, path, state, detail), then the laggards' summary."""
    rows: list[tuple[str, ...]] = [(v.item.host, v.item.name, v.item.kind, v.item.path,
                                    "at phase" if v.at_phase else "LAGS", v.detail) for v in fleet.files]
    rows += [(host, "-", "-", "-", "UNREACHABLE", why) for host, why in fleet.unreachable]
    widths = [max([len(row[i]) for row in rows] + [4]) for i in range(5)]
    lines = ["  ".join(f"{value:<{widths[i]}}" for i, value in enumerate(row[:5])) + "  " + row[5]
             for row in rows]
    lagging = fleet.lagging
    hosts = sorted({v.item.host for v in lagging} | {host for host, _ in fleet.unreachable})
    lines.append(f"{len(fleet.files) - len(lagging)} of {len(fleet.files)} file(s) at phase {fleet.target.phase}"
                 + (f"; lagging or unread: {', '.join(hosts)}" if hosts else "; no laggard"))
    return lines


def status(inventory_path: str, factory: Callable[[ManagedHost], Connector], out: TextIO) -> int:
    """`mesh ca status`: the CA's phase and every host's files against it; its exit code."""
    mesh = checked_mesh(inventory_path)
    ca = CertificateAuthority.load(mesh.settings.state_dir)
    fleet = read_fleet(mesh, ca, factory)
    out.writelines(line + "\n" for line in ca_lines(ca) + fleet_lines(fleet))
    return fleet.exit_code


def checked_mesh(inventory_path: str) -> Mesh:
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    return check_inventory(load_inventory(inventory_path), inventory_path).mesh


# ---- the steps -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GivenFiles:
    """`--intermediate CERT KEY [--root ROOT_CERT]` as given on the command line."""

    cert: str
    key: str
    root: str | None = None


def read_given(files: GivenFiles, trust_domain: str, default_root: bytes | None) -> GivenCA:
    """The owner's intermediate, checked (byo.check_given_ca); the root defaults to `default_root`."""

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None

    if files.root is None and default_root is None:
        raise UsageError("--intermediate needs --root ROOT_CERT: the root it chains to")
    root = read(files.root, "the root certificate") if files.root is not None else default_root
    assert root is not None
    return check_given_ca(read(files.cert, "the intermediate certificate"), read(files.key, "the intermediate key"),
                          root, trust_domain, datetime.now(UTC))


Deploy = Callable[[str, Callable[[ManagedHost], Connector]], int]


def refuse_lagging(fleet: FleetRotation, step: Step, inventory_path: str) -> None:
    """RotationUnread (exit 3) or RotationRefused (exit 1) unless every host is at the current phase."""
    if fleet.unreachable:
        names = ", ".join(f"{host} ({why})" for host, why in fleet.unreachable)
        raise RotationUnread(f"refusing `mesh ca rotate {step}`: cannot read {names}; nothing was changed",
                             "every host must be read to know that the previous phase reached it")
    lagging = fleet.lagging
    if not lagging:
        return
    shown = [f"  {v.item.host} {v.item.name} {v.item.path}: {v.detail}" for v in lagging[:SHOWN_LAGGARDS]]
    if len(lagging) > SHOWN_LAGGARDS:
        shown.append(f"  ... and {len(lagging) - SHOWN_LAGGARDS} more")
    head = (f"refusing `mesh ca rotate {step}`: phase {fleet.target.phase} has not reached {len(lagging)} file(s); "
            "nothing was changed")
    raise RotationRefused("\n".join([head, *shown]),
                          f"`mesh deploy {inventory_path}` pushes phase {fleet.target.phase} to them; "
                          "`mesh ca status` shows who lags")


def rotate(inventory_path: str, step: Step, factory: Callable[[ManagedHost], Connector], deploy: Deploy,
           out: TextIO, given: GivenFiles | None = None) -> int:
    """One step: refused when out of order (exit 5), when the current phase has not reached every host (exit 1) or
    a host cannot be read (exit 3); else the CA moves to the next phase, a deploy pushes it, and every host is
    read again: exit 2 when some lag (the deploy's own code when it failed)."""
    mesh = checked_mesh(inventory_path)
    state_dir = mesh.settings.state_dir
    ca = CertificateAuthority.load(state_dir)
    require_order(ca.phase, step)
    brought = None
    if step != "start" and given is not None:
        raise UsageError("--intermediate is given to `mesh ca rotate start` only")
    if step == "start":
        if ca.brought and given is None:
            raise UsageError("this CA was brought by its owner (mesh holds no root key): `mesh ca rotate start` "
                             "needs the new intermediate, --intermediate CERT KEY [--root ROOT_CERT]")
        if given is not None:
            brought = read_given(given, ca.trust_domain, ca.root_pem if ca.brought else None)
    def warn(text: str) -> None:
        out.write(f"[WARNING]: {text}\n")

    # under the deploy lock: no deploy pushes the previous phase, and no other step runs, between the check and
    # the move (the deploy below takes the lock again)
    with deploy_lock(mesh, warn, f"mesh ca rotate {step}"):
        refuse_lagging(read_fleet(mesh, CertificateAuthority.load(state_dir), factory), step, inventory_path)
        if step == "start":
            begin(ca.ca_dir, ca.trust_domain, brought)
        elif step == "switch":
            switch(ca.ca_dir)
        else:
            archive = finish(ca.ca_dir)
            out.write(f"the old CA material is archived in {archive}\n")
    moved = CertificateAuthority.load(state_dir)
    out.write("\n".join(ca_lines(moved)) + "\n")
    out.write(f"deploying phase {moved.phase} to every host\n")
    out.flush()
    code = deploy(inventory_path, factory)
    after = read_fleet(mesh, moved, factory)
    out.writelines(line + "\n" for line in fleet_lines(after))
    if code != EXIT_OK or after.exit_code != EXIT_OK:
        out.write(f"phase {moved.phase} has not reached every host: `mesh deploy {inventory_path}` again, then "
                  "`mesh ca status`\n")
    return code if code != EXIT_OK else after.exit_code
