"""The CA preflight of `mesh deploy`: before anything changes (the CA included), read the trust bundle of every
managed host and refuse when one trusts another root than mesh_state_dir's, so a moved or empty state dir can
never re-key the fleet. `judge` is pure; `trusted_ca` gathers, judges, and only then loads or makes the CA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.deploy.hostcerts import HostFiles, read_hosts, trust_bundles
from mesh.errors import EXIT_ERROR, EXIT_UNREACHABLE, MeshError
from mesh.hosts.connection import Connector
from mesh.inventory.model import ManagedHost, Mesh
from mesh.pki import CertificateAuthority, fingerprint
from mesh.pki.authority import CA_FOLDER
from mesh.pki.leaf import load_chain

UNREADABLE = "unreadable"  # in place of fingerprints: a bundle that holds no certificate


@dataclass(frozen=True)
class Foreign:
    """A host's trust bundle that names another root than the state dir's (or cannot be read)."""

    host: str
    path: str
    roots: tuple[str, ...]  # SHA-256 fingerprints, or (UNREADABLE,) with `error` set
    error: str | None = None


@dataclass(frozen=True)
class TrustVerdict:
    """What the managed hosts trust, against the state dir's root (None: the state dir has no CA)."""

    state_root: str | None
    trusting: tuple[str, ...] = ()  # hosts whose bundles name exactly the state dir's root
    fresh: tuple[str, ...] = ()  # hosts with no bundle yet (never deployed)
    foreign: tuple[Foreign, ...] = ()
    unreachable: tuple[tuple[str, str], ...] = ()  # (host, why)

    @property
    def ok(self) -> bool:
        return not self.foreign and not self.unreachable

    @property
    def foreign_hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item.host for item in self.foreign))


class TrustRefused(MeshError):
    """Hosts trust another root than the state dir's (exit 1)."""

    exit_code = EXIT_ERROR


class TrustUnread(MeshError):
    """A managed host could not be read before the deploy, so nothing was changed (exit 3)."""

    exit_code = EXIT_UNREACHABLE


def bundle_roots(pem: bytes) -> tuple[str, ...]:
    """The SHA-256 fingerprints of every certificate in a bundle; () when it holds none."""
    try:
        return tuple(fingerprint(cert) for cert in load_chain(pem))
    except MeshError:
        return ()


def judge(state_root: str | None, seen: Sequence[HostFiles], rotation: frozenset[str] = frozenset(),
          archived: frozenset[str] = frozenset()) -> TrustVerdict:
    """Pure: a host is fine when each of its bundles is absent or names exactly state_root, or (a CA rotation)
    names only roots of the state dir's CA (state_root, the `rotation` roots of a rotation under way, the
    `archived` ones of finished rotations) and at least one of state_root and `rotation`; any other root, an
    unreadable bundle, or any bundle at all when the state dir has no CA, is foreign."""
    live = ({state_root} if state_root else set()) | rotation
    trusting: list[str] = []
    fresh: list[str] = []
    foreign: list[Foreign] = []
    unreachable: list[tuple[str, str]] = []
    for host in seen:
        if host.unreachable is not None:
            unreachable.append((host.host, host.unreachable))
            continue
        mine = [Foreign(host.host, path, (UNREADABLE,), error) for path, error in host.errors.items()]
        present = {path: data for path, data in host.files.items() if data is not None}
        for path, data in present.items():
            roots = bundle_roots(data)
            if not roots:
                mine.append(Foreign(host.host, path, (UNREADABLE,), "it holds no PEM certificate"))
            elif state_root is None or not (set(roots) == {state_root} or (
                    set(roots) <= live | archived and set(roots) & live)):
                mine.append(Foreign(host.host, path, roots))
        if mine:
            foreign += mine
        elif present:
            trusting.append(host.host)
        else:
            fresh.append(host.host)
    return TrustVerdict(state_root, tuple(trusting), tuple(fresh), tuple(foreign), tuple(unreachable))


def refusal(verdict: TrustVerdict, state_dir: str) -> TrustRefused:
    """The error naming each foreign host, what it trusts, what the state dir holds, and the two ways out."""
    hosts = verdict.foreign_hosts
    ours = (f"root {verdict.state_root}" if verdict.state_root
            else f"no CA in the state dir (no {os.path.join(state_dir, CA_FOLDER)})")
    lines = [(f"refusing to deploy: {len(hosts)} host(s) trust another mesh CA than mesh_state_dir "
              f"{state_dir}, and deploying would replace their trust and re-key them: {', '.join(hosts)}")]
    for item in verdict.foreign:
        what = (f"unreadable ({item.error})" if item.roots == (UNREADABLE,)
                else "root " + ", ".join(item.roots))
        lines.append(f"  {item.host} {item.path}: {what}")
    lines.append(f"  state dir {state_dir}: {ours}")
    lines.append("Nothing was changed, and no CA was made. Either point mesh_state_dir at the CA these hosts "
                 "trust (`mesh ca show --state-dir DIR` prints a CA's root fingerprint), or, to replace the CA on "
                 "purpose: `mesh ca init INVENTORY` (makes a CA in mesh_state_dir when it has none), then "
                 "`mesh deploy INVENTORY --replace-ca` (re-trusts every host: every proxy gets a new certificate "
                 "and restarts)")
    return TrustRefused("\n".join(lines))


def unread(verdict: TrustVerdict) -> TrustUnread:
    names = ", ".join(host for host, _ in verdict.unreachable)
    details = "\n".join(f"  {host}: {why}" for host, why in verdict.unreachable)
    return TrustUnread(f"cannot read the trust bundle of {names} before deploying; nothing was changed (a deploy "
                       f"reads every managed host first, whatever --limit says)\n{details}",
                       "make the host reachable, or remove it from the inventory")


def state_root(state_dir: str) -> str | None:
    """The root fingerprint of the CA in state_dir, or None when it has none (nothing is created)."""
    if not os.path.lexists(os.path.join(os.path.abspath(state_dir), CA_FOLDER)):
        return None
    return CertificateAuthority.load(state_dir).root_fingerprint


def lineage(state_dir: str) -> tuple[frozenset[str], frozenset[str]]:
    """The root fingerprints of the state dir's CA beside its signing root: the phase's bundle (a rotation under
    way) and the archived roots of finished rotations."""
    ca = CertificateAuthority.load(state_dir)
    return frozenset(ca.bundle_fingerprints), frozenset(fingerprint(root) for root in ca.archived_roots())


def trusted_ca(mesh: Mesh, factory: Callable[[ManagedHost], Connector], replace: bool = False,
               forks: int = 20, warn: Callable[[str], None] | None = None,
               unreachable: list[str] | None = None) -> tuple[CertificateAuthority, bool]:
    """Read every managed host's trust bundles, judge them, and only when no host trusts another root (or
    `replace`, with a CA already in the state dir) load the CA, making it if absent. Raises TrustUnread (exit 3),
    TrustRefused (exit 1); True with the CA when this call made it.

    A host that cannot be read stops everything when no CA exists yet (it might trust another root), or with
    `replace`; when the state dir has its CA and `unreachable` is given, the host's name is added to it instead
    (nothing can be written to it anyway: the deploy reports it unreachable and goes on with the others)."""
    settings = mesh.settings
    ours = state_root(settings.state_dir)
    rotation, archived = lineage(settings.state_dir) if ours is not None else (frozenset(), frozenset())
    verdict = judge(ours, read_hosts(list(mesh.hosts), trust_bundles, factory, forks), rotation, archived)
    if verdict.unreachable and (ours is None or replace or unreachable is None):
        raise unread(verdict)
    if verdict.unreachable and unreachable is not None:
        unreachable += [host for host, _ in verdict.unreachable]
        if warn is not None:
            warn("cannot read " + "; ".join(f"{host} ({why})" for host, why in verdict.unreachable)
                 + ": reported unreachable, the other hosts are deployed")
    if replace and ours is None:
        raise TrustRefused(f"--replace-ca uses the CA in mesh_state_dir {settings.state_dir} and never makes one, "
                           "and there is none", "run `mesh ca init INVENTORY` first, on purpose")
    if verdict.foreign and not replace:
        raise refusal(verdict, settings.state_dir)
    if verdict.foreign and warn is not None:
        warn(f"--replace-ca: re-trusting {', '.join(verdict.foreign_hosts)} with root {ours}")
    return CertificateAuthority.ensure(settings.state_dir, settings.trust_domain)
