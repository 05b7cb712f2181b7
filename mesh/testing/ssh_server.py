"""A small SSH server on loopback (paramiko's server side) behind a relay that can be cut like a pulled cable,
for the SSH connector's timeout and keepalive tests. It runs a few commands of its own (`echo`, `sleep`,
`count` of stdin bytes, `fail N`); it must not run a shell. Unit tests only.
"""

from __future__ import annotations

import contextlib
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko


class _Server(paramiko.ServerInterface):
    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=_execute, args=(channel, command.decode()), daemon=True).start()
        return True


def _execute(channel: paramiko.Channel, command: str) -> None:
    words = shlex.split(command)
    code = 0
    time.sleep(0.05)  # let the server answer the exec request before the command's output (sshd does)
    try:
        if words[0] == "echo":
            channel.sendall((" ".join(words[1:]) + "\n").encode())
        elif words[0] == "sleep":
            time.sleep(float(words[1]))
        elif words[0] == "count":
            total = 0
            while chunk := channel.recv(65536):
                total += len(chunk)
            channel.sendall(f"{total}\n".encode())
        elif words[0] == "fail":
            channel.sendall_stderr(b"it failed\n")
            code = int(words[1])
        else:
            channel.sendall_stderr(f"unknown command {words[0]}\n".encode())
            code = 127
        channel.send_exit_status(code)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        channel.close()


@dataclass
class Relay:
    """Forwards TCP between the client and the server until cut: then bytes are held back in both directions,
    as when a host's link goes down (no reset, no FIN: the peers only hear nothing)."""

    target: tuple[str, int]
    listener: socket.socket = field(default_factory=socket.socket)
    cut: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def start(self) -> None:
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, one: socket.socket, other: socket.socket) -> None:
        peers = {one: other, other: one}
        with one, other:
            while True:
                if self.cut.is_set():
                    time.sleep(0.05)  # hold everything back: nothing is read, nothing forwarded
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    peers[sock].sendall(data)


@dataclass
class LoopbackSsh:
    """Where the test connects (the relay's port), the line for known_hosts, the client's key file."""

    port: int
    known_hosts: Path
    key_file: Path
    relay: Relay


@contextlib.contextmanager
def loopback_ssh(folder: Path) -> Iterator[LoopbackSsh]:
    """An SSH server reached through a relay; its host key is in folder/known_hosts for 127.0.0.1:PORT."""
    host_key = paramiko.ECDSAKey.generate()
    client_key = paramiko.ECDSAKey.generate()
    key_file = folder / "id_ecdsa"
    client_key.write_private_key_file(str(key_file))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    transports: list[paramiko.Transport] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            transport = paramiko.Transport(conn)
            transport.add_server_key(host_key)
            transports.append(transport)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=_Server())

    threading.Thread(target=serve, daemon=True).start()
    relay = Relay(listener.getsockname())
    relay.start()
    known = folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{relay.port} {host_key.get_name()} {host_key.get_base64()}\n")
    try:
        yield LoopbackSsh(relay.port, known, key_file, relay)
    finally:
        stop.set()
        relay.listener.close()
        listener.close()
        for transport in transports:
            transport.close()
