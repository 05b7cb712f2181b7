"""known_hosts markers: a host presenting a key that a `@revoked` line names is unreachable (exit 3), and a
`@cert-authority` line for a host is refused with a clear message; neither is skipped silently any more.
The connection tests talk to a paramiko SSH server on loopback (host key exchange only: no login happens)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from mesh.errors import EXIT_UNREACHABLE
from mesh.hosts.errors import HostUnreachable
from mesh.hosts.known_hosts import host_matches, read_known_hosts
from mesh.hosts.ssh import SSHConnector
from mesh.inventory.model import Connection


@dataclass
class LoopbackServer:
    """An SSH server on 127.0.0.1 that only shows its host key; counts the connections it accepted."""

    key: paramiko.PKey
    port: int
    accepted: int = 0

    def line(self, marker: str = "", pattern: str | None = None) -> str:
        name = pattern or f"[127.0.0.1]:{self.port}"
        return f"{marker + ' ' if marker else ''}{name} {self.key.get_name()} {self.key.get_base64()}\n"


@pytest.fixture(scope="module")
def host_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


@pytest.fixture
def server(host_key: paramiko.PKey) -> Iterator[LoopbackServer]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    found = LoopbackServer(host_key, listener.getsockname()[1])
    stop = threading.Event()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            found.accepted += 1
            transport = paramiko.Transport(conn)
            transport.add_server_key(host_key)
            transports.append(transport)
            try:
                transport.start_server(server=paramiko.ServerInterface())
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield found
    stop.set()
    thread.join(timeout=5)
    listener.close()
    for transport in transports:
        transport.close()


def connector(server: LoopbackServer, known_hosts: Path) -> SSHConnector:
    return SSHConnector(Connection("127.0.0.1", port=server.port, user="nobody", known_hosts=str(known_hosts)),
                        name="vm1")


def unreachable(server: LoopbackServer, known_hosts: Path) -> HostUnreachable:
    with pytest.raises(HostUnreachable) as caught:
        connector(server, known_hosts).run("true")
    assert caught.value.exit_code == EXIT_UNREACHABLE
    return caught.value


def test_a_listed_key_gets_past_the_host_key_check(server: LoopbackServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.line())
    error = unreachable(server, known)  # no user can log in: the host key check passed, authentication failed
    assert "authentication" in str(error).lower(), str(error)


def test_a_revoked_key_is_unreachable_even_when_also_listed(server: LoopbackServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.line() + "# revoked after the leak\n" + server.line("@revoked", "*"))
    error = unreachable(server, known)
    assert "REVOKED" in str(error) and f"{known}:3" in str(error), str(error)


def test_a_revoked_key_alone_is_not_reported_as_unknown(server: LoopbackServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.line("@revoked"))
    assert "REVOKED" in str(unreachable(server, known))


def test_a_cert_authority_line_is_refused_before_connecting(server: LoopbackServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.line() + server.line("@cert-authority", "*"))
    error = unreachable(server, known)
    assert "@cert-authority" in str(error) and "host certificates" in str(error), str(error)
    assert f"{known}:2" in str(error)
    assert server.accepted == 0


def test_a_cert_authority_line_for_other_hosts_does_not_matter(server: LoopbackServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.line("@cert-authority", "*.example.com") + server.line())
    assert "authentication" in str(unreachable(server, known)).lower()


def test_reading_keeps_revoked_keys_out_of_the_trusted_ones(host_key: paramiko.PKey, tmp_path: Path) -> None:
    other = paramiko.ECDSAKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text(f"vm1 {host_key.get_name()} {host_key.get_base64()}\n"
                     f"vm2 {other.get_name()} {other.get_base64()}\n"
                     f"@revoked * {host_key.get_name()} {host_key.get_base64()}\n"
                     "@cert-authority *.corp ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDU\n"
                     "garbage line\n")
    read = read_known_hosts(str(known))
    assert [entry.hostnames for entry in read.entries] == [["vm2"]]
    assert read.revoked_line(host_key) == 3 and read.revoked_line(other) is None
    assert [marked.line for marked in read.refused_lines("db.corp", 22)] == [4]
    assert read.refused_lines("vm1", 22) == []


@pytest.mark.parametrize(
    ("patterns", "address", "port", "expected"),
    [(("vm1",), "vm1", 22, True), (("vm1",), "vm1", 2222, False), (("[vm1]:2222",), "vm1", 2222, True),
     (("*.corp",), "db.corp", 22, True), (("*.corp", "!db.corp"), "db.corp", 22, False),
     (("10.0.0.?",), "10.0.0.7", 22, True), (("VM1",), "vm1", 22, True)],
)
def test_host_patterns(patterns: tuple[str, ...], address: str, port: int, expected: bool) -> None:
    assert host_matches(patterns, address, port) is expected


def test_hashed_host_patterns() -> None:
    hashed = paramiko.HostKeys.hash_host("[127.0.0.1]:2222")
    assert host_matches((hashed,), "127.0.0.1", 2222)
    assert not host_matches((hashed,), "127.0.0.1", 22)
