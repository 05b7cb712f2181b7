"""Traces with real parts on loopback (no lab): two real Envoys rendered by mesh from a mesh with
`mesh_tracing: {sampling: 100}` (web's outbound listener calls api's inbound listener, mTLS with certificates from
mesh's CA) send their spans, as mesh renders it (cluster mesh-traces, mTLS, the controllers' SPIFFE id), to
mesh's own SpanReceiver serving with the certificate a controller makes itself.

A request carrying a B3 header and one carrying a W3C `traceparent` keep their trace id across both hops: web's
CLIENT span is the child of the caller's span, api's SERVER span the child of web's, both tagged with who made
them; the app behind api gets both propagations; both access lines carry the trace id and the request id as sent. A
request with neither is one trace too. An outside Zipkin over https and an outside OTLP/HTTP collector get the
spans instead. Without `mesh_tracing` the access lines' trace_id is null. Turning tracing on
and off on running Envoys moves cds.yaml and lds.yaml only: they reload them, no restart.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import random
import secrets
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import compute_proxy_config
from mesh.config.model import ProxyConfig
from mesh.config.tracing import TRACE_PORT
from mesh.inventory.model import (
    Connection,
    Health,
    ManagedHost,
    Mesh,
    MeshSettings,
    TracingSettings,
    Upstream,
    Workload,
)
from mesh.pki import CertificateAuthority
from mesh.render import ProxyFiles, render_proxy_files, validate_proxy_files
from mesh.testing.loopback import (
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    move_into_place,
    proxy_config_in,
    start_proxy,
    stop_envoys,
)
from mesh.traces.decode import otlp_spans, zipkin_spans
from mesh.traces.model import Span
from mesh.traces.receiver import SpanReceiver
from mesh.traces.serving import ControllerCertificate
from mesh.traces.store import TraceStore
from tests.unit import test_tracing_config as tracing_config

TRUST_DOMAIN = "loop.mesh"
ADDRESSES = {"web": "127.0.0.2", "api": "127.0.0.3"}
WAIT_S = 30.0  # Envoy's Zipkin tracer flushes its spans every 5 s


class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    """api's app: answers the headers it got as JSON."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({name.lower(): value for name, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(server: http.server.ThreadingHTTPServer) -> Iterator[None]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def receiver_address() -> str:
    """A loopback address whose TRACE_PORT is free (the proxies send to the controllers at that fixed port)."""
    for _ in range(50):
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, TRACE_PORT))
            except OSError:
                continue
            return address
    raise AssertionError(f"no loopback address with port {TRACE_PORT} free")


@dataclass(frozen=True)
class Loop:
    mesh: Mesh
    web: Workload
    api: Workload
    controller: str  # the controller's address: its span receiver listens there


def loop_mesh(api_port: int, tracing: TracingSettings | None) -> Loop:
    second = datetime.timedelta(seconds=1)
    web = Workload("h-web", 0, "web", free_port(), TRUST_DOMAIN, proxy_port=free_port(ADDRESSES["web"]),
                   metrics_port=free_port(ADDRESSES["web"]), upstreams=(Upstream("api", free_port()),))
    api = Workload("h-api", 0, "api", api_port, TRUST_DOMAIN, version="v2", proxy_port=free_port(ADDRESSES["api"]),
                   metrics_port=free_port(ADDRESSES["api"]), health=Health("http", "/healthz", second, second))
    controller = receiver_address()
    hosts = (ManagedHost("h-web", "vm", Connection(ADDRESSES["web"]), (web,)),
             ManagedHost("h-api", "vm", Connection(ADDRESSES["api"]), (api,)),
             ManagedHost("ctl", "vm", Connection(controller), (), is_controller=True))
    settings = MeshSettings(trust_domain=TRUST_DOMAIN, tracing=tracing)
    return Loop(Mesh(settings, hosts, (), MappingProxyType({"web": (web,), "api": (api,)})), web, api, controller)


@dataclass
class Running:
    loop: Loop
    envoys: dict[str, RunningEnvoy]
    store: TraceStore
    files: dict[str, ProxyFiles]
    folder: Path

    def render(self, tracing: TracingSettings | None) -> dict[str, ProxyFiles]:
        """Both proxies' files for the same mesh with another `mesh_tracing`."""
        mesh = replace(self.loop.mesh, settings=replace(self.loop.mesh.settings, tracing=tracing))
        return {name: render_proxy_files(proxy_config_in(compute_proxy_config(mesh, workload), self.folder / name,
                                                         ADDRESSES[name]))
                for name, workload in (("web", self.loop.web), ("api", self.loop.api))}


@contextlib.contextmanager
def running(folder: Path, tracing: TracingSettings | None,
            adjust: Callable[[ProxyConfig], ProxyConfig] = lambda cfg: cfg) -> Iterator[Running]:
    """api's app, the span receiver (with the controller's own certificate) and web's and api's Envoys (their
    configs through `adjust`)."""
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    app.daemon_threads = True
    loop = loop_mesh(app.server_address[1], tracing)
    authority, _created = CertificateAuthority.ensure(str(folder / "state"), TRUST_DOMAIN)
    issuer = authority.controller_issuer()
    assert issuer is not None
    (folder / "ctl").mkdir()
    cert, key, root = folder / "ctl" / "intermediate.pem", folder / "ctl" / "intermediate.key", folder / "ctl" / "root.pem"
    cert.write_bytes(issuer.cert_pem)
    key.write_bytes(issuer.key_pem)
    root.write_bytes(authority.root_pem)
    store = TraceStore()
    receiver = SpanReceiver(store, TRACE_PORT, ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key)),
                            str(root), TRUST_DOMAIN, address=loop.controller)
    identities = issue_identities(folder / "state", TRUST_DOMAIN, (loop.web, loop.api))
    files: dict[str, ProxyFiles] = {}
    for name, workload in (("web", loop.web), ("api", loop.api)):
        cfg = adjust(proxy_config_in(compute_proxy_config(loop.mesh, workload), folder / name, ADDRESSES[name]))
        files[name] = render_proxy_files(cfg)
        validate_proxy_files(files[name], identities[name].root)
        lay_out_proxy(files[name], identities[name])
    envoys: dict[str, RunningEnvoy] = {}
    receiver.start()
    try:
        with serving(app):
            for (name, proxy_files), base_id in zip(files.items(), free_base_ids(len(files)), strict=True):
                envoys[name] = start_proxy(name, proxy_files, base_id)
            yield Running(loop, envoys, store, files, folder)
    finally:
        stop_envoys(list(envoys.values()))
        receiver.stop()


def call(run: Running, headers: dict[str, str]) -> dict[str, str]:
    """A GET through web's outbound listener to api; the headers api's app got."""
    def once() -> dict[str, str] | None:
        connection = http.client.HTTPConnection("127.0.0.1", run.loop.web.upstreams[0].local_port, timeout=10)
        try:
            connection.request("GET", "/orders/7", headers=headers)
            response = connection.getresponse()
            body = response.read()
            return json.loads(body) if response.status == 200 else None
        finally:
            connection.close()
    return eventually(once, WAIT_S, "a request through web's Envoy to api's app", run.envoys["web"].log)


def propagated(headers: dict[str, str]) -> tuple[str | None, str | None]:
    """The trace id of the B3 headers (single `b3`, or x-b3-traceid) and of `traceparent` a request carried."""
    b3 = headers["b3"].split("-")[0] if "b3" in headers else headers.get("x-b3-traceid")
    traceparent = headers["traceparent"].split("-")[1] if "traceparent" in headers else None
    return b3, traceparent


def access_line(envoy: RunningEnvoy, request_id: str) -> dict[str, Any] | None:
    for text in envoy.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(text)
            if isinstance(line, dict) and line.get("mesh") == "access" and line.get("request_id") == request_id:
                return line
    return None


def hops(run: Running, trace_id: str) -> tuple[Span, Span] | None:
    """web's CLIENT span and api's SERVER span of the trace, once both arrived."""
    spans = run.store.trace(trace_id)
    client = [span for span in spans if span.kind == "CLIENT"]
    server = [span for span in spans if span.kind == "SERVER"]
    return (client[0], server[0]) if len(spans) == 2 and client and server else None


def assert_one_trace(run: Running, trace_id: str, request_id: str, parent: str | None) -> None:
    client, server = eventually(lambda: hops(run, trace_id), WAIT_S, f"web's and api's spans of trace {trace_id}")
    assert client.parent_id == parent
    assert server.parent_id == client.span_id != server.span_id
    base = {"mesh.proxy": f"web-{run.loop.web.port}", "mesh.host": "h-web", "mesh.instance": run.loop.web.consul_id}
    assert {k: client.tags.get(k) for k in ("mesh.service", "mesh.version", "mesh.direction", "mesh.upstream",
                                            *base)} == {
        "mesh.service": "web", "mesh.version": "v1", "mesh.direction": "outbound", "mesh.upstream": "api", **base}
    assert (server.service, server.tags.get("mesh.version"), server.tags.get("mesh.direction"),
            server.tags.get("mesh.host")) == ("api", "v2", "inbound", "h-api")
    assert client.request_id == server.request_id == request_id
    for name in ("web", "api"):
        line = eventually(lambda name=name: access_line(run.envoys[name], request_id), WAIT_S,
                          f"{name}'s access line of {request_id}")
        assert line["trace_id"] == trace_id, line


@pytest.mark.parametrize("case", sorted(tracing_config.GOLDENS))
def test_tracing_goldens_pass_envoy(case: str, tmp_path: Path) -> None:
    """mesh's collector (mTLS, SAN), an outside https Zipkin (the host's CAs, SNI, DNS SAN) and an OTLP/HTTP
    collector, as the golden files render them: the real Envoy takes each (static_bootstrap inlines the files)."""
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), "golden.mesh")
    validate_proxy_files(tracing_config.golden_files(case), authority.root_pem)


def test_b3_traceparent_and_untraced_requests_are_each_one_trace_across_two_envoys(tmp_path: Path) -> None:
    with running(tmp_path, TracingSettings("mesh", 100.0)) as run:
        # B3 (single header): the trace id kept, web's span the child of the caller's
        trace_b3, parent_b3, request_b3 = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
        seen = call(run, {"b3": f"{trace_b3}-{parent_b3}-1", "x-request-id": request_b3})
        # api's app gets both propagations (B3 and W3C) of the same trace, and the request id as sent
        assert propagated(seen) == (trace_b3, trace_b3), seen
        assert seen["x-request-id"] == request_b3
        assert_one_trace(run, trace_b3, request_b3, parent_b3)

        # W3C traceparent
        trace_w3c, parent_w3c, request_w3c = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
        seen = call(run, {"traceparent": f"00-{trace_w3c}-{parent_w3c}-01", "x-request-id": request_w3c})
        assert propagated(seen) == (trace_w3c, trace_w3c), seen
        assert_one_trace(run, trace_w3c, request_w3c, parent_w3c)

        # neither: web's Envoy starts the trace (its span is the root)
        request_new = str(uuid.uuid4())
        seen = call(run, {"x-request-id": request_new})
        started = seen["traceparent"].split("-")[1]
        assert len(started) == 32 and propagated(seen) == (started, started), seen
        assert_one_trace(run, started, request_new, None)
        assert {span.trace_id for span in run.store.by_request(request_new)} == {started}


def test_without_mesh_tracing_no_span_and_the_trace_id_is_null(tmp_path: Path) -> None:
    with running(tmp_path, None) as run:
        request_id = str(uuid.uuid4())
        seen = call(run, {"x-request-id": request_id})
        assert propagated(seen) == (None, None), seen
        for name in ("web", "api"):
            line = eventually(lambda name=name: access_line(run.envoys[name], request_id), WAIT_S,
                              f"{name}'s access line")
            assert line["trace_id"] is None, line
        assert run.store.by_request(request_id) == ()


def test_an_unsampled_request_still_logs_a_trace_id_but_sends_no_span(tmp_path: Path) -> None:
    """With a tracer that samples nothing, Envoy still makes the trace's ids (and propagates them, sampled 0):
    the access line's trace_id is set; no span reaches the collector, while a request the caller marked sampled
    sends its spans."""
    with running(tmp_path, TracingSettings("mesh", 0.0)) as run:
        request_id = str(uuid.uuid4())
        seen = call(run, {"x-request-id": request_id})
        line = eventually(lambda: access_line(run.envoys["web"], request_id), WAIT_S, "web's access line")
        assert propagated(seen) == (line["trace_id"], line["trace_id"]) and seen["traceparent"].endswith("-00"), seen
        sampled, parent = secrets.token_hex(16), secrets.token_hex(8)
        call(run, {"b3": f"{sampled}-{parent}-1", "x-request-id": str(uuid.uuid4())})
        eventually(lambda: hops(run, sampled), WAIT_S, "the spans of the request sampled by its caller")
        assert run.store.by_request(request_id) == () and run.store.trace(line["trace_id"]) == ()


def test_tracing_turned_on_and_off_reloads_without_a_restart(tmp_path: Path) -> None:
    """mesh_tracing set on a running mesh changes cds.yaml (the mesh-traces cluster, moved in first) and lds.yaml
    only: the running Envoys take them (no new bootstrap, the same processes) and trace; unset again, they stop
    (the cluster leaves after the listeners that named it)."""
    with running(tmp_path, None) as run:
        pids = {name: envoy.process.pid for name, envoy in run.envoys.items()}
        traced = run.render(TracingSettings("mesh", 100.0))
        for name in ("web", "api"):
            assert traced[name].bootstrap == run.files[name].bootstrap
            moved = move_into_place(traced[name], run.files[name])
            assert [path.rsplit("/", 1)[-1] for path in moved] == ["cds.yaml", "lds.yaml"]
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        call(run, {"b3": f"{trace_id}-{parent}-1", "x-request-id": str(uuid.uuid4())})
        eventually(lambda: hops(run, trace_id), WAIT_S, "the spans after tracing was turned on")
        untraced = run.render(None)
        for name in ("web", "api"):
            moved = move_into_place(untraced[name], traced[name])
            assert [path.rsplit("/", 1)[-1] for path in moved] == ["cds.yaml", "lds.yaml", "cds.yaml"]
        request_id = str(uuid.uuid4())
        call(run, {"x-request-id": request_id})
        line = eventually(lambda: access_line(run.envoys["web"], request_id), WAIT_S, "web's access line")
        assert line["trace_id"] is None
        assert {name: envoy.process.pid for name, envoy in run.envoys.items()} == pids
        assert all(envoy.process.poll() is None for envoy in run.envoys.values())


# --- outside collectors ---

@dataclass
class Posted:
    path: str
    host: str
    content_type: str
    body: bytes


class _Collector(http.server.BaseHTTPRequestHandler):
    """An outside collector: keeps what is posted, answers 202."""

    protocol_version = "HTTP/1.1"
    posted: list[Posted]

    def do_POST(self) -> None:
        if "chunked" in self.headers.get("transfer-encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.posted.append(Posted(self.path, self.headers.get("host", ""), self.headers.get("content-type", ""),
                                  body))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def server_certificate(address: str, folder: Path) -> tuple[Path, Path, Path]:
    """A CA (standing in for the host's CA bundle) and a server certificate for the IP `address`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outside collector CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize("kind", ["zipkin-https", "otlp-http"])
def test_an_outside_collector_gets_the_spans(kind: str, tmp_path: Path) -> None:
    """An outside Zipkin over https (its certificate checked against the CA bundle, by its IP SAN) gets Zipkin JSON
    at /api/v2/spans; an outside OTLP collector over http gets OTLP protobuf at its URL's path, service.name the
    service. A W3C traceparent keeps its trace id through both Envoys either way."""
    address = receiver_address()
    port = free_port(address)
    handler = type("Collector", (_Collector,), {"posted": []})
    server = http.server.ThreadingHTTPServer((address, port), handler)
    server.daemon_threads = True
    ca = None
    if kind == "zipkin-https":
        ca, cert, key = server_certificate(address, tmp_path / "collector")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        tracing = TracingSettings("zipkin", 100.0, f"https://{address}:{port}", "https", address, port, None)
    else:
        tracing = TracingSettings("otlp", 100.0, f"http://{address}:{port}/otel/v1/traces", "http", address, port,
                                  "/otel/v1/traces")

    def bundle(cfg: ProxyConfig) -> ProxyConfig:  # the test's CA stands in for the host's bundle
        tracer = cfg.tracer
        if ca is None or tracer is None or tracer.outside_tls is None:
            return cfg
        return replace(cfg, tracer=replace(tracer, outside_tls=replace(tracer.outside_tls, trusted_ca=str(ca))))

    with serving(server), running(tmp_path / "mesh", tracing, bundle) as run:
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        call(run, {"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": str(uuid.uuid4())})

        def spans() -> list[Span] | None:
            found = []
            for posted in list(handler.posted):
                if kind == "zipkin-https":
                    assert (posted.path, posted.host) == ("/api/v2/spans", f"{address}:{port}"), posted
                    found += zipkin_spans(posted.body)
                else:
                    assert posted.path == "/otel/v1/traces", posted
                    found += otlp_spans(posted.body, posted.content_type)
            mine = [span for span in found if span.trace_id == trace_id]
            return mine if len(mine) == 2 else None

        got = eventually(spans, WAIT_S, f"2 spans of {trace_id} at the outside collector", run.envoys["web"].log)
        client = next(span for span in got if span.kind == "CLIENT")
        server_span = next(span for span in got if span.kind == "SERVER")
        assert client.parent_id == parent and server_span.parent_id == client.span_id
        assert (client.service, server_span.service) == ("web", "api")
        assert run.store.trace(trace_id) == ()  # nothing went to mesh's own collector
