"""How the controller runs a mesh-ctl verb on a host: over a persistent SSH connection (paramiko, the host key
checked against the spec's known_hosts lines only), or locally through the real script (tests, bench).

It owns connections and running one command with stdin; it must not know the verbs' meaning (protocol.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import paramiko
from paramiko.hostkeys import HostKeyEntry

from mesh.controller.spec import SSH_KEY, HostSpec
from mesh.errors import MeshError

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 120.0  # an apply waits for Envoy to take each file (15 s each at most)
KEEPALIVE_S = 10


class TransportError(MeshError):
    """A host could not be reached, or the connection broke while a verb ran: reconnect later."""


@dataclass(frozen=True)
class CtlResult:
    """A verb's exit code and output (stderr holds the script's refusal when it refused)."""

    exit_code: int
    stdout: str
    stderr: str = field(default="", repr=False)


class CtlSession(Protocol):
    """One open connection to a host's mesh-ctl."""

    def run(self, command: str, stdin: bytes = b"", timeout: float = COMMAND_TIMEOUT_S) -> CtlResult: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Opens a CtlSession to a host; raises TransportError when it cannot."""

    def open(self, host: HostSpec) -> CtlSession: ...


# --- SSH ---

def host_keys(host: HostSpec) -> paramiko.HostKeys:
    """The host keys the spec trusts for this host (its known_hosts lines, nothing else)."""
    keys = paramiko.HostKeys()
    for number, line in enumerate(host.known_hosts, 1):
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (paramiko.SSHException, ValueError):
            entry = None
        if entry is None:
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    return keys


class SshTransport:
    """As HostSpec.user with the controller's own key; an unknown or changed host key is refused."""

    def __init__(self, key_path: str = SSH_KEY, connect_timeout: float = CONNECT_TIMEOUT_S,
                 keepalive_s: int = KEEPALIVE_S) -> None:
        self.key_path = key_path
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s

    def open(self, host: HostSpec) -> CtlSession:
        client = paramiko.SSHClient()
        trusted = client.get_host_keys()
        for name, keys in host_keys(host).items():
            for key_type, key in keys.items():
                trusted.add(name, key_type, key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(host.address, host.port, username=host.user, key_filename=self.key_path,
                           look_for_keys=False, allow_agent=False, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            raise TransportError(f"cannot reach {host.user}@{host.address}:{host.port}: {_reason(exc)}") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(self.keepalive_s)
        return SshSession(host.name, client)


class SshSession:
    def __init__(self, name: str, client: paramiko.SSHClient) -> None:
        self.name = name
        self.client = client

    def run(self, command: str, stdin: bytes = b"", timeout: float = COMMAND_TIMEOUT_S) -> CtlResult:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise TransportError(f"{self.name}: the connection is closed")
        try:
            channel = transport.open_session(timeout=CONNECT_TIMEOUT_S)
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout = channel.makefile("rb").read()
            stderr = channel.makefile_stderr("rb").read()
            code = channel.recv_exit_status()
            channel.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(f"{self.name}: {command.split()[0]} failed on the connection: "
                                 f"{_reason(exc)}") from exc
        return CtlResult(code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    def close(self) -> None:
        self.client.close()


# --- local: the real script under a temp root (tests, bench) ---

class LocalTransport:
    """Runs `sh SCRIPT "COMMAND"` (as sshd's forced command would) with MESH_CTL_ROOT=root_for(host) and `env`."""

    def __init__(self, script: str, root_for: Callable[[HostSpec], str],
                 env: Mapping[str, str] | None = None) -> None:
        self.script = script
        self.root_for = root_for
        self.env = dict(env or {})
        self.opened: list[str] = []  # host names, in order: tests see reconnects

    def open(self, host: HostSpec) -> CtlSession:
        self.opened.append(host.name)
        env = {**os.environ, **self.env, "MESH_CTL_ROOT": self.root_for(host)}
        return LocalSession(self.script, env)


class LocalSession:
    def __init__(self, script: str, env: Mapping[str, str]) -> None:
        self.script = script
        self.env = dict(env)

    def run(self, command: str, stdin: bytes = b"", timeout: float = COMMAND_TIMEOUT_S) -> CtlResult:
        try:
            done = subprocess.run(["sh", self.script, command], input=stdin, capture_output=True,
                                  env=self.env, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransportError(f"mesh-ctl {command.split()[0]}: {exc}") from exc
        return CtlResult(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))

    def close(self) -> None:
        pass


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
