"""What a module sees and gives back: the task context (host, connector, variables, check mode, the caller's
shared object) and the changes it yields. It owns the module contract; it must not apply changes.

A module reads facts through `ctx.connector` (reads are safe in check mode), decides, and yields one change
per thing to alter; the runner applies each (not in check mode) and sends back the command's result (None
when not applied). What it returns (an Outcome, or None) gives the message and the registered data.

    def motd(ctx: TaskContext[None], args: dict[str, Any]) -> ModuleRun:
        text = str(args["text"]).encode()
        if ctx.connector.get("/etc/motd") != text:
            yield PutFile("/etc/motd", text, 0o644)
        return Outcome(msg="motd set")
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from mesh.hosts.connection import CommandResult, Connector
from mesh.inventory.model import ManagedHost

SharedT = TypeVar("SharedT")


@dataclass(frozen=True)
class RunCommand:
    """A change: run a command that alters the host. A non-zero exit fails the task unless check_exit=False;
    changes=False for a step that does not by itself count as a change (`systemctl daemon-reload`)."""

    cmd: str
    description: str = ""
    stdin: bytes | None = None
    check_exit: bool = True
    changes: bool = True


@dataclass(frozen=True)
class PutFile:
    """A change: write a file atomically with this mode, owner and group."""

    path: str
    data: bytes
    mode: int
    owner: str | None = None
    group: str | None = None
    description: str = ""


Change = RunCommand | PutFile


@dataclass(frozen=True)
class Outcome:
    """What a module says at the end: a message, data for `register`, and whether it failed."""

    msg: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    failed: bool = False


ModuleRun = Generator[Change, CommandResult | None, Outcome | None]


@dataclass(frozen=True)
class TaskContext(Generic[SharedT]):
    """Everything a module may use on one host for one task (or one loop item)."""

    host: ManagedHost
    connector: Connector
    vars: Mapping[str, Any]  # inventory vars, play vars, registered results, extra vars, `item`
    check_mode: bool
    shared: SharedT  # the caller's object (the deploy passes its CA and settings)
    templates_dir: Path  # where `template` finds src
    files_dir: Path  # where `copy` finds a relative src (the playbook's folder)


Module = Callable[[TaskContext[Any], dict[str, Any]], ModuleRun]
