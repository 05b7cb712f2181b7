"""The one connector interface tasks use to reach a host (run, put, get, close) and the local connector.
It owns shell-level file transfer (atomic put, get); it must not know about tasks. SSH lives in ssh.py.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.hosts.errors import RemoteError
from mesh.hosts.timeouts import DEFAULT_TIMEOUTS, Timeouts
from mesh.inventory.model import Connection, ManagedHost

__all__ = ["CommandResult", "Connector", "LocalConnector", "RemoteError", "connect", "connector_factory"]

# get() exits with this when the file is absent, to tell "no file" from "cannot read it".
_ABSENT = 66


@dataclass(frozen=True)
class CommandResult:
    """What a command on a host gave back."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.code == 0

    def text(self) -> str:
        return self.stdout.decode(errors="replace").strip()

    def error_text(self) -> str:
        return (self.stderr or self.stdout).decode(errors="replace").strip()


class Connector(Protocol):
    """How tasks reach one host. Raises HostUnreachable when the host cannot be reached at all."""

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        """Run a shell command (as root when the host's connection says become)."""
        ...

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        """Write a file atomically: a temp file in the same folder, owner and mode set, then renamed."""
        ...

    def get(self, path: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        ...

    def close(self) -> None: ...


def put_command(path: str, mode: int, owner: str | None, group: str | None) -> str:
    """A shell script that writes stdin to path atomically (used by every shell-based connector)."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder or ".", f".{name}.mesh-tmp")
    steps = ["set -e", f"t={shlex.quote(temp)}.$$", 'trap \'rm -f "$t"\' EXIT', "umask 077", 'cat > "$t"']
    if owner or group:
        steps.append(f'chown {shlex.quote((owner or "") + (":" + group if group else ""))} "$t"')
    steps.append(f'chmod {mode:04o} "$t"')
    steps.append(f'mv -f "$t" {shlex.quote(path)}')
    return "; ".join(steps)


def get_command(path: str) -> str:
    quoted = shlex.quote(path)
    return f"if [ ! -e {quoted} ]; then exit {_ABSENT}; fi; cat {quoted}"


def put_via(connector: Connector, data: bytes, path: str, mode: int, owner: str | None,
            group: str | None) -> None:
    result = connector.run(put_command(path, mode, owner, group), stdin=data)
    if not result.ok:
        raise RemoteError(f"cannot write {path}: {result.error_text()}")


def get_via(connector: Connector, path: str) -> bytes | None:
    result = connector.run(get_command(path))
    if result.code == _ABSENT:
        return None
    if not result.ok:
        raise RemoteError(f"cannot read {path}: {result.error_text()}")
    return result.stdout


def become_prefix(connection: Connection, current_user: str | None) -> str:
    """`sudo -n -u USER ` when the connection becomes another user than the one it logs in as, else ''."""
    if not connection.become or current_user == connection.become_user:
        return ""
    return f"sudo -n -H -u {shlex.quote(connection.become_user)} "


def wrap_become(cmd: str, prefix: str) -> str:
    return f"{prefix}/bin/sh -c {shlex.quote(cmd)}" if prefix else cmd


class LocalConnector:
    """Runs on the machine running mesh (`ansible_connection: local`), through /bin/sh."""

    def __init__(self, connection: Connection, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        user = "root" if os.geteuid() == 0 else os.environ.get("USER")
        self._prefix = become_prefix(connection, user)
        self._timeouts = timeouts

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        limit = timeout or self._timeouts.command
        try:
            done = subprocess.run(["/bin/sh", "-c", wrap_become(cmd, self._prefix)], input=stdin or b"",
                                  capture_output=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired as exc:
            return CommandResult(124, exc.stdout or b"", f"timed out after {limit:g} s".encode())
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        put_via(self, data, path, mode, owner, group)

    def get(self, path: str) -> bytes | None:
        return get_via(self, path)

    def close(self) -> None:
        pass


def connect(host: ManagedHost, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Connector:
    """The connector for a host: local or SSH, as its connection says. Connects lazily (on first use)."""
    if host.connection.local:
        return LocalConnector(host.connection, timeouts)
    from mesh.hosts.ssh import SSHConnector

    return SSHConnector(host.connection, name=host.name, timeouts=timeouts)


def connector_factory(timeouts: Timeouts) -> Callable[[ManagedHost], Connector]:
    """connect, with these timeouts (what a deploy's -T/--timeout and --command-timeout give)."""
    if timeouts == DEFAULT_TIMEOUTS:
        return connect
    return functools.partial(connect, timeouts=timeouts)
