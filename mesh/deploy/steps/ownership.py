"""Who owns a proxy's files on its host: mesh-envoy by name on VMs, the sidecar's uid by number on container
hosts (no account there has that id). It owns that choice and the comparison; it must not write files itself.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass

from mesh.config import paths
from mesh.containers.sidecar import file_modes
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import Change, RunCommand
from mesh.deploy.modules.builtin import attribute_changes
from mesh.hosts.connection import Connector
from mesh.hosts.facts import FileStat, file_stat
from mesh.inventory.model import ManagedHost


@dataclass(frozen=True)
class Owned:
    """The owner, group (names, or numeric ids given as digits) and mode a file must have."""

    owner: str
    group: str
    mode: int

    @property
    def numeric(self) -> bool:
        return self.owner.isdigit() and self.group.isdigit()


@dataclass(frozen=True)
class ProxyOwnership:
    """A proxy's folder (0750), key (0600, the proxy's user) and Envoy config (0640, readable by its group)."""

    folder: Owned
    key: Owned
    config: Owned


def proxy_ownership(host: ManagedHost, proxy: str) -> ProxyOwnership:
    """The ownership of proxy's files on host: the same on every step, so no two steps ever undo each other."""
    if host.kind == "container_host":
        folder, key, config = (Owned(str(uid), str(gid), mode) for _, uid, gid, mode in file_modes(proxy))
        return ProxyOwnership(folder, key, config)
    user = paths.envoy_user(proxy)
    return ProxyOwnership(Owned("root", user, 0o750), Owned(user, user, 0o600), Owned("root", user, 0o640))


def ownership_changes(connector: Connector, path: str, wanted: Owned) -> Iterator[Change]:
    """chown/chmod for what differs at path (which must exist); numeric owners are compared by id."""
    if wanted.numeric:
        found = connector.run(f"stat -c '%u:%g:%a' {shlex.quote(path)}")
        if not found.ok:
            raise ModuleFailure(f"cannot stat {path}: {found.error_text()}")
        owner, group, mode = found.text().split(":")
        stat: FileStat | None = FileStat("?", int(mode, 8), owner, group)
    else:
        stat = file_stat(connector, path)
    if stat is None:
        raise ModuleFailure(f"{path} is missing")
    yield from attribute_changes(path, stat, wanted.mode, wanted.owner, wanted.group)


def folder_changes(connector: Connector, path: str, wanted: Owned) -> Iterator[Change]:
    """The folder at path with the wanted ownership: created when missing."""
    if not connector.run(f"test -d {shlex.quote(path)}").ok:
        yield RunCommand(f"mkdir -p -- {shlex.quote(path)}", f"create {path}")
        yield from attribute_changes(path, FileStat("directory", -1, "", ""), wanted.mode, wanted.owner,
                                     wanted.group)
        return
    yield from ownership_changes(connector, path, wanted)
