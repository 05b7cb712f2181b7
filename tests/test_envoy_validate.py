"""Every golden Envoy config passes the real `envoy --mode validate`, and real Envoys on loopback do the job.

The loopback test needs no lab: three Envoys (127.0.0.2-4) with throwaway certificates, a Python app behind each.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import os
import re
import socket
import socketserver
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.config import EnvoyRejectedConfig, compute_proxy_config, health_server_name
from mesh.config.validate import rewrite_file_paths, validate_envoy_config
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.render import render_envoy_config
from mesh.testing import loopback
from mesh.testing.loopback import RunningEnvoy, eventually, free_port, stop_envoys

GOLDEN_ENVOY = Path(__file__).resolve().parent / "golden" / "envoy"
TRUST_DOMAIN = "loop.mesh"
WAIT_S = 30.0
T = TypeVar("T")


@pytest.mark.parametrize("golden", sorted(GOLDEN_ENVOY.glob("*.yaml")), ids=lambda path: path.stem)
def test_golden_envoy_config_passes_envoy_validate(golden: Path) -> None:
    validate_envoy_config(golden.read_text())


def test_golden_configs_exist() -> None:
    assert len(list(GOLDEN_ENVOY.glob("*.yaml"))) >= 6, "run pytest --update-goldens tests/unit/test_render.py"


def test_validate_reports_envoys_message_and_the_proxy() -> None:
    text = (GOLDEN_ENVOY / "web-vm1-http-upstream.yaml").read_text()
    broken = text.replace("lb_policy: ROUND_ROBIN", "lb_policy: NO_SUCH_POLICY", 1)
    with pytest.raises(EnvoyRejectedConfig) as caught:
        validate_envoy_config(broken)
    assert "web-vm1-0" in str(caught.value) and "NO_SUCH_POLICY" in str(caught.value)


# --- throwaway PKI (mesh/pki.py is the real one; this test must not depend on it) ---

@dataclass(frozen=True)
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes


def make_ca(common_name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issuer(name, key, cert.public_bytes(serialization.Encoding.PEM))


def make_leaf(issuer: Issuer, uri: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a leaf with `uri` as its only SAN, serverAuth + clientAuth."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(x509.Name([]), issuer.name, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(issuer.key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1)))


# --- apps behind the Envoys ---

class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive stalls 40 ms per request (REAL-PARTS)

    def do_GET(self) -> None:
        body = json.dumps({"app": "api", "path": self.path, "xfcc": self.headers.get("x-forwarded-client-cert")})
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _App(http.server.ThreadingHTTPServer):
    """An HTTP app whose stop() also drops open keep-alive connections, as a process that exits does."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Hello)
        self.connections: list[socket.socket] = []

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, peer = super().get_request()
        self.connections.append(connection)
        return connection, peer

    def stop(self) -> None:
        stop(self)
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop(server)


def stop(server: socketserver.BaseServer) -> None:
    server.shutdown()
    server.server_close()


# --- the loopback mesh ---

@dataclass(frozen=True)
class Loopback:
    mesh: Mesh
    web: Workload
    api: Workload
    db: Workload


def loopback_mesh() -> Loopback:
    ports = iter(free_port() for _ in range(11))
    web = Workload("h-web", 0, "web", next(ports), TRUST_DOMAIN, proxy_port=next(ports), admin_port=next(ports),
                   upstreams=(Upstream("api", next(ports)), Upstream("db", next(ports))))
    api = Workload("h-api", 0, "api", next(ports), TRUST_DOMAIN, proxy_port=next(ports), admin_port=next(ports),
                   health=Health("http", "/healthz", datetime.timedelta(seconds=1), datetime.timedelta(seconds=1)))
    db = Workload("h-db", 0, "db", next(ports), TRUST_DOMAIN, protocol="tcp", proxy_port=next(ports),
                  admin_port=next(ports),
                  health=Health("tcp", None, datetime.timedelta(seconds=1), datetime.timedelta(seconds=1)))
    hosts = tuple(ManagedHost(w.host, "vm", Connection(address), (w,))
                  for w, address in ((web, "127.0.0.2"), (api, "127.0.0.3"), (db, "127.0.0.4")))
    services = MappingProxyType({w.service: (w,) for w in (web, api, db)})
    return Loopback(Mesh(MeshSettings(trust_domain=TRUST_DOMAIN), hosts, (), services), web, api, db)


def start_envoy(loop: Loopback, workload: Workload, files: dict[str, bytes], folder: Path, base_id: int) -> RunningEnvoy:
    """Render the workload's real config, bind its inbound listener to its host's 127.0.0.x, point it at `files`."""
    config = yaml.safe_load(render_envoy_config(compute_proxy_config(loop.mesh, workload)))
    address = loop.mesh.host(workload.host).connection.address
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] == "inbound":
            listener["address"]["socket_address"]["address"] = address
    rewrite_file_paths(config, folder / "files", lambda path, _role: files[path])
    return loopback.start_envoy(workload.service, config, folder, base_id)


def tls_request(address: str, port: int, server_name: str, ca: bytes, path: str = "/",
                identity: tuple[Path, Path] | None = None) -> int:
    """GET over TLS 1.3 straight to an inbound listener; the status code, or an exception when refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # mesh certificates carry a SPIFFE URI, no DNS name
    context.load_verify_locations(cadata=ca.decode())
    if identity:
        context.load_cert_chain(str(identity[0]), str(identity[1]))
    with socket.create_connection((address, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        head = tls.recv(4096).decode(errors="replace")
    match = re.match(r"HTTP/1\.1 (\d{3})", head)
    if not match:
        raise ConnectionError(f"no HTTP response: {head!r}")
    return int(match.group(1))


def refused(request: Callable[[], int]) -> bool:
    try:
        request()
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


def write_identity(folder: Path, name: str, issuer: Issuer, uri: str) -> tuple[Path, Path]:
    cert, key = make_leaf(issuer, uri)
    paths = folder / f"{name}.crt", folder / f"{name}.key"
    paths[0].write_bytes(cert)
    paths[1].write_bytes(key)
    return paths


def test_two_services_over_mtls_on_loopback(tmp_path: Path) -> None:
    loop = loopback_mesh()
    mesh_ca, foreign_ca = make_ca("loopback mesh CA"), make_ca("foreign CA")
    api_app = _App(("127.0.0.1", loop.api.port))
    envoys: list[RunningEnvoy] = []
    base = 50_000 + os.getpid() % 10_000 * 4
    try:
        with serving(_ThreadingTCP(("127.0.0.1", loop.db.port), _Echo)):
            threading.Thread(target=api_app.serve_forever, daemon=True).start()
            for number, workload in enumerate((loop.web, loop.api, loop.db)):
                cert, key = make_leaf(mesh_ca, workload.spiffe_id)
                cfg = compute_proxy_config(loop.mesh, workload)
                files = {cfg.secrets.certificate.certificate_chain: cert, cfg.secrets.certificate.private_key: key,
                         cfg.secrets.trust_bundle.trusted_ca: mesh_ca.cert_pem}
                folder = tmp_path / workload.service
                folder.mkdir()
                envoys.append(start_envoy(loop, workload, files, folder, base + number))
            web_envoy, api_envoy, _db_envoy = envoys
            check_calls_through_the_mesh(loop, web_envoy)
            check_inbound_refusals(loop, tmp_path, mesh_ca, foreign_ca, api_envoy)
            check_health_follows_the_app(loop, tmp_path, mesh_ca, api_app, web_envoy, api_envoy)
    finally:
        with contextlib.suppress(OSError):
            api_app.server_close()
        stop_envoys(envoys)


def check_calls_through_the_mesh(loop: Loopback, web_envoy: RunningEnvoy) -> None:
    api_port, db_port = (upstream.local_port for upstream in loop.web.upstreams)

    def call_api() -> dict[str, Any] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/hello", timeout=5) as response:
            return dict(json.loads(response.read()))

    answer = eventually(call_api, WAIT_S, "web reaches api through both Envoys", web_envoy.log)
    assert answer["app"] == "api" and answer["path"] == "/hello"
    assert f"URI={loop.web.spiffe_id}" in answer["xfcc"]  # the caller's identity, set by api's Envoy

    def echo_db() -> bytes | None:
        with socket.create_connection(("127.0.0.1", db_port), timeout=5) as connection:
            connection.sendall(b"ping over tcp\n")
            return connection.recv(100) or None

    assert eventually(echo_db, WAIT_S, "web reaches db (tcp) through both Envoys", web_envoy.log) == b"ping over tcp\n"


def check_inbound_refusals(loop: Loopback, folder: Path, mesh_ca: Issuer, foreign_ca: Issuer,
                           api_envoy: RunningEnvoy) -> None:
    address, port, ca = "127.0.0.3", loop.api.proxy_port, mesh_ca.cert_pem
    good = write_identity(folder, "good", mesh_ca, f"spiffe://{TRUST_DOMAIN}/svc/web")
    foreign = write_identity(folder, "foreign", foreign_ca, f"spiffe://{TRUST_DOMAIN}/svc/web")
    outsider = write_identity(folder, "outsider", mesh_ca, "spiffe://other.mesh/svc/web")
    assert tls_request(address, port, "api", ca, identity=good) == 200  # the control: the same path accepts a peer
    assert refused(lambda: tls_request(address, port, "api", ca)), "no client certificate accepted"
    assert refused(lambda: tls_request(address, port, "api", ca, identity=foreign)), "foreign CA accepted"
    assert refused(lambda: tls_request(address, port, "api", ca, identity=outsider)), "other trust domain accepted"
    stats = api_envoy.admin("/stats?filter=ssl.fail_verify")
    for reason in ("no_cert", "error", "san"):  # the reasons, as the inbound listener counted them
        counts = re.findall(rf"\.ssl\.fail_verify_{reason}: (\d+)", stats)
        assert sum(map(int, counts)) >= 1, f"fail_verify_{reason} not counted: {stats}"


def check_health_follows_the_app(loop: Loopback, folder: Path, mesh_ca: Issuer, api_app: _App,
                                 web_envoy: RunningEnvoy, api_envoy: RunningEnvoy) -> None:
    checker = write_identity(folder, "checker", mesh_ca, f"spiffe://{TRUST_DOMAIN}/mesh/health")
    health = health_server_name(TRUST_DOMAIN)

    def health_status(address: str, port: int, path: str = "/mesh/health") -> int:
        return tls_request(address, port, health, mesh_ca.cert_pem, path, identity=checker)

    assert eventually(lambda: health_status("127.0.0.3", loop.api.proxy_port) == 200, WAIT_S, "api healthy")
    assert eventually(lambda: health_status("127.0.0.4", loop.db.proxy_port) == 200, WAIT_S, "db (tcp) healthy")
    assert health_status("127.0.0.3", loop.api.proxy_port, "/other") == 404  # the health chain forwards nothing
    assert health_status("127.0.0.2", loop.web.proxy_port) == 503  # nothing listens on web's app port
    api_app.stop()
    eventually(lambda: health_status("127.0.0.3", loop.api.proxy_port) == 503, WAIT_S, "api unhealthy", api_envoy.log)
    flags = re.compile(rf"upstream-api::127\.0\.0\.3:{loop.api.proxy_port}::health_flags::(\S+)")

    def api_marked_unhealthy() -> bool:
        found = flags.search(web_envoy.admin("/clusters"))
        return bool(found and "failed_active_hc" in found.group(1))

    eventually(api_marked_unhealthy, WAIT_S, "web's Envoy marks api failed_active_hc", web_envoy.log)
    api_port = loop.web.upstreams[0].local_port
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{api_port}/hello", timeout=5)
    assert caught.value.code == 503
