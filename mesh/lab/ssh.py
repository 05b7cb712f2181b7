"""SSH into lab nodes with the lab's key and known_hosts, strictly checked (never a blind acceptance).
It builds and runs `ssh` command lines only; the lab's key pair and known_hosts are written by lifecycle.py.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.lab.errors import LabError, require_tools, run


@dataclass(frozen=True)
class LabSsh:
    private_key: Path
    known_hosts: Path
    connect_timeout: int = 5

    def argv(self, address: str, command: Sequence[str], batch: bool = True) -> list[str]:
        options = ["-i", str(self.private_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                   "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
                   "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                   "-o", "LogLevel=ERROR", "-o", "ControlMaster=no", "-F", "/dev/null"]
        if batch:
            options += ["-o", "BatchMode=yes"]
        # one remote word list, quoted so the remote shell sees exactly these arguments
        remote = " ".join(shlex.quote(word) for word in command) if len(command) > 1 else command[0]
        return ["ssh", *options, "--", f"root@{address}", remote]

    def run(self, address: str, command: Sequence[str], timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command on a node and return its result (no exception on a non-zero exit)."""
        return run(self.argv(address, command), check=False, timeout=timeout, input=input)

    def interactive(self, address: str, command: Sequence[str]) -> int:
        """Run with this process's stdin, stdout and stderr; return the remote exit code (255: ssh failed)."""
        require_tools("ssh")
        if not command:
            raise LabError("no command given", hint="mesh lab exec HOST -- COMMAND [ARGS...]")
        return subprocess.call(self.argv(address, command, batch=True))


def make_key_pair(private_key: Path) -> None:
    if private_key.exists() and private_key.with_suffix(".pub").exists():
        return
    private_key.unlink(missing_ok=True)
    private_key.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mesh-lab", "-f", str(private_key)])


def write_known_hosts(path: Path, entries: dict[str, str]) -> None:
    """One line per node address with the public key generated for that node."""
    text = "".join(f"{address} {key}\n" for address, key in sorted(entries.items()))
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
