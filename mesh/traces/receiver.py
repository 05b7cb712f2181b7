"""SpanReceiver: mesh's own span collector on every controller (TRACE_PORT), where the proxies send their spans.

mTLS only: each accepted connection is wrapped with the current TLS context (the controller's serving certificate,
the trust bundle as the only CAs), the client must present a certificate chaining to the bundle whose leaf has a
URI SAN in the trust domain (`spiffe://<trust domain>/...`), or the connection is closed before any HTTP. The
context is rebuilt when the bundle file or the serving certificate changes (a CA rotation, a renewal).

HTTP/1.1 with keep-alive. `POST /api/v2/spans` (Zipkin JSON v2, what Envoy's Zipkin tracer sends) answers 202,
`POST /v1/traces` (OTLP/HTTP, protobuf or JSON) answers 200 with an empty ExportTraceServiceResponse; a malformed
body 400, an unknown content type 415, a body over MAX_BODY (or expanding past it) 413, other paths 404. At most
MAX_CONNECTIONS connections at once; idle ones are closed after IDLE_TIMEOUT_S. Refusals are logged at most once
a minute per peer address; spans themselves are never logged.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import structlog

from mesh.config.tracing import OTLP_PATH, ZIPKIN_PATH
from mesh.errors import MeshError
from mesh.traces.decode import UnsupportedMediaType, otlp_spans, zipkin_spans
from mesh.traces.serving import CertSource, ServingCert
from mesh.traces.store import TraceStore

MAX_BODY = 4 * 1024 * 1024
MAX_CONNECTIONS = 256
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
REFUSAL_LOG_INTERVAL_S = 60.0


class BodyTooLarge(Exception):
    pass


class SpanReceiver:
    """`start()` binds and serves in a thread of its own (a port it cannot bind is logged, not raised: the
    controller's other work goes on); `stop()` closes the listener and every connection."""

    def __init__(self, store: TraceStore, port: int, cert_source: CertSource, bundle_path: str, trust_domain: str,
                 address: str = "0.0.0.0", clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.cert_source, self.bundle_path = store, cert_source, bundle_path
        self.trust_domain, self.address, self.port = trust_domain, address, port
        self.clock = clock
        self.log = structlog.get_logger()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._context_lock = threading.Lock()
        self._context: tuple[ServingCert, tuple[int, int, int], ssl.SSLContext] | None = None
        self._refusals_logged: dict[str, float] = {}
        self._refusals_lock = threading.Lock()

    # --- lifecycle ---

    def start(self) -> None:
        try:
            self.context()  # a first certificate now, so a problem is logged at start
        except (MeshError, OSError, ssl.SSLError) as exc:
            self.log.error("span_receiver_no_tls_context", error=str(exc), effect="connections are refused")
        try:
            self._server = _Server((self.address, self.port), self)
        except OSError as exc:  # the controller goes on managing the mesh; the proxies' spans are lost meanwhile
            self.log.error("span_receiver_cannot_listen", address=self.address, port=self.port,
                           error=exc.strerror or str(exc), effect="no spans are received on this controller")
            return
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="span-receiver", daemon=True)
        self._thread.start()
        self.log.info("span_receiver_started", address=self.address, port=self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.log.info("span_receiver_stopped", port=self.port)

    # --- TLS ---

    def context(self) -> ssl.SSLContext:
        """The TLS context for a new connection: rebuilt when the serving certificate or the bundle changed."""
        cert = self.cert_source.current()
        info = os.stat(self.bundle_path)
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._context_lock:
            if self._context is not None and self._context[0] is cert and self._context[1] == stamp:
                return self._context[2]
            context = server_context(cert, self.bundle_path)
            self._context = (cert, stamp, context)
            return context

    def peer_allowed(self, peer: dict[str, Any]) -> bool:
        """The client's leaf carries a URI SAN in the trust domain (the chain was checked by the handshake)."""
        prefix = f"spiffe://{self.trust_domain}/"
        return any(kind == "URI" and isinstance(value, str) and value.startswith(prefix)
                   for kind, value in peer.get("subjectAltName", ()))

    def refused(self, peer: str, reason: str) -> None:
        now = self.clock()
        with self._refusals_lock:
            if now - self._refusals_logged.get(peer, float("-inf")) < REFUSAL_LOG_INTERVAL_S:
                return
            if len(self._refusals_logged) > 4096:
                self._refusals_logged.clear()
            self._refusals_logged[peer] = now
        self.log.warning("span_receiver_refused", peer=peer, reason=reason)


def server_context(cert: ServingCert, bundle_path: str) -> ssl.SSLContext:
    """TLS 1.2+, the client's certificate required and checked against the bundle alone; the key is handed to
    OpenSSL through an anonymous memory file (memfd), never a file on disk."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=bundle_path)
    fd = os.memfd_create("mesh-controller-serving", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.chain_pem + cert.key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: SpanReceiver) -> None:
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.connections_lock:
            if len(self.connections) >= MAX_CONNECTIONS:
                self.receiver.refused(str(client_address[0]), f"more than {MAX_CONNECTIONS} connections")
                return False
            self.connections.add(request)
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake and the peer's check, then HTTP."""
        peer = str(client_address[0])
        try:
            try:
                context = self.receiver.context()
            except (MeshError, OSError, ssl.SSLError) as exc:
                self.receiver.refused(peer, f"no TLS context: {exc}")
                return
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                tls = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.receiver.refused(peer, f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
                return
            with self.connections_lock:
                self.connections.discard(request)
                self.connections.add(tls)
            try:
                peer_cert = tls.getpeercert()
                if not peer_cert or not self.receiver.peer_allowed(peer_cert):
                    self.receiver.refused(peer, "the client certificate has no SPIFFE ID in the trust domain")
                    return
                _Handler(tls, client_address, self)
            finally:
                with self.connections_lock:
                    self.connections.discard(tls)
                with contextlib.suppress(OSError):
                    tls.close()
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            open_now = list(self.connections)
        for connection in open_now:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: _Server
    server_version = "mesh-span-receiver"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: the refusals and the counts say what matters

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in (ZIPKIN_PATH, OTLP_PATH):
            self._drain_and_answer(404, b"not found\n")
            return
        try:
            body = self._body()
        except BodyTooLarge:
            self.close_connection = True
            self._answer(413, b"body too large\n")
            return
        except ValueError as exc:
            self.close_connection = True
            self._answer(400, f"{exc}\n".encode())
            return
        content_type = self.headers.get("Content-Type", "")
        try:
            spans = zipkin_spans(body) if path == ZIPKIN_PATH else otlp_spans(body, content_type)
        except UnsupportedMediaType as exc:
            self._answer(415, f"{exc}\n".encode())
            return
        except ValueError as exc:
            self._answer(400, f"{str(exc)[:500]}\n".encode())
            return
        self.server.receiver.store.add(spans)
        if path == ZIPKIN_PATH:
            self._answer(202, b"")
        elif content_type.split(";", 1)[0].strip().lower() == "application/json":
            self._answer(200, b"{}", "application/json")
        else:
            self._answer(200, b"", "application/x-protobuf")  # an empty ExportTraceServiceResponse

    def do_GET(self) -> None:
        self._drain_and_answer(404, b"not found\n")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _body(self) -> bytes:
        """The request's body (Content-Length or chunked; gzip or deflate decoded), at most MAX_BODY bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._chunked()
        else:
            length_text = self.headers.get("Content-Length")
            if length_text is None or not length_text.strip().isdigit():
                raise ValueError("a body needs Content-Length or chunked transfer encoding")
            length = int(length_text)
            if length > MAX_BODY:
                raise BodyTooLarge()
            raw = self.rfile.read(length)
            if len(raw) != length:
                raise ValueError("the body ended early")
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in ("gzip", "deflate"):
            raise ValueError(f"content encoding {encoding!r}: expected gzip, deflate or none")
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        try:
            body = inflater.decompress(raw, MAX_BODY + 1)
        except zlib.error as exc:
            raise ValueError(f"not {encoding}: {exc}") from None
        if len(body) > MAX_BODY:
            raise BodyTooLarge()
        return body

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError("a malformed chunk") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise BodyTooLarge()
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _drain_and_answer(self, status: int, body: bytes) -> None:
        length = self.headers.get("Content-Length", "0").strip()
        if length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
        self._answer(status, body)

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
