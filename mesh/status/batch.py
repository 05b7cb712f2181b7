"""Many read-only commands on one host in one round trip: a POSIX sh script runs each (in a subshell, so one
that exits or fails does not stop the rest) and prints its exit code, stdout and stderr as one base64 line.

It owns that script and its parsing, both sides (the fake host in mesh.testing answers the same script); it
must not decide what to read. Commands must only read: nothing here undoes a change.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

from mesh.hosts.connection import CommandResult, Connector
from mesh.hosts.errors import RemoteError

MARKER = "# mesh status: batched reads"
_HEADER = f"""{MARKER}
t=$(mktemp) || exit 1
trap 'rm -f "$t"' EXIT
r() {{
  o=$( (eval "$(printf %s "$2" | base64 -d)") 2>"$t"; printf '~%s' "$?")
  printf '%s %s %s %s\\n' "$1" "${{o##*~}}" "$(printf %s "${{o%~*}}" | base64 | tr -d '\\n')" \\
    "$(base64 < "$t" | tr -d '\\n')"
}}
"""


def batch_script(commands: Sequence[str]) -> str:
    """The script running `commands` one after another; its output is read back by `parse_output`."""
    lines = [_HEADER]
    for index, command in enumerate(commands):
        lines.append(f"r {index} {base64.b64encode(command.encode()).decode()}\n")
    return "".join(lines)


def script_commands(script: str) -> list[str]:
    """The commands of a batch script, in order (what a fake host runs one by one)."""
    found = []
    for line in script.splitlines():
        if line.startswith("r "):
            _, _, encoded = line.split(" ")
            found.append(base64.b64decode(encoded).decode())
    return found


def script_output(results: Sequence[CommandResult]) -> bytes:
    """What the script prints for these results (what a fake host answers)."""
    return b"".join(b"%d %d %s %s\n" % (index, result.code, base64.b64encode(result.stdout),
                                       base64.b64encode(result.stderr))
                    for index, result in enumerate(results))


def parse_output(stdout: bytes, count: int) -> list[CommandResult]:
    """The result of each of `count` commands; raises RemoteError when the script did not run to its end."""
    results: dict[int, CommandResult] = {}
    for line in stdout.decode(errors="replace").splitlines():
        parts = line.split(" ")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        results[int(parts[0])] = CommandResult(int(parts[1]), base64.b64decode(parts[2]), base64.b64decode(parts[3]))
    missing = [index for index in range(count) if index not in results]
    if missing:
        raise RemoteError(f"the batched reads stopped before command {missing[0]} of {count}")
    return [results[index] for index in range(count)]


def run_batch(connector: Connector, commands: Mapping[str, str], timeout: float) -> dict[str, CommandResult]:
    """Run the commands (key -> shell command) in one round trip; the result of each by its key."""
    keys = list(commands)
    if not keys:
        return {}
    done = connector.run(batch_script([commands[key] for key in keys]), timeout=timeout)
    try:
        results = parse_output(done.stdout, len(keys))
    except RemoteError as exc:
        raise RemoteError(f"{exc}: {done.error_text()[:300]}") from None
    return dict(zip(keys, results, strict=True))
