"""A fake connector: a dict-backed filesystem and systemd per host, plus command stubs, understanding the
commands mesh's builtin modules send. For unit tests only; the lab tests cover the real SSH connector.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.hosts.connection import CommandResult
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost

Stub = CommandResult | Callable[[str, bytes | None], CommandResult]
_ABSENT = CommandResult(66, b"", b"")
_OK = CommandResult(0, b"", b"")


@dataclass
class FakeFile:
    data: bytes | None  # None: a directory
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"


@dataclass
class FakeUnit:
    active: str = "inactive"
    enabled: bool = False


@dataclass
class FakeHost:
    """One fake host's state and what was done to it (commands run, files put)."""

    name: str
    files: dict[str, FakeFile] = field(default_factory=dict)
    units: dict[str, FakeUnit] = field(default_factory=dict)
    stubs: list[tuple[re.Pattern[str], Stub]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)
    unreachable: str | None = None  # the message, when the host cannot be reached

    def stub(self, pattern: str, result: Stub) -> None:
        """Answer commands matching the regex (searched) with result, before the built-in commands."""
        self.stubs.append((re.compile(pattern), result))

    def write(self, path: str, data: bytes | str, mode: int = 0o644, owner: str = "root",
              group: str = "root") -> None:
        self.files[path] = FakeFile(data.encode() if isinstance(data, str) else data, mode, owner, group)

    def changing_commands(self) -> list[str]:
        """Commands that alter state (everything but the facts modules read)."""
        reads = ("stat -c", "sha256sum", "test -e", "systemctl show", "systemctl is-")
        return [cmd for cmd in self.commands if not any(read in cmd for read in reads)]


class FakeConnector:
    """The Connector of one FakeHost."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.closed = False

    def _reach(self) -> None:
        if self.host.unreachable is not None:
            raise HostUnreachable(self.host.name, self.host.unreachable)

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        self._reach()
        self.host.commands.append(cmd)
        for pattern, stub in self.host.stubs:
            if pattern.search(cmd):
                return stub if isinstance(stub, CommandResult) else stub(cmd, stdin)
        return _Shell(self.host).run(cmd)

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        self._reach()
        self.host.puts.append(path)
        self.host.files[path] = FakeFile(data, mode, owner or "root", group or "root")

    def get(self, path: str) -> bytes | None:
        self._reach()
        found = self.host.files.get(path)
        return found.data if found is not None else None

    def close(self) -> None:
        self.closed = True


class FakeFleet:
    """Fake hosts by name, made on first use; `fleet.connect` is a connector factory for run_playbook."""

    def __init__(self) -> None:
        self.hosts: dict[str, FakeHost] = {}

    def host(self, name: str) -> FakeHost:
        return self.hosts.setdefault(name, FakeHost(name))

    def connect(self, managed: ManagedHost) -> FakeConnector:
        return FakeConnector(self.host(managed.name))


class NoHostMayBeReached:
    """A connector factory for tests of what must be refused before any host is touched: it records every
    host something tried to reach, and fails that attempt."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, host: ManagedHost) -> FakeConnector:
        self.calls.append(host.name)
        raise AssertionError(f"something tried to reach {host.name!r} before the run was refused")


class _Shell:
    """The commands of mesh's facts and builtin modules, on the fake state."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def run(self, cmd: str) -> CommandResult:
        last = cmd.rsplit("; ", 1)[-1]
        words = shlex.split(last)
        if not words:
            return _OK
        handler = getattr(self, f"_{words[0].replace('-', '_')}", None)
        if handler is None:
            return CommandResult(127, b"", f"fake: no stub for {cmd!r}".encode())
        result: CommandResult = handler(words[1:])
        return result

    def _file(self, path: str) -> FakeFile | None:
        return self.host.files.get(path)

    def _stat(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return _ABSENT
        kind = "directory" if found.data is None else "regular file"
        return CommandResult(0, f"{kind}|{found.mode:o}|{found.owner}|{found.group}\n".encode(), b"")

    def _sha256sum(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None or found.data is None:
            return _ABSENT
        return CommandResult(0, f"{hashlib.sha256(found.data).hexdigest()}  {args[-1]}\n".encode(), b"")

    def _test(self, args: list[str]) -> CommandResult:
        return _OK if self._file(args[-1]) is not None else CommandResult(1, b"", b"")

    def _mkdir(self, args: list[str]) -> CommandResult:
        self.host.files[args[-1]] = FakeFile(None, 0o755)
        return _OK

    def _rm(self, args: list[str]) -> CommandResult:
        path = args[-1]
        for name in [p for p in self.host.files if p == path or p.startswith(path.rstrip("/") + "/")]:
            del self.host.files[name]
        return _OK

    def _mv(self, args: list[str]) -> CommandResult:
        source, dest = args[-2:]
        if source not in self.host.files:
            return CommandResult(1, b"", f"mv: cannot stat '{source}'".encode())
        self.host.files[dest] = self.host.files.pop(source)
        return _OK

    def _touch(self, args: list[str]) -> CommandResult:
        self.host.files.setdefault(args[-1], FakeFile(b""))
        return _OK

    def _chmod(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return CommandResult(1, b"", b"chmod: no such file")
        found.mode = int(args[-2], 8)
        return _OK

    def _chown(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return CommandResult(1, b"", b"chown: no such file")
        owner, _, group = args[-2].partition(":")
        found.owner = owner or found.owner
        found.group = group or found.group
        return _OK

    def _systemctl(self, args: list[str]) -> CommandResult:
        verb, name = args[0], args[-1]
        if verb == "daemon-reload":
            return _OK
        unit = self.host.units.get(name)
        if verb == "show":
            return CommandResult(0, b"loaded\n" if unit else b"not-found\n", b"")
        if unit is None:
            return CommandResult(5, b"", f"Unit {name} not found.".encode())
        if verb == "is-active":
            return CommandResult(0 if unit.active == "active" else 3, f"{unit.active}\n".encode(), b"")
        if verb == "is-enabled":
            return CommandResult(0 if unit.enabled else 1, b"enabled\n" if unit.enabled else b"disabled\n", b"")
        if verb in ("enable", "disable"):
            unit.enabled = verb == "enable"
        elif verb in ("start", "restart", "reload"):
            unit.active = "active"
        elif verb == "stop":
            unit.active = "inactive"
        return _OK
