"""The SSH connector: fabric/paramiko, host keys checked against the inventory's known_hosts file only.
It owns connecting, host key checks and running commands; it must not know about tasks or modules.

It does not read ~/.ssh/config: everything that decides how a host is reached is in the inventory, so a
deploy behaves the same from every machine (Ansible's own options, INVENTORY.md, are the only source).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import paramiko
from fabric import Config
from fabric import Connection as FabricConnection

from mesh.hosts.connection import CommandResult, become_prefix, get_via, put_via, wrap_become
from mesh.hosts.errors import HostUnreachable, RemoteError
from mesh.hosts.known_hosts import KnownHosts, read_known_hosts
from mesh.hosts.timeouts import DEFAULT_TIMEOUTS, Keepalive, Timeouts
from mesh.inventory.model import Connection
from mesh.inventory.values import parse_proxy_jump

SEND_SLICE = 256 * 1024
INITIAL_WINDOW = 4 * 1024 * 1024  # more than sshd's first channel window (2 MiB)
POLL = 0.5  # seconds a read or a send waits before looking at the deadline and the keepalive again


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it: `SHA256:...`."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"unknown host key for {hostname}")
        self.hostname = hostname
        self.key = key


class RevokedHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey, line: int) -> None:
        super().__init__(f"revoked host key for {hostname}")
        self.hostname = hostname
        self.key = key
        self.line = line


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, keeping the key seen so the message can show its fingerprint, and telling a
    key known_hosts revokes (left out of the trusted keys, so it always lands here) from an unknown one."""

    def __init__(self, known: KnownHosts, strict: bool = True) -> None:
        self._known = known
        self._strict = strict

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        revoked = self._known.revoked_line(key)
        if revoked is None and not self._strict:
            return
        transport = client.get_transport()
        if transport is not None:
            transport.close()
        if revoked is not None:
            raise RevokedHostKey(hostname, key, revoked)
        raise UnknownHostKey(hostname, key)


class SSHConnector:
    """Runs commands on one host over SSH (connects on first use; one connection per host).

    >>> conn = SSHConnector(host.connection, name="vm1"); conn.run("uname -r").text()
    """

    def __init__(self, connection: Connection, name: str | None = None,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self._connection = connection
        self._timeouts = timeouts
        self._keepalive: Keepalive | None = None
        self._name = name or connection.address
        self._known_hosts = os.path.expanduser(connection.known_hosts)
        self._user = connection.user or getpass.getuser()
        self._prefix = become_prefix(connection, self._user)
        self._fabric: FabricConnection | None = None
        self._lock = threading.Lock()

    # ---- connecting -----------------------------------------------------------------------------------

    def _client(self, address: str, port: int, user: str, gateway: FabricConnection | None) -> FabricConnection:
        config = Config(overrides={"load_ssh_configs": False})
        key_file = self._connection.private_key_file
        wait = self._timeouts.connect
        connect_kwargs: dict[str, Any] = {"look_for_keys": key_file is None, "allow_agent": key_file is None,
                                          "banner_timeout": wait, "auth_timeout": wait, "channel_timeout": wait}
        if key_file:
            connect_kwargs["key_filename"] = os.path.expanduser(key_file)
        made = FabricConnection(address, user=user, port=port, config=config, gateway=gateway,
                                connect_timeout=wait, connect_kwargs=connect_kwargs)
        known = self._read_known_hosts(address, port)
        trusted = made.client.get_host_keys()
        for name, keys in known.host_keys().items():
            for key_type, key in keys.items():
                trusted.add(name, key_type, key)
        made.client.set_missing_host_key_policy(_RejectUnknown(known, self._connection.strict_host_key_checking))
        return made

    def _read_known_hosts(self, address: str, port: int) -> KnownHosts:
        """The known_hosts file, refusing a host that a `@cert-authority` line covers: mesh checks host keys,
        not host certificates, and must not silently ignore a line that says how the host is trusted."""
        try:
            known = read_known_hosts(self._known_hosts)
        except OSError as exc:
            raise HostUnreachable(self._name, f"cannot read the known_hosts file {self._known_hosts}: "
                                  f"{exc.strerror}") from None
        for marked in known.refused_lines(address, port):
            what = ("a @cert-authority line: mesh does not support SSH host certificates"
                    if marked.marker == "@cert-authority" else f"an unknown marker {marked.marker!r}")
            raise HostUnreachable(
                self._name, f"{self._known_hosts}:{marked.line} has {what} for {address}",
                hint="list the host's own key in known_hosts (check it, e.g. with ssh-keyscan) instead")
        return known

    def _gateway(self) -> FabricConnection | None:
        jump = self._connection.proxy_jump
        if not jump:
            return None
        gateway: FabricConnection | None = None
        for hop in parse_proxy_jump(jump):  # ssh's ProxyJump: hops in order, each through the previous one
            gateway = self._client(hop.host, hop.port, hop.user or self._user, gateway)
        return gateway

    def _open(self) -> FabricConnection:
        if self._fabric is not None and self._fabric.is_connected:
            return self._fabric
        if not os.path.isfile(self._known_hosts):
            raise HostUnreachable(self._name, f"the known_hosts file {self._known_hosts} does not exist",
                                  hint="set mesh_known_hosts or -o UserKnownHostsFile= to the right file")
        conn = self._connection
        where = f"{conn.address}:{conn.port}"
        try:
            fabric_conn = self._client(conn.address, conn.port, self._user, self._gateway())
            fabric_conn.open()
        except RevokedHostKey as exc:
            raise HostUnreachable(
                self._name,
                f"host key of {exc.hostname} is REVOKED at {self._known_hosts}:{exc.line} (the host offered "
                f"{exc.key.get_name()} {fingerprint(exc.key)}); mesh does not connect to it",
                hint="if the host was re-keyed, check its new key and list it in that file") from None
        except UnknownHostKey as exc:
            raise HostUnreachable(
                self._name,
                f"host key of {exc.hostname} is not in {self._known_hosts} (the host offered "
                f"{exc.key.get_name()} {fingerprint(exc.key)}); mesh connects only to known hosts",
                hint="add the host's key to that file after checking it") from None
        except paramiko.BadHostKeyException as exc:
            revoked = self._revoked_line(exc.key)
            if revoked is not None:  # the host offered a revoked key of a type known_hosts lists another of
                raise HostUnreachable(
                    self._name, f"host key of {exc.hostname} is REVOKED at {self._known_hosts}:{revoked} (the "
                    f"host offered {exc.key.get_name()} {fingerprint(exc.key)}); mesh does not connect to it") from None
            expected = exc.expected_key
            listed = f"{expected.get_name()} {fingerprint(expected)}" if expected is not None else "another key type"
            raise HostUnreachable(
                self._name,
                f"host key of {exc.hostname} CHANGED: {self._known_hosts} has {listed}, "
                f"the host offered {exc.key.get_name()} {fingerprint(exc.key)}",
                hint=f"if the host was rebuilt, check the new key and replace its line in {self._known_hosts}",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise HostUnreachable(self._name, f"SSH authentication failed at {where} as {self._user}: {exc}",
                                  hint="check ansible_user and ansible_ssh_private_key_file") from None
        except (TimeoutError, OSError, paramiko.SSHException, EOFError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else (str(exc) or type(exc).__name__)
            raise HostUnreachable(self._name, f"cannot connect to {where}: {why} (connect timeout "
                                  f"{self._timeouts.connect:g} s)") from None
        self._fabric = fabric_conn
        transport = fabric_conn.client.get_transport()
        if transport is not None:
            self._keepalive = Keepalive(transport, self._timeouts)
        return fabric_conn

    def _revoked_line(self, key: paramiko.PKey) -> int | None:
        try:
            return read_known_hosts(self._known_hosts).revoked_line(key)
        except OSError:
            return None

    # ---- the connector interface ------------------------------------------------------------------------

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        """Run cmd; it fails with exit 124 after timeout seconds (default: Timeouts.command). A host that goes
        silent meanwhile (keepalives unanswered) raises HostUnreachable."""
        with self._lock:
            transport, channel = self._new_session()
            keepalive = self._keepalive
            heard = keepalive.heard if keepalive is not None else _nothing
            try:
                result = _exec(channel, wrap_become(cmd, self._prefix), stdin, timeout or self._timeouts.command,
                               heard)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if not transport.is_active():
                    result = None
                else:  # the host refused this channel: a failed command, as ssh's own exit 255
                    result = CommandResult(255, b"", f"ssh: {exc}".encode())
            if result is None:  # the connection died under the command
                self._gone()
                raise HostUnreachable(self._name, self._broken("the SSH connection broke during a command"))
            return result

    def _broken(self, fallback: str) -> str:
        keepalive = self._keepalive
        if keepalive is not None and keepalive.silent_for is not None:
            every = self._timeouts.keepalive_interval
            return (f"no answer from the host for {keepalive.silent_for:.0f} s (SSH keepalives every {every:g} s "
                    f"unanswered): given up as unreachable")
        return fallback

    def _new_session(self) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A session channel on the (re)opened connection; call with the lock held. HostUnreachable when the
        connection broke."""
        transport = self._open().client.get_transport()
        try:
            assert transport is not None
            return transport, transport.open_session(timeout=self._timeouts.connect)
        except (paramiko.SSHException, OSError, AssertionError) as exc:
            self._gone()
            raise HostUnreachable(self._name, self._broken(f"the SSH connection broke: {exc}")) from None

    def _gone(self) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
        if self._fabric is not None:
            self._fabric.close()
        self._fabric = None

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        put_via(self, data, path, mode, owner, group)

    def get(self, path: str) -> bytes | None:
        return get_via(self, path)

    def close(self) -> None:
        with self._lock:
            self._gone()

    # ---- streams (mesh logs --follow, metrics through a controller) --------------------------------------

    def open_tunnel(self, address: str, port: int) -> paramiko.Channel:
        """A `direct-tcpip` channel to address:port made by this host (as `ssh -W`): a socket-like stream whose
        TCP connection comes from the host's address. OSError when the host cannot connect there."""
        with self._lock:
            transport = self._open().client.get_transport()
        if transport is None or not transport.is_active():
            with self._lock:
                self._gone()
            raise HostUnreachable(self._name, self._broken("the SSH connection broke"))
        try:
            channel = transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                             timeout=self._timeouts.connect)
        except paramiko.ChannelException as exc:
            raise ConnectionRefusedError(f"{self._name} cannot connect to {address}:{port}: {exc.text}") from None
        except (paramiko.SSHException, EOFError) as exc:
            raise OSError(f"{self._name} cannot open a channel to {address}:{port}: {exc}") from None
        channel.settimeout(self._timeouts.command)
        return channel

    def stream(self, cmd: str) -> Iterator[bytes]:
        """Run cmd (with become) and yield its stdout as it comes, until it exits; closing the iterator closes the
        channel. A command that fails raises RemoteError with its stderr; a host gone silent, HostUnreachable."""
        with self._lock:
            transport, channel = self._new_session()
        heard = self._keepalive.heard if self._keepalive is not None else _nothing
        stderr: list[bytes] = []
        try:
            channel.settimeout(POLL)
            channel.exec_command(wrap_become(cmd, self._prefix))
            while True:
                while channel.recv_stderr_ready():
                    stderr.append(channel.recv_stderr(65536))
                try:
                    data = channel.recv(65536)
                except TimeoutError:
                    if not transport.is_active():
                        break
                    continue
                if not data:
                    break
                heard()
                yield data
            code = channel.recv_exit_status() if transport.is_active() else -1
            if code == -1 and not transport.is_active():  # the connection died under the command
                with self._lock:
                    self._gone()
                raise HostUnreachable(self._name, self._broken("the SSH connection broke during a command"))
            while channel.recv_stderr_ready():
                stderr.append(channel.recv_stderr(65536))
            if code != 0:
                text = b"".join(stderr).decode(errors="replace").strip()
                raise RemoteError(f"exit {code}: {text}")
        finally:
            channel.close()


def _nothing() -> None:
    pass


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self._end

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())


def _exec(channel: paramiko.Channel, cmd: str, stdin: bytes | None, timeout: float,
          heard: Any) -> CommandResult | None:
    """Run cmd on a fresh channel: stdin sent and stderr read on threads so no pipe fills up and blocks; every
    wait is short, so a deadline or a dead connection is noticed within POLL. None: the connection died."""
    deadline = _Deadline(timeout)
    channel.settimeout(POLL)
    channel.exec_command(cmd)
    stderr: list[bytes] = []
    threads = [threading.Thread(target=_feed, args=(channel, stdin or b"", deadline, heard), daemon=True),
               threading.Thread(target=_read_all, args=(channel.recv_stderr, stderr, deadline, heard), daemon=True)]
    for thread in threads:
        thread.start()
    stdout: list[bytes] = []
    _read_all(channel.recv, stdout, deadline, heard)
    while not channel.status_event.wait(min(POLL, deadline.left())) and not deadline.passed():
        pass
    finished = channel.status_event.is_set()
    threads[1].join(deadline.left() + POLL)  # stderr's end comes with the command's
    transport = channel.get_transport()
    if not (finished and channel.exit_status != -1) and (transport is None or not transport.is_active()):
        channel.close()
        return None  # the transport died under the command (or the keepalive gave the host up)
    channel.close()  # also ends a feed still waiting for window space
    if not finished:
        return CommandResult(124, b"".join(stdout), f"timed out after {timeout:g} s".encode())
    return CommandResult(channel.exit_status, b"".join(stdout), b"".join(stderr))


def _read_all(recv: Any, into: list[bytes], deadline: _Deadline, heard: Any) -> None:
    """recv until end of stream or the deadline (an empty read is the end, also of a closed channel)."""
    while not deadline.passed():
        try:
            data = recv(65536)
        except TimeoutError:
            continue
        except (OSError, EOFError):
            return
        if not data:
            return
        heard()
        into.append(data)


def _feed(channel: paramiko.Channel, data: bytes, deadline: _Deadline, heard: Any) -> None:
    """Send data, then end the command's stdin. In slices: paramiko's sendall re-slices what is left after
    every packet, quadratic on a 100 MB binary; a send that finds no window waits at most POLL."""
    position = 0
    try:
        while position < len(data) and not deadline.passed() and not channel.exit_status_ready():
            try:
                position += channel.send(data[position:position + SEND_SLICE])
            except TimeoutError:
                continue
            if position > INITIAL_WINDOW:
                heard()  # past sshd's first window, sending goes on only as the host takes the data
        channel.shutdown_write()
    except (OSError, EOFError):
        return
