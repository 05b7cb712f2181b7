"""The SSH connector's bounds, on a loopback SSH server behind a relay that can be cut: a command past its
timeout fails (exit 124) and the connection stays usable; a host that goes silent mid-command or between
commands is unreachable within Timeouts.unreachable_after; one that never answers fails after the connect
timeout. Large input is sent whole."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.hosts.errors import HostUnreachable
from mesh.hosts.ssh import SSHConnector
from mesh.hosts.timeouts import Timeouts
from mesh.inventory.model import Connection
from mesh.testing.ssh_server import LoopbackSsh, loopback_ssh

FAST = Timeouts(connect=1.0, command=30.0, keepalive_interval=0.3, keepalive_count_max=2)
SLACK = 2.0  # thread scheduling and the watch's one-second tick


@pytest.fixture
def ssh(tmp_path: Path) -> Iterator[LoopbackSsh]:
    with loopback_ssh(tmp_path) as server:
        yield server


def connector(ssh: LoopbackSsh, timeouts: Timeouts = FAST) -> SSHConnector:
    connection = Connection("127.0.0.1", port=ssh.port, user="mesh", private_key_file=str(ssh.key_file),
                            known_hosts=str(ssh.known_hosts))
    return SSHConnector(connection, name="vm1", timeouts=timeouts)


def test_output_errors_and_exit_codes_come_back(ssh: LoopbackSsh) -> None:
    conn = connector(ssh)
    try:
        assert conn.run("echo hello").text() == "hello"
        failed = conn.run("fail 3")
        assert failed.code == 3 and failed.error_text() == "it failed"
        assert conn.run("count", stdin=b"x" * (9 * 1024 * 1024 + 7)).text() == str(9 * 1024 * 1024 + 7)
    finally:
        conn.close()


def test_a_command_past_its_timeout_fails_and_the_connection_stays(ssh: LoopbackSsh) -> None:
    conn = connector(ssh)
    try:
        started = time.monotonic()
        result = conn.run("sleep 5", timeout=0.5)
        assert result.code == 124 and "timed out after 0.5 s" in result.error_text()
        assert time.monotonic() - started < 0.5 + SLACK
        assert conn.run("echo still").text() == "still"
    finally:
        conn.close()


def test_the_default_command_timeout_applies(ssh: LoopbackSsh) -> None:
    conn = connector(ssh, Timeouts(connect=1.0, command=0.5, keepalive_interval=0.3, keepalive_count_max=2))
    try:
        assert conn.run("sleep 5").code == 124
    finally:
        conn.close()


def test_a_host_silent_mid_command_is_unreachable_within_the_bound(ssh: LoopbackSsh) -> None:
    conn = connector(ssh)
    conn.run("echo up")
    cut = threading.Timer(0.3, ssh.relay.cut.set)
    cut.start()
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as caught:
        conn.run("sleep 60")
    assert time.monotonic() - started < 0.3 + FAST.unreachable_after + SLACK
    assert "no answer from the host" in str(caught.value) and "keepalives" in str(caught.value)
    conn.close()


def test_a_host_silent_between_commands_is_unreachable_within_the_bound(ssh: LoopbackSsh) -> None:
    conn = connector(ssh)
    conn.run("echo up")
    ssh.relay.cut.set()
    started = time.monotonic()
    with pytest.raises(HostUnreachable):
        conn.run("echo lost")
    assert time.monotonic() - started < max(FAST.connect, FAST.unreachable_after) + SLACK
    conn.close()


def test_a_host_that_answers_keepalives_is_not_given_up_on_a_long_command(ssh: LoopbackSsh) -> None:
    conn = connector(ssh)
    try:
        result = conn.run(f"sleep {FAST.unreachable_after * 2}")  # silent output, answered keepalives
        assert result.code == 0
    finally:
        conn.close()


def test_a_host_silent_when_connecting_fails_after_the_connect_timeout(ssh: LoopbackSsh) -> None:
    ssh.relay.cut.set()  # TCP connects (to the relay), no SSH banner ever comes
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as caught:
        connector(ssh).run("echo never")
    assert time.monotonic() - started < FAST.connect * 3 + SLACK
    assert "cannot connect" in str(caught.value) and "connect timeout 1 s" in str(caught.value)
