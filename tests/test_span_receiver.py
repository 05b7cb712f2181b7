"""SpanReceiver over real sockets with Python's TLS clients (certificates from mesh's CA): what each kind of body
gets (Zipkin 202, OTLP 200, malformed 400, unknown type 415, too large 413, other paths 404), keep-alive, chunked
and gzip bodies, a new trust bundle taking effect for the next connection, and refusals logged once a minute per
peer. And the controller's serving certificate: renewed past half life, re-signed when its intermediate changes,
kept (until it expires) when signing fails, its key in no repr and no log line."""

from __future__ import annotations

import datetime
import gzip
import http.client
import json
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import InstrumentationLibrarySpans, ResourceSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from test_span_receiver_envoy import REFUSED, ClientFiles, mesh_leaf

from mesh.config.tracing import OTLP_PATH, ZIPKIN_PATH
from mesh.controller.rotation import load_signer
from mesh.errors import MeshError
from mesh.inventory.model import controller_spiffe_id
from mesh.pki import CertificateAuthority
from mesh.traces.receiver import MAX_BODY, SpanReceiver
from mesh.traces.serving import ControllerCertificate
from mesh.traces.store import TraceStore

TRUST_DOMAIN = "recv.mesh"


@dataclass
class Receiving:
    store: TraceStore
    receiver: SpanReceiver
    root: Path
    client: ClientFiles
    authority: CertificateAuthority
    folder: Path


def controller_files(authority: CertificateAuthority, folder: Path) -> tuple[Path, Path]:
    issuer = authority.controller_issuer()
    assert issuer is not None
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "intermediate.pem", folder / "intermediate.key"
    cert.write_bytes(issuer.cert_pem)
    key.write_bytes(issuer.key_pem)
    return cert, key


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[Receiving]:
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    cert, key = controller_files(authority, tmp_path / "controller")
    root = tmp_path / "controller" / "root.pem"
    root.write_bytes(authority.root_pem)
    store = TraceStore()
    receiver = SpanReceiver(store, 0, ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key)), str(root),
                            TRUST_DOMAIN, address="127.0.0.1")
    receiver.start()
    client = mesh_leaf(authority, f"spiffe://{TRUST_DOMAIN}/svc/web", tmp_path / "web", "web")
    try:
        yield Receiving(store, receiver, root, client, authority, tmp_path)
    finally:
        receiver.stop()


def connect(receiving: Receiving, client: ClientFiles | None = None) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(receiving.root))
    context.check_hostname = False
    chosen = client or receiving.client
    context.load_cert_chain(str(chosen.chain), str(chosen.key))
    return http.client.HTTPSConnection("127.0.0.1", receiving.receiver.port, timeout=5, context=context)


def post(connection: http.client.HTTPSConnection, path: str, body: bytes,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, str | None]:
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("Connection")


def zipkin(trace_id: str, count: int = 1) -> bytes:
    return json.dumps([{"traceId": trace_id, "id": secrets.token_hex(8), "name": "get", "kind": "SERVER",
                        "timestamp": 1_700_000_000_000_000 + n, "duration": 7, "tags": {"mesh.service": "api"}}
                       for n in range(count)]).encode()


def test_zipkin_spans_are_kept_and_answered_202_on_one_kept_alive_connection(receiving: Receiving) -> None:
    trace_id = secrets.token_hex(16)
    connection = connect(receiving)
    try:
        assert post(connection, ZIPKIN_PATH, zipkin(trace_id))[:2] == (202, b"")
        first_socket = connection.sock
        assert post(connection, ZIPKIN_PATH, zipkin(trace_id, 2))[0] == 202
        assert connection.sock is first_socket  # HTTP/1.1 keep-alive: the same TLS connection
    finally:
        connection.close()
    assert len(receiving.store.trace(trace_id)) == 3 and receiving.store.trace(trace_id)[0].service == "api"


def test_chunked_and_gzip_bodies_are_read(receiving: Receiving) -> None:
    trace_id = secrets.token_hex(16)
    connection = connect(receiving)
    try:
        connection.request("POST", ZIPKIN_PATH, body=iter([zipkin(trace_id)[:10], zipkin(trace_id)[10:]]),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        assert response.status == 202
        assert post(connection, ZIPKIN_PATH, gzip.compress(zipkin(trace_id)), {"Content-Encoding": "gzip"})[0] == 202
    finally:
        connection.close()
    assert len(receiving.store.trace(trace_id)) == 2


def test_otlp_protobuf_and_json_are_answered_as_otlp_http_says(receiving: Receiving) -> None:
    trace_id = secrets.token_hex(16)
    span = OtlpSpan(trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(secrets.token_hex(8)), name="egress",
                    kind=OtlpSpan.SPAN_KIND_CLIENT, start_time_unix_nano=10_000, end_time_unix_nano=30_000)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        instrumentation_library_spans=[InstrumentationLibrarySpans(spans=[span])])])
    connection = connect(receiving)
    try:
        status, body, _ = post(connection, OTLP_PATH, request.SerializeToString(),
                               {"Content-Type": "application/x-protobuf"})
        assert (status, body) == (200, b"")  # an empty ExportTraceServiceResponse
        other = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
            {"traceId": trace_id, "spanId": secrets.token_hex(8), "name": "ingress", "kind": 2}]}]}]}).encode()
        assert post(connection, OTLP_PATH, other)[:2] == (200, b"{}")
        status, body, _ = post(connection, OTLP_PATH, b"hi", {"Content-Type": "text/plain"})
        assert status == 415 and b"text/plain" in body
    finally:
        connection.close()
    assert sorted(span.kind for span in receiving.store.trace(trace_id)) == ["CLIENT", "SERVER"]


def test_a_malformed_body_is_a_400_and_the_connection_serves_on(receiving: Receiving) -> None:
    connection = connect(receiving)
    try:
        status, body, _ = post(connection, ZIPKIN_PATH, b'[{"traceId": "nothex"}]')
        assert status == 400 and b"traceId" in body
        assert post(connection, ZIPKIN_PATH, zipkin(secrets.token_hex(16)))[0] == 202
    finally:
        connection.close()


def test_a_body_over_4_mib_is_a_413_and_closes_the_connection(receiving: Receiving) -> None:
    connection = connect(receiving)
    try:
        connection.putrequest("POST", ZIPKIN_PATH)
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        connection.endheaders()  # the receiver answers before the body is sent
        response = connection.getresponse()
        assert response.status == 413 and response.getheader("Connection") == "close"
    finally:
        connection.close()
    bomb = gzip.compress(b"[" + b" " * (MAX_BODY + 10) + b"]")  # small on the wire, too large once inflated
    connection = connect(receiving)
    try:
        assert post(connection, ZIPKIN_PATH, bomb, {"Content-Encoding": "gzip"})[0] == 413
    finally:
        connection.close()
    assert receiving.store.counts().spans == 0


def test_other_paths_and_methods_are_404(receiving: Receiving) -> None:
    connection = connect(receiving)
    try:
        assert post(connection, "/api/v1/spans", b"[]")[0] == 404
        connection.request("GET", "/api/traces?last=1")
        response = connection.getresponse()
        response.read()
        assert response.status == 404  # the traces API is the loopback web server's, never on this port
    finally:
        connection.close()


def test_a_new_bundle_takes_effect_for_the_next_connection(receiving: Receiving) -> None:
    """A CA switch writes a bundle holding the new root: the new CA's clients are then accepted."""
    new, _created = CertificateAuthority.ensure(str(receiving.folder / "new"), TRUST_DOMAIN)
    newcomer = mesh_leaf(new, f"spiffe://{TRUST_DOMAIN}/svc/web", receiving.folder / "newcomer", "web")
    with pytest.raises(REFUSED):
        post(connect(receiving, newcomer), ZIPKIN_PATH, zipkin(secrets.token_hex(16)))
    receiving.root.write_bytes(receiving.authority.root_pem + new.root_pem)  # the rotation's two-root bundle
    connection = connect(receiving, newcomer)
    try:
        assert post(connection, ZIPKIN_PATH, zipkin(secrets.token_hex(16)))[0] == 202
    finally:
        connection.close()


def test_refusals_are_logged_once_a_minute_per_peer(receiving: Receiving) -> None:
    now = [1000.0]
    receiving.receiver.clock = lambda: now[0]
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            receiving.receiver.refused("10.0.0.9", "test")
        receiving.receiver.refused("10.0.0.8", "test")
        now[0] += 61
        receiving.receiver.refused("10.0.0.9", "test")
    assert [entry["peer"] for entry in logs if entry["event"] == "span_receiver_refused"] == \
        ["10.0.0.9", "10.0.0.8", "10.0.0.9"]


def test_the_receiver_presents_the_controller_s_spiffe_id_signed_by_its_intermediate(receiving: Receiving) -> None:
    connection = connect(receiving)
    try:
        connection.connect()
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [controller_spiffe_id(TRUST_DOMAIN)]
    issuer = receiving.authority.controller_issuer()
    assert issuer is not None
    assert leaf.issuer == x509.load_pem_x509_certificate(issuer.cert_pem).subject


# --- the serving certificate ---

def test_the_certificate_is_renewed_past_half_its_life_and_kept_before(tmp_path: Path) -> None:
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    cert, key = controller_files(authority, tmp_path / "controller")
    now = [datetime.datetime(2026, 12, 7, 0, 0, tzinfo=datetime.UTC)]
    certificate = ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key), now=lambda: now[0])
    first = certificate.current()
    now[0] += datetime.timedelta(minutes=29)
    assert certificate.current() is first
    now[0] += datetime.timedelta(minutes=2)
    second = certificate.current()
    assert second.serial != first.serial and second.key_pem != first.key_pem
    assert second.not_after == now[0] + datetime.timedelta(hours=1)


def test_a_new_intermediate_file_is_signed_with_at_once(tmp_path: Path) -> None:
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    cert, key = controller_files(authority, tmp_path / "controller")
    certificate = ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key))
    first = certificate.current()
    other, _created = CertificateAuthority.ensure(str(tmp_path / "other"), TRUST_DOMAIN)
    controller_files(other, tmp_path / "controller")  # a CA switch: the deploy writes the new intermediate
    second = certificate.current()
    new_intermediate = x509.load_pem_x509_certificate(cert.read_bytes())
    assert second.serial != first.serial
    assert x509.load_pem_x509_certificates(second.chain_pem)[0].issuer == new_intermediate.subject


def test_a_failed_renewal_keeps_the_certificate_until_it_expires_then_fails(tmp_path: Path) -> None:
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    cert, key = controller_files(authority, tmp_path / "controller")
    now = [datetime.datetime.now(datetime.UTC)]
    broken = [False]

    def signer(trust_domain: str, cert_path: str, key_path: str):  # type: ignore[no-untyped-def]
        if broken[0]:
            raise MeshError("cannot read the controller's intermediate")
        return load_signer(trust_domain, cert_path, key_path)

    certificate = ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key), now=lambda: now[0], signer=signer)
    first = certificate.current()
    broken[0] = True
    now[0] += datetime.timedelta(minutes=40)
    with structlog.testing.capture_logs() as logs:
        assert certificate.current() is first
        assert certificate.current() is first  # retried a minute later, not at every connection
    assert [entry["event"] for entry in logs] == ["controller_certificate_not_renewed"]
    now[0] += datetime.timedelta(minutes=30)
    with pytest.raises(MeshError):
        certificate.current()


def test_the_key_is_in_no_repr_and_no_log_line(tmp_path: Path) -> None:
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    cert, key = controller_files(authority, tmp_path / "controller")
    before = {path for path in tmp_path.rglob("*")}
    with structlog.testing.capture_logs() as logs:
        served = ControllerCertificate(TRUST_DOMAIN, 3600, str(cert), str(key)).current()
    body = served.key_pem.split(b"\n")[1].decode()
    assert b"PRIVATE KEY" in served.key_pem and body not in repr(served) and body not in repr(logs)
    assert {path for path in tmp_path.rglob("*")} == before  # nothing written


def test_a_taken_port_is_logged_and_the_controller_goes_on(receiving: Receiving) -> None:
    second = SpanReceiver(TraceStore(), receiving.receiver.port, receiving.receiver.cert_source, str(receiving.root),
                          TRUST_DOMAIN, address="127.0.0.1")
    with structlog.testing.capture_logs() as logs:
        second.start()
    second.stop()
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["span_receiver_cannot_listen"]
