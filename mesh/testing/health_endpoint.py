"""Test stand-ins for the Envoy health chain: a throwaway CA with SPIFFE leaves, and a TLS 1.3 server that
requires a client certificate from it and answers `/mesh/health` 200 or 503. Tests only; uses cryptography.
"""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LeafFiles:
    """A leaf certificate and its key, as files, plus the CA file that verifies it."""

    cert: Path
    key: Path
    ca: Path


class TestCA:
    """An ECDSA P-256 root that issues leaves with a SPIFFE URI SAN, written under `directory`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "mesh test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                                  False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / f"{name.replace(' ', '-')}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, spiffe_id: str, name: str) -> LeafFiles:
        """A serverAuth+clientAuth leaf for `spiffe_id`, written as `<name>.pem` and `<name>-key.pem`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        return LeafFiles(cert_file, key_file, self.ca_file)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _TLSServer

    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        status = (200 if self.server.endpoint.healthy else 503) if self.path == "/mesh/health" else 404
        body = b"ok\n" if status == 200 else b"unhealthy\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.endpoint.requests += 1

    def log_message(self, format: str, *args: Any) -> None:
        return


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, endpoint: HealthEndpoint, context: ssl.SSLContext) -> None:
        self.endpoint = endpoint
        self.context = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the handshake runs in the request's own thread, so a stuck client never blocks accept()
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.endpoint.refused += 1
            return
        super().finish_request(tls, client_address)


class HealthEndpoint:
    """Behaves like an inbound listener's health chain: only SNI `health.<td>`, only mesh-CA clients."""

    def __init__(self, server: LeafFiles, trust_domain: str) -> None:
        self.healthy = True
        self.requests = 0
        self.refused = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(server.ca))
        context.load_cert_chain(str(server.cert), str(server.key))
        expected = f"health.{trust_domain}"

        def only_health_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
            return None if name == expected else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

        context.sni_callback = only_health_sni  # type: ignore[assignment]
        self._server = _TLSServer(self, context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later probes get `connection refused`."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
