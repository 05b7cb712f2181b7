"""Every proxy's rendered files (the golden cases and the lab's inventory) pass validate_proxy_files (the real Envoy),
a broken listener or cluster in a resource file is refused with Envoy's reason, and real Envoys started from
rendered proxy folders on loopback do the job.

The loopback test needs no lab: three Envoys (127.0.0.2-4) with throwaway certificates, a Python app behind each.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.config import EnvoyRejectedConfig, compute_proxy_config, health_server_name
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.inventory.validate import build_mesh
from mesh.lab.topology import LabSize, build_topology, render_inventory
from mesh.render import ProxyFiles, RenderedFile, render_proxy_files, validate_proxy_files
from mesh.testing import loopback
from mesh.testing.loopback import RunningEnvoy, eventually, free_port, stop_envoys
from tests.unit import test_config_authz as authz_config

GOLDEN_INVENTORY = Path(__file__).resolve().parent / "golden" / "envoy" / "input" / "inventory.yaml"
TRUST_DOMAIN = "loop.mesh"
WAIT_S = 30.0
T = TypeVar("T")


def mesh_of(inventory: Path) -> Mesh:
    return build_mesh(load_inventory(str(inventory)), str(inventory))


def lab_inventory(folder: Path) -> Path:
    """The inventory `mesh lab up` writes (inventory/lab.yaml), rendered here for the lab's default size."""
    path = folder / "lab.yaml"
    path.write_text(render_inventory(build_topology(LabSize()), folder / "id_ed25519", folder / "known_hosts"))
    return path


def all_proxy_files(mesh: Mesh) -> list[ProxyFiles]:
    return [render_proxy_files(compute_proxy_config(mesh, workload)) for workload in mesh.workloads]


def test_golden_proxies_files_pass_envoy() -> None:
    ca = make_ca("golden CA").cert_pem
    every = all_proxy_files(mesh_of(GOLDEN_INVENTORY))
    assert len(every) >= 6
    for files in every:
        validate_proxy_files(files, ca)


def test_lab_proxies_files_pass_envoy(tmp_path: Path) -> None:
    ca = make_ca("lab CA").cert_pem
    every = all_proxy_files(mesh_of(lab_inventory(tmp_path)))
    distinct = {tuple(file.content for file in files.files): files for files in every}
    assert len(distinct) == len(every) >= 5  # web, api on VMs and in containers, db: each its own files
    for files in distinct.values():
        validate_proxy_files(files, ca)


@pytest.mark.parametrize("case", sorted(authz_config.GOLDENS))
def test_authz_golden_files_pass_envoy(case: str) -> None:
    """Rules with methods, paths, headers and shadow entries, a run-time deny, permissive HTTP and TCP: the RBAC
    filters (per route, or read from ECDS files: static_bootstrap inlines them) and the plaintext chain."""
    validate_proxy_files(authz_config.golden_files(case), make_ca("authz CA").cert_pem)


def test_a_broken_ecds_file_is_refused_with_envoys_reason() -> None:
    files = authz_config.golden_files("authz-db-permissive")
    with pytest.raises(EnvoyRejectedConfig, match="PERMIT"):
        validate_proxy_files(broken(files, "ecds.mesh.authz.allow.yaml", "action: ALLOW", "action: PERMIT"),
                             make_ca("authz CA").cert_pem)


def broken(files: ProxyFiles, name: str, old: str, new: str) -> ProxyFiles:
    """files with `old` replaced by `new` (once) in the xds file `name`."""
    path = f"{files.proxy_dir}/xds/{name}"
    original = files.file(path)
    assert old in original.content, f"{old!r} not in {name}"
    changed = RenderedFile(path, original.content.replace(old, new, 1), original.kind)
    return dataclasses.replace(files, files=tuple(changed if file is original else file for file in files.files))


@pytest.mark.parametrize(("name", "old", "new", "reason"), [
    ("lds.yaml", "tcp_proxy.v3.TcpProxy", "tcp_proxy.v3.NoSuchProxy", "NoSuchProxy"),
    ("lds.yaml", "port_value: 19102", "port_value: 99999999", "PortValue"),
    ("cds.yaml", "lb_policy: ROUND_ROBIN", "lb_policy: NO_SUCH_POLICY", "NO_SUCH_POLICY"),
    ("cds.yaml", "connect_timeout: 1s", "connect_timeout: 0s", "ConnectTimeout"),
    ("rds.outbound-pricing.yaml", "num_retries: 2", "num_retries: many", "num_retries"),
    ("eds.upstream-db.yaml", "address: 10.0.0.12", "address: not-an-ip", "not-an-ip"),
    ("sds.proxy-cert.yaml", "certificate_chain:", "certificate_chian:", "certificate_chian"),
    ("rds.inbound.yaml", "action: ALLOW", "action: PERMIT", "PERMIT"),
], ids=["listener-filter", "listener-port", "cluster-lb-policy", "cluster-timeout", "route", "endpoint", "secret",
        "rbac"])
def test_a_broken_resource_file_is_refused_with_envoys_reason(name: str, old: str, new: str, reason: str) -> None:
    mesh = mesh_of(GOLDEN_INVENTORY)
    api = next(w for w in mesh.workloads if (w.host, w.service) == ("vm2", "api"))
    files = render_proxy_files(compute_proxy_config(mesh, api))
    ca = make_ca("golden CA").cert_pem
    validate_proxy_files(files, ca)  # the control: the same files, unbroken, pass
    with pytest.raises(EnvoyRejectedConfig) as caught:
        validate_proxy_files(broken(files, name, old, new), ca)
    assert files.proxy in str(caught.value) and reason in str(caught.value)


def test_a_trust_bundle_that_is_no_certificate_is_refused() -> None:
    mesh = mesh_of(GOLDEN_INVENTORY)
    files = all_proxy_files(mesh)[0]
    with pytest.raises(EnvoyRejectedConfig, match="ca.pem"):
        validate_proxy_files(files, b"not a certificate\n")


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


def start_envoy(loop: Loopback, workload: Workload, identity: loopback.Identity, folder: Path,
                base_id: int) -> RunningEnvoy:
    """Render the workload's real files into a proxy folder (inbound listener on its host's 127.0.0.x), lay it
    out as a deploy does (ca.pem, the `tls` link) and start Envoy on its bootstrap."""
    address = loop.mesh.host(workload.host).connection.address
    cfg = loopback.proxy_config_in(compute_proxy_config(loop.mesh, workload), folder, address)
    files = render_proxy_files(cfg)
    validate_proxy_files(files, identity.root)
    loopback.lay_out_proxy(files, identity)
    return loopback.start_proxy(workload.service, files, base_id)


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
                identity = loopback.Identity(cert, key, mesh_ca.cert_pem)
                envoys.append(start_envoy(loop, workload, identity, tmp_path / workload.service, base + number))
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
