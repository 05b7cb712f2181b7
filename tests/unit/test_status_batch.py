"""The batch of reads `mesh status` sends to a host (mesh/status/batch.py), run by a real /bin/sh here: each
command's exit code, stdout and stderr come back whole, whatever they hold, and one command that exits or fails
does not stop the others."""

from __future__ import annotations

import pytest

from mesh.hosts.connection import CommandResult, LocalConnector
from mesh.hosts.errors import RemoteError
from mesh.inventory.model import Connection
from mesh.status.batch import batch_script, parse_output, run_batch, script_commands, script_output

LOCAL = LocalConnector(Connection("127.0.0.1", local=True))


def test_each_command_comes_back_whole() -> None:
    commands = {
        "tilde": "printf 'a~b~\\n\\n'",  # the script splits on the last ~: output may hold some
        "exits": "echo out; echo err >&2; exit 3",  # an exit leaves only its own subshell
        "quotes": """printf '%s' "it's \\"quoted\\" $((1 + 1))" """,
        "missing": "cat /nonexistent/mesh-status-test",
        "empty": "true",
        "after": "echo still here",
    }
    results = run_batch(LOCAL, commands, timeout=30)
    assert results["tilde"] == CommandResult(0, b"a~b~\n\n", b"")
    assert results["exits"] == CommandResult(3, b"out\n", b"err\n")
    assert results["quotes"] == CommandResult(0, b'it\'s "quoted" 2', b"")
    assert results["missing"].code == 1 and b"No such file" in results["missing"].stderr
    assert results["empty"] == CommandResult(0, b"", b"")
    assert results["after"] == CommandResult(0, b"still here\n", b"")


def test_the_script_names_its_commands_and_its_output_parses_back() -> None:
    commands = ["echo one", "cat '/etc/mesh/proxies/web-8080/envoy.yaml'"]
    assert script_commands(batch_script(commands)) == commands
    results = [CommandResult(0, b"one\n", b""), CommandResult(1, b"", b"no such file\n")]
    assert parse_output(script_output(results), 2) == results


def test_a_batch_cut_short_is_an_error_naming_the_first_missing_command() -> None:
    cut = script_output([CommandResult(0, b"one\n", b"")])
    with pytest.raises(RemoteError, match="stopped before command 1 of 3"):
        parse_output(cut, 3)
