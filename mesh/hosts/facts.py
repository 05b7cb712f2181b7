"""Facts read from a host through the connector: a file's checksum and attributes, a unit's state. It owns
reading (a fact that cannot be read raises FactError); it must not change anything on the host (facts are
read in check mode too).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from mesh.hosts.connection import Connector
from mesh.hosts.errors import FactError

_ABSENT = 66


@dataclass(frozen=True)
class FileStat:
    """What `stat` says of a path: its kind, permission bits, owner and group names."""

    kind: str  # "file", "directory", "link", "other"
    mode: int
    owner: str
    group: str


def file_stat(connector: Connector, path: str) -> FileStat | None:
    """The path's attributes, or None when nothing is there."""
    quoted = shlex.quote(path)
    result = connector.run(f"if [ ! -e {quoted} ] && [ ! -L {quoted} ]; then exit {_ABSENT}; fi; "
                           f"stat -c '%F|%a|%U|%G' {quoted}")
    if result.code == _ABSENT:
        return None
    if not result.ok:
        raise FactError(f"cannot stat {path}: {result.error_text()}")
    kind, mode, owner, group = result.text().split("|")
    kinds = {"regular file": "file", "regular empty file": "file", "directory": "directory",
             "symbolic link": "link"}
    return FileStat(kinds.get(kind, "other"), int(mode, 8), owner, group)


def file_sha256(connector: Connector, path: str) -> str | None:
    """The sha256 of a regular file, computed on the host; None when there is no such file."""
    quoted = shlex.quote(path)
    result = connector.run(f"if [ ! -f {quoted} ]; then exit {_ABSENT}; fi; sha256sum {quoted}")
    if result.code == _ABSENT:
        return None
    if not result.ok:
        raise FactError(f"cannot checksum {path}: {result.error_text()}")
    return result.text().split()[0]


def path_exists(connector: Connector, path: str) -> bool:
    return connector.run(f"test -e {shlex.quote(path)}").ok


@dataclass(frozen=True)
class UnitState:
    """A systemd unit as `systemctl` reports it."""

    loaded: bool  # false: systemd knows no such unit
    active: str  # active, inactive, failed, activating...
    enabled: bool


def unit_state(connector: Connector, name: str) -> UnitState:
    quoted = shlex.quote(name)
    load = connector.run(f"systemctl show --property=LoadState --value {quoted}").text()
    active = connector.run(f"systemctl is-active {quoted}").text()
    enabled = connector.run(f"systemctl is-enabled {quoted}")
    return UnitState(load not in ("not-found", ""), active, enabled.ok)
