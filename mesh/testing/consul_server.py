"""A real `consul agent -dev` on 127.0.0.1 with free ports, for tests: the real part, not a fake; optionally
with ACLs on (deny by default, a master token, and mesh's policy and token as the lab makes them) and HTTPS.

It starts and stops one agent process (by its PID) and waits until it serves; it must not fetch Consul.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.lab import consul_acl

PORT_NAMES = ("http", "dns", "serf-lan", "serf-wan", "server", "grpc")


@dataclass(frozen=True)
class ServerTls:
    """An https listener's files: a CA bundle (what clients verify with), the server's certificate for
    127.0.0.1 and its key."""

    ca: Path
    cert: Path
    key: Path


def make_server_tls(directory: Path, name: str = "consul") -> ServerTls:
    """A throwaway CA and a server certificate for IP 127.0.0.1 and `localhost` signed by it (one day)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = ServerTls(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    consul_acl.write_secret(files.key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
    return files


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (TCP and UDP both free), distinct from each other."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


class ConsulDevServer:
    """One `consul agent -dev` bound to 127.0.0.1; use as a context manager or call start()/stop().
    With `acl=True` it denies by default: `master_token` may do anything, `mesh_token()` makes the token with
    mesh's policy (as the lab does). With `tls`, it also serves https on `https_url`. Tokens and keys go into
    0600 files of its own folder, never into its argv.

    >>> with ConsulDevServer(binary, acl=True) as server:
    ...     catalog.sync(ConsulAccess(server.url, server.mesh_token()), mesh)
    """

    def __init__(self, binary: Path, node: str = "consul-dev", start_timeout: float = 30.0, acl: bool = False,
                 tls: ServerTls | None = None) -> None:
        self.binary = binary
        self.node = node
        self.start_timeout = start_timeout
        self.master_token: str | None = consul_acl.new_token() if acl else None
        self.tls = tls
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._mesh_token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def https_url(self) -> str:
        if self.tls is None:
            raise RuntimeError("this Consul serves no https (no tls given)")
        return f"https://127.0.0.1:{self.ports['https']}"

    def mesh_token(self) -> str:
        """A token with mesh's policy (consul_acl.MESH_POLICY_RULES), made once."""
        if self.master_token is None:
            raise RuntimeError("this Consul runs without ACLs")
        if self._mesh_token is None:
            token = consul_acl.new_token()
            consul_acl.ensure_mesh_token(self.url, self.master_token, token, timeout=self.start_timeout)
            self._mesh_token = token
        return self._mesh_token

    def start(self) -> Self:
        names = PORT_NAMES + (("https",) if self.tls else ())
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        argv = [str(self.binary), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                "-node", self.node, "-log-level", "warn"]
        argv += [f"-{name}-port={port}" for name, port in self.ports.items() if name != "https"]
        config = self._config()
        if config:
            self._folder = tempfile.TemporaryDirectory(prefix="consul-dev-")
            path = Path(self._folder.name) / "config.hcl"
            consul_acl.write_secret(path, config)
            argv += ["-config-file", str(path)]
        self._log = tempfile.NamedTemporaryFile(prefix="consul-dev-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self) -> str:
        parts = []
        if self.master_token:
            parts.append(consul_acl.agent_acl_config(self.master_token))
        if self.tls:
            parts.append(f'ports {{ https = {self.ports["https"]} }}\ncert_file = "{self.tls.cert}"\n'
                         f'key_file = "{self.tls.key}"\nverify_incoming = false\n')
        return "".join(parts)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"consul agent -dev exited with {code}: {self.log_text()}")
            if self._serving():
                return
            time.sleep(0.1)
        raise RuntimeError(f"consul agent -dev did not serve within {self.start_timeout}s: {self.log_text()}")

    def _serving(self) -> bool:
        headers = {"X-Consul-Token": self.master_token} if self.master_token else {}
        try:
            with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=1) as answer:
                leader = json.loads(answer.read())
            request = urllib.request.Request(f"{self.url}/v1/catalog/node/{self.node}", headers=headers)
            with urllib.request.urlopen(request, timeout=1) as answer:
                node = json.loads(answer.read())
            if self.tls is not None:
                context = ssl.create_default_context(cafile=str(self.tls.ca))
                with urllib.request.urlopen(f"{self.https_url}/v1/status/leader", timeout=1,
                                            context=context) as answer:
                    answer.read()
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return bool(leader) and bool(node)

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-2000:] if self._log else ""

    def stop(self) -> None:
        """Stop the agent by its PID (SIGTERM, then SIGKILL after 10 s) and drop its log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
