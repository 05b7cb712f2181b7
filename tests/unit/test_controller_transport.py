"""The controller's SSH transport against a loopback SSH server (mesh.testing.ssh_server): a command with stdin
and its exit code over one persistent connection, and a host key the spec does not list refused before any
command runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.controller.transport import SshTransport, TransportError
from mesh.testing.fake_ctl import host_spec
from mesh.testing.ssh_server import loopback_ssh


def test_commands_run_over_one_connection_with_stdin_and_exit_codes(tmp_path: Path) -> None:
    with loopback_ssh(tmp_path) as server:
        host = host_spec("vm1", (), port=server.port, known_hosts=tuple(server.known_hosts.read_text().splitlines()))
        session = SshTransport(str(server.key_file)).open(host)
        try:
            assert session.run("echo state").stdout == "state\n"
            assert session.run("count", b"x" * 100_000).stdout == "100000\n"
            failed = session.run("fail 3")
            assert (failed.exit_code, failed.stderr) == (3, "it failed\n")
        finally:
            session.close()


def test_a_host_key_the_spec_does_not_list_is_refused(tmp_path: Path) -> None:
    with loopback_ssh(tmp_path) as server:
        other = "[127.0.0.1]:1 " + server.known_hosts.read_text().split(" ", 1)[1]  # the key, for another port
        for known in ((), (other.strip(),)):
            host = host_spec("vm1", (), port=server.port, known_hosts=known)
            with pytest.raises(TransportError, match=r"cannot reach mesh-ctl@127.0.0.1:\d+: .* not found in known_hosts"):
                SshTransport(str(server.key_file)).open(host)
