"""SSHConnector's streams on a loopback SSH server: a streamed command's output as it comes and its failure, a
host gone silent under a stream (unreachable within the bound), and a direct-tcpip channel the host refuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.hosts.errors import HostUnreachable, RemoteError
from mesh.hosts.ssh import SSHConnector
from mesh.hosts.timeouts import Timeouts
from mesh.inventory.model import Connection
from mesh.testing.ssh_server import LoopbackSsh, loopback_ssh

FAST = Timeouts(connect=1.0, command=30.0, keepalive_interval=0.3, keepalive_count_max=2)
SLACK = 2.0


@pytest.fixture
def ssh(tmp_path: Path) -> Iterator[LoopbackSsh]:
    with loopback_ssh(tmp_path) as server:
        yield server


@pytest.fixture
def conn(ssh: LoopbackSsh) -> Iterator[SSHConnector]:
    connection = Connection("127.0.0.1", port=ssh.port, user="mesh", private_key_file=str(ssh.key_file),
                            known_hosts=str(ssh.known_hosts))
    made = SSHConnector(connection, name="vm1", timeouts=FAST)
    yield made
    made.close()


def test_a_stream_gives_the_output_then_ends_with_the_command(conn: SSHConnector) -> None:
    assert b"".join(conn.stream("echo one line")) == b"one line\n"
    assert conn.run("echo still").text() == "still"  # the connection serves commands alongside


def test_a_failed_streamed_command_raises_with_its_stderr(conn: SSHConnector) -> None:
    with pytest.raises(RemoteError, match=r"^exit 3: it failed$"):
        list(conn.stream("fail 3"))


def test_a_host_silent_under_a_stream_is_unreachable_within_the_bound(ssh: LoopbackSsh, conn: SSHConnector) -> None:
    conn.run("echo up")
    threading.Timer(0.3, ssh.relay.cut.set).start()
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match="no answer from the host"):
        list(conn.stream("sleep 60"))
    assert time.monotonic() - started < 0.3 + FAST.unreachable_after + SLACK


def test_a_tunnel_the_host_refuses_is_a_connection_error(conn: SSHConnector) -> None:
    with pytest.raises(ConnectionRefusedError, match=r"^vm1 cannot connect to 10\.77\.0\.11:20000: "):
        conn.open_tunnel("10.77.0.11", 20000)
    assert conn.run("echo still").text() == "still"
