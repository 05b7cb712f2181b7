"""A FakeHost answering mesh status's batched reads (mesh.status.batch): each command of the batch as the fake
host answers it alone (its stubs first, then its built-in commands), and `cat PATH` from its files. For unit
tests only.
"""

from __future__ import annotations

import re
import shlex

from mesh.hosts.connection import CommandResult
from mesh.status.batch import MARKER, script_commands, script_output
from mesh.testing.fake_connector import FakeConnector, FakeHost


def answer_batched_reads(host: FakeHost) -> None:
    """Make `host` answer batch scripts (call once per host, before the reads)."""
    connector = FakeConnector(host)

    def answer(script: str, stdin: bytes | None) -> CommandResult:
        return CommandResult(0, script_output([_one(connector, host, cmd) for cmd in script_commands(script)]), b"")

    host.stub(re.escape(MARKER), answer)


def _one(connector: FakeConnector, host: FakeHost, cmd: str) -> CommandResult:
    words = shlex.split(cmd)
    if len(words) == 2 and words[0] == "cat" and not any(pattern.search(cmd) for pattern, _ in host.stubs):
        found = host.files.get(words[1])
        if found is None or found.data is None:
            return CommandResult(1, b"", f"cat: {words[1]}: No such file or directory".encode())
        host.commands.append(cmd)
        return CommandResult(0, found.data, b"")
    return connector.run(cmd)
