"""The span receiver with real parts on loopback (no lab): a real Envoy whose Zipkin tracer sends over mTLS (its
client certificate from mesh's CA, the receiver's checked as `spiffe://loop.mesh/mesh/controller`) to a
SpanReceiver serving with the certificate the controller makes itself (signed by the controllers' intermediate).

Requests carrying a B3 trace, a W3C `traceparent`, or neither are kept under their trace ids with the caller's span
as parent and the request id as a tag. Clients the receiver must refuse get no HTTP answer and store nothing: one
with a certificate from another CA, one with none, one from mesh's CA whose SPIFFE ID is outside the trust domain.
"""

from __future__ import annotations

import datetime
import http.client
import secrets
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config.tracing import TRACE_CLUSTER, ZIPKIN_PATH
from mesh.inventory.model import controller_spiffe_id
from mesh.pki import CertificateAuthority
from mesh.pki.certs import CLOCK_SKEW, Issuer, LeafRequest, build_leaf
from mesh.testing.loopback import RunningEnvoy, eventually, free_base_ids, free_port, start_envoy, stop_envoys
from mesh.traces.model import Span
from mesh.traces.receiver import SpanReceiver
from mesh.traces.serving import ControllerCertificate
from mesh.traces.store import TraceStore

TRUST_DOMAIN = "loop.mesh"
WAIT_S = 20.0


@dataclass(frozen=True)
class ClientFiles:
    chain: Path
    key: Path


@dataclass(frozen=True)
class Loop:
    store: TraceStore
    receiver: SpanReceiver
    envoy: RunningEnvoy
    app_port: int
    root: Path
    folder: Path
    authority: CertificateAuthority


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def mesh_leaf(authority: CertificateAuthority, spiffe_id: str, folder: Path, name: str) -> ClientFiles:
    """A workload leaf from mesh's CA (its ledger's `sign`), as a proxy holds it."""
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.sign(_csr(key, name), spiffe_id, datetime.timedelta(hours=1), "h-" + name, name)
    return _write(folder, name, issued.chain_pem, _key_pem(key))


def foreign_leaf(issuer: Issuer, intermediate_pem: bytes, spiffe_id: str, folder: Path, name: str) -> ClientFiles:
    """A leaf with any SPIFFE ID signed by `issuer` directly (no trust-domain check)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = build_leaf(LeafRequest(x509.load_pem_x509_csr(_csr(key, name)), spiffe_id, name, now - CLOCK_SKEW,
                                  now + datetime.timedelta(hours=1)), issuer)
    return _write(folder, name, leaf.public_bytes(serialization.Encoding.PEM) + intermediate_pem, _key_pem(key))


def _write(folder: Path, name: str, chain: bytes, key: bytes) -> ClientFiles:
    folder.mkdir(parents=True, exist_ok=True)
    files = ClientFiles(folder / f"{name}.pem", folder / f"{name}-key.pem")
    files.chain.write_bytes(chain)
    files.key.touch(mode=0o600)
    files.key.write_bytes(key)
    return files


def envoy_config(app_port: int, receiver_port: int, client: ClientFiles, root: Path) -> dict[str, Any]:
    """One listener whose HCM traces every request with the Zipkin tracer as mesh configures it (B3 and W3C, 128-bit
    ids, a span id per side), and the collector cluster: the receiver over mTLS, its SPIFFE ID checked."""
    tls_any = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "app",
        "generate_request_id": True,
        # keep the caller's request id as sent (Envoy's default writes the trace reason into its UUID)
        "request_id_extension": {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "pack_trace_reason": False}},
        "tracing": {
            "random_sampling": {"value": 100},
            "custom_tags": [{"tag": "mesh.service", "literal": {"value": "web"}},
                            {"tag": "mesh.direction", "literal": {"value": "inbound"}}],
            "provider": {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": TRACE_CLUSTER, "collector_endpoint": ZIPKIN_PATH,
                "collector_endpoint_version": "HTTP_JSON", "trace_id_128bit": True, "shared_span_context": False,
                "trace_context_option": "USE_B3_WITH_W3C_PROPAGATION", "collector_hostname": "mesh-controller"}},
        },
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "static_resources": {
            "listeners": [{"name": "app", "address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": app_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{
                "name": TRACE_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": TRACE_CLUSTER, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": receiver_port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": tls_any,
                    "common_tls_context": {
                        "tls_certificates": [{"certificate_chain": {"filename": str(client.chain)},
                                              "private_key": {"filename": str(client.key)}}],
                        "validation_context": {
                            "trusted_ca": {"filename": str(root)},
                            "match_typed_subject_alt_names": [{
                                "san_type": "URI", "matcher": {"exact": controller_spiffe_id(TRUST_DOMAIN)}}]}}}},
            }],
        },
        # flush each span at once rather than every 5 s
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {"tracing.zipkin.min_flush_spans": 1}}]},
    }


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    folder = tmp_path_factory.mktemp("span-receiver")
    authority, _created = CertificateAuthority.ensure(str(folder / "state"), TRUST_DOMAIN)
    issuer = authority.controller_issuer()
    assert issuer is not None
    ca_dir = folder / "controller-ca"
    ca_dir.mkdir()
    (ca_dir / "intermediate.pem").write_bytes(issuer.cert_pem)
    (ca_dir / "intermediate.key").write_bytes(issuer.key_pem)
    root = ca_dir / "root.pem"
    root.write_bytes(authority.root_pem)
    store = TraceStore()
    certificate = ControllerCertificate(TRUST_DOMAIN, 3600, str(ca_dir / "intermediate.pem"),
                                        str(ca_dir / "intermediate.key"))
    receiver = SpanReceiver(store, 0, certificate, str(root), TRUST_DOMAIN, address="127.0.0.1")
    receiver.start()
    web = mesh_leaf(authority, f"spiffe://{TRUST_DOMAIN}/svc/web", folder / "web", "web")
    app_port = free_port()
    [base_id] = free_base_ids(1)
    envoy = start_envoy("web", envoy_config(app_port, receiver.port, web, root), folder / "envoy", base_id)
    try:
        yield Loop(store, receiver, envoy, app_port, root, folder, authority)
    finally:
        stop_envoys([envoy])
        receiver.stop()


def _get(port: int, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/orders", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _spans_of(loop: Loop, trace_id: str) -> tuple[Span, ...] | None:
    return loop.store.trace(trace_id) or None


def test_a_b3_request_s_span_arrives_under_its_trace_id_with_the_caller_as_parent(loop: Loop) -> None:
    trace_id, caller, request_id = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
    assert _get(loop.app_port, {"x-b3-traceid": trace_id, "x-b3-spanid": caller, "x-b3-sampled": "1",
                                "x-request-id": request_id}) == 200
    [span] = eventually(lambda: _spans_of(loop, trace_id), WAIT_S, "the span at the receiver", loop.envoy.log)
    assert (span.trace_id, span.parent_id, span.request_id, span.service) == (trace_id, caller, request_id, "web")
    assert span.kind == "SERVER" and span.span_id != caller and len(span.span_id) == 16
    assert span.tags["mesh.direction"] == "inbound" and span.tags["http.url"].endswith("/orders")
    assert span.duration_us >= 0 and abs(span.start_us / 1e6 - datetime.datetime.now().timestamp()) < 60
    assert loop.store.by_request(request_id) == (span,)


def test_a_traceparent_request_keeps_its_trace_id(loop: Loop) -> None:
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    assert _get(loop.app_port, {"traceparent": f"00-{trace_id}-{caller}-01"}) == 200
    [span] = eventually(lambda: _spans_of(loop, trace_id), WAIT_S, "the span at the receiver", loop.envoy.log)
    assert (span.trace_id, span.parent_id) == (trace_id, caller)
    assert span.request_id  # Envoy made one


def test_a_request_with_no_trace_header_is_a_new_trace_found_by_its_request_id(loop: Loop) -> None:
    request_id = str(uuid.uuid4())
    assert _get(loop.app_port, {"x-request-id": request_id}) == 200
    [span] = eventually(lambda: loop.store.by_request(request_id) or None, WAIT_S, "the span at the receiver",
                        loop.envoy.log)
    assert span.parent_id is None and len(span.trace_id) == 32 and span.trace_id.strip("0")


# --- clients the receiver refuses ---

def _post_spans(loop: Loop, client: ClientFiles | None, trust: Path | None = None) -> int:
    """POST one Zipkin span as `client` (None: no certificate); the status, or raises when refused."""
    context = ssl.create_default_context(cafile=str(trust or loop.root))
    context.check_hostname = False  # the receiver's name is its SPIFFE ID, checked by Envoy, not here
    if client is not None:
        context.load_cert_chain(str(client.chain), str(client.key))
    body = (f'[{{"traceId":"{secrets.token_hex(16)}","id":"{secrets.token_hex(8)}","name":"probe",'
            '"timestamp":1,"duration":1,"tags":{"probe":"yes"}}]').encode()
    connection = http.client.HTTPSConnection("127.0.0.1", loop.receiver.port, timeout=5, context=context)
    try:
        connection.request("POST", ZIPKIN_PATH, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _probes(loop: Loop) -> list[Span]:
    return [span for spans in loop.store.last(500) for span in spans if span.tags.get("probe")]


def test_a_mesh_workload_client_is_answered_202(loop: Loop) -> None:
    client = mesh_leaf(loop.authority, f"spiffe://{TRUST_DOMAIN}/svc/api", loop.folder / "api", "api")
    before = len(_probes(loop))
    assert _post_spans(loop, client) == 202
    assert len(_probes(loop)) == before + 1


REFUSED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, socket.timeout)


def test_a_client_certificate_from_another_ca_is_refused(loop: Loop, tmp_path: Path) -> None:
    other, _created = CertificateAuthority.ensure(str(tmp_path / "other"), TRUST_DOMAIN)  # same name, other CA
    client = mesh_leaf(other, f"spiffe://{TRUST_DOMAIN}/svc/web", tmp_path / "client", "web")
    before = len(_probes(loop))
    with pytest.raises(REFUSED):
        _post_spans(loop, client)
    assert len(_probes(loop)) == before


def test_a_client_without_a_certificate_is_refused(loop: Loop) -> None:
    before = len(_probes(loop))
    with pytest.raises(REFUSED):
        _post_spans(loop, None)
    assert len(_probes(loop)) == before


def test_a_mesh_ca_certificate_outside_the_trust_domain_is_refused(loop: Loop) -> None:
    state = Path(loop.authority.state_dir) / "ca"
    key = serialization.load_pem_private_key((state / "intermediate.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issuer = Issuer(x509.load_pem_x509_certificate(loop.authority.intermediate_pem), key)
    client = foreign_leaf(issuer, loop.authority.intermediate_pem, "spiffe://elsewhere.mesh/svc/web",
                          loop.folder / "elsewhere", "elsewhere")
    before = len(_probes(loop))
    with pytest.raises(REFUSED):
        _post_spans(loop, client)
    assert len(_probes(loop)) == before
