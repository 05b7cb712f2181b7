"""XdsServer: the Aggregated Discovery Service (ADS, state of the world) every controller serves on XDS_PORT, on
grpc.aio in a thread and event loop of its own. It streams to each proxy the resources the controller gives it
(`update`, node id -> ProxyResources) and knows nothing of Consul or of how they were computed.

mTLS only. The client must present a certificate chaining to the trust bundle file, whose leaf has a URI SAN in the
trust domain and, as a DNS SAN, the node id of the stream's first request: a proxy gets only its own resources.
Otherwise the stream ends with PERMISSION_DENIED (logged at most once a minute per peer address); a node id the
server has no resources for ends with NOT_FOUND. Delta xDS is not served (UNIMPLEMENTED).

TLS credentials are static (grpc.ssl_server_credentials): grpc's dynamic server credentials, a Python callback per
handshake, crashed the process (grpcio 1.85.4: SIGABRT or SIGSEGV) when hundreds of proxies connect at once, which
is what a controller restart or the maximum connection age brings. Every `tls_check_s` the loop asks the
CertSource for the serving certificate and reads the bundle file; when either changed (a renewal, a new
intermediate, a CA rotation) and is the same at the next check (a file caught half written is not taken), a new grpc server with the new credentials starts on the same port (SO_REUSEPORT:
both listen for a moment; a connection the old one took and had not finished its handshake with when it stopped is
reset, and its client retries), then the old one stops accepting and ends its streams after
`tls_swap_grace_s`; their proxies reconnect (Envoy's jittered backoff) to the new one and, versions being content
hashes, get nothing they already hold. The streams' state is the XdsServer's, not a grpc server's: `status()` goes
on across the swap. Before its first bind the server checks that no other socket listens on the port, so a second
controller process on a host fails to listen instead of sharing the port.

Connections are closed after MAX_CONNECTION_AGE_S (plus the grace), so streams spread over the controllers again.
Pushes are debounced (`debounce_s`). Responses are encoded by hand from the resources' serialized Anys (a
DiscoveryResponse's `resources` is field 2): nothing is parsed again per stream.

Test hook: when `test_hook_path` exists and holds `{"node_id": N, "type": "LDS"}`, node N's listeners get one that
Envoy refuses (read at each push): it proves a NACK is reported once and the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import structlog
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2

from mesh.config.xds import MAX_CONNECTION_AGE_GRACE_S, MAX_CONNECTION_AGE_S
from mesh.errors import MeshError
from mesh.render import LISTENER_TYPE
from mesh.traces.serving import CertSource
from mesh.xds.resources import SHORT_NAMES, ProxyResources, with_invalid_listener
from mesh.xds.sotw import Request, Response, StreamState
from mesh.xds.status import StreamStatus

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
KEEPALIVE_TIME_S = 30
KEEPALIVE_TIMEOUT_S = 10
REFUSAL_LOG_INTERVAL_S = 60.0
STOP_GRACE_S = 1.0
TLS_CHECK_S = 10.0  # how often the serving certificate and the bundle file are checked for a change
TLS_SWAP_GRACE_S = 30.0  # the streams of a server whose TLS was replaced end this long after the new one started
HOLD_MAX_S = 10.0  # listener and route changes wait this long at most for the clusters they may name
_GONE = object()  # queued when the stream's node has no resources any more


@dataclass(eq=False)
class _Stream:
    node_id: str
    peer: str
    connected_since: float
    state: StreamState
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    release: asyncio.TimerHandle | None = None  # while it holds listener and route changes


class XdsServer:
    """`start()` binds and serves (a port it cannot bind, or no serving certificate, is logged, not raised: the
    controller's other work goes on; `serving` says); `stop()` ends every stream; `update()` and `status()` may be
    called from any thread."""

    def __init__(self, port: int, cert_source: CertSource, bundle_path: str, trust_domain: str,
                 host: str = "0.0.0.0", test_hook_path: str | None = None, debounce_s: float = 0.05,
                 max_connection_age_s: float = MAX_CONNECTION_AGE_S,
                 max_connection_age_grace_s: float = MAX_CONNECTION_AGE_GRACE_S,
                 clock: Callable[[], float] = time.monotonic, tls_check_s: float = TLS_CHECK_S,
                 tls_swap_grace_s: float = TLS_SWAP_GRACE_S) -> None:
        self.port, self.host, self.cert_source, self.bundle_path = port, host, cert_source, bundle_path
        self.trust_domain, self.test_hook_path, self.debounce_s = trust_domain, test_hook_path, debounce_s
        self.max_connection_age_s, self.max_connection_age_grace_s = max_connection_age_s, max_connection_age_grace_s
        self.clock, self.tls_check_s, self.tls_swap_grace_s = clock, tls_check_s, tls_swap_grace_s
        self.serving = False
        self.log = structlog.get_logger()
        self._lock = threading.Lock()  # guards everything below that both the loop and callers touch
        self._nacks_logged: dict[tuple[str, str], str] = {}  # (node id, type url) -> the version last logged
        self._pending: dict[str, ProxyResources] | None = None
        self._given: dict[str, ProxyResources] = {}  # the last update
        self._served: dict[str, ProxyResources] = {}  # the last update with the test hook applied
        self._streams: set[_Stream] = set()
        self._refusals_logged: dict[str, float] = {}
        self._tls_seen: tuple[bytes, bytes] | None = None  # what the listening server has (_tls_stamp)
        self._tls_candidate: tuple[bytes, bytes] | None = None  # a change seen once (taken when seen again)
        self._tls_error: str | None = None  # the last TLS renewal error logged (logged again only when it changes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None  # the one accepting connections
        self._retiring: set[grpc.aio.Server] = set()  # replaced ones, their streams in their grace
        self._watcher: asyncio.Task[None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None

    # --- lifecycle ---

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="xds-server", daemon=True)
        self._thread.start()
        started.wait(timeout=30)

    def _run(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            started.set()
        if self.serving:
            loop.run_forever()
        loop.close()

    async def _serve(self) -> None:
        try:
            seen = self._tls_stamp()
            credentials = self._credentials()
        except (MeshError, OSError, ValueError) as exc:
            self.log.error("xds_server_no_tls", error=str(exc), effect="ADS is not served on this controller")
            return
        try:
            _check_free(self.host, self.port)
            server = self._listening(credentials)
        except (OSError, RuntimeError) as exc:
            self.log.error("xds_server_cannot_listen", address=self.host, port=self.port, error=str(exc),
                           effect="ADS is not served on this controller")
            return
        await server.start()
        self._server, self._tls_seen, self.serving = server, seen, True
        self._flush()
        self._watcher = asyncio.ensure_future(self._watch_tls())
        self.log.info("xds_server_started", address=self.host, port=self.port)

    def _listening(self, credentials: grpc.ServerCredentials) -> grpc.aio.Server:
        """A grpc server bound to host:port (self.port becomes the port bound when it was 0), not started yet."""
        options = [("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                   ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
                   ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
                   ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                   ("grpc.so_reuseport", 1)]  # the next server (new TLS) binds while this one still listens
        server = grpc.aio.server(options=options)
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_secure_port(f"{self.host}:{self.port}", credentials)
        return server

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._server is None or not self.serving:
            return
        self.serving = False
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=STOP_GRACE_S + 10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.log.info("xds_server_stopped", port=self.port)

    async def _shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        servers = [server for server in (self._server, *self._retiring) if server is not None]
        await asyncio.gather(*(server.stop(STOP_GRACE_S) for server in servers))

    # --- what callers give and read ---

    def update(self, resources: Mapping[str, ProxyResources]) -> None:
        """Every node's resources from now on (node id -> resources); pushed to the open streams after
        debounce_s (the newest of several updates meanwhile)."""
        with self._lock:
            self._pending = dict(resources)
        loop = self._loop
        if loop is not None and self.serving:
            loop.call_soon_threadsafe(self._arm)

    def status(self) -> dict[str, StreamStatus]:
        """node id -> its stream here (the one connected last when it holds several)."""
        with self._lock:
            shown: dict[str, StreamStatus] = {}
            for stream in sorted(self._streams, key=lambda item: item.connected_since):
                shown[stream.node_id] = StreamStatus(stream.node_id, stream.peer, stream.connected_since,
                                                     stream.state.status(self._served.get(stream.node_id)))
            return shown

    # --- pushes ---

    def _arm(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_later(self.debounce_s, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        with self._lock:
            if self._pending is not None:
                self._given, self._pending = self._pending, None
            before, self._served = self._served, self._hooked(self._given)
            for stream in self._streams:
                resources = self._served.get(stream.node_id)
                if resources is None:
                    stream.queue.put_nowait(_GONE)
                elif resources is not before.get(stream.node_id):
                    self._send(stream, stream.state.on_resources(resources))

    def _hooked(self, given: dict[str, ProxyResources]) -> dict[str, ProxyResources]:
        if self.test_hook_path is None or not os.path.exists(self.test_hook_path):
            return given
        try:
            with open(self.test_hook_path, encoding="utf-8") as handle:
                hook = json.load(handle)
            node, kind = hook["node_id"], hook["type"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("xds_test_hook_unreadable", path=self.test_hook_path, error=str(exc))
            return given
        if kind != SHORT_NAMES[LISTENER_TYPE] or node not in given:
            return given
        return {**given, node: with_invalid_listener(given[node])}

    def _send(self, stream: _Stream, responses: list[Response]) -> None:
        """Queue responses (the loop's thread, self._lock held) and log the NACKs the state machine noted."""
        for response in responses:
            stream.queue.put_nowait(response)
        for nack in stream.state.new_nacks:
            if self._nacks_logged.get((stream.node_id, nack.type_url)) == nack.version:
                continue  # the same refusal on a new stream (Envoy reopened it): reported once per controller
            self._nacks_logged[(stream.node_id, nack.type_url)] = nack.version
            self.log.warning("xds_nacked", node_id=stream.node_id, type=SHORT_NAMES.get(nack.type_url, nack.type_url),
                             version=nack.version, error=nack.message[:2000],
                             effect="the proxy keeps its previous config of this type")
        stream.state.new_nacks.clear()
        if stream.state.holding and stream.release is None and self._loop is not None:
            stream.release = self._loop.call_later(HOLD_MAX_S, self._release, stream)

    def _release(self, stream: _Stream) -> None:
        """Listener and route changes held too long for the clusters (the proxy does not answer): sent now."""
        stream.release = None
        with self._lock:
            resources = self._served.get(stream.node_id)
            if stream not in self._streams or resources is None or not stream.state.holding:
                return
            self.log.warning("xds_clusters_not_ready", node_id=stream.node_id, waited_s=HOLD_MAX_S,
                             effect="listener and route changes are sent anyway")
            self._send(stream, stream.state.release(resources))

    # --- streams ---

    async def _stream(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
                      context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        peer = context.peer()
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        node_id = first.node.id
        refusal = self._refusal(node_id, context.auth_context())
        if refusal is not None:
            self._refused(peer, node_id, refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        with self._lock:
            known = node_id in self._served
        if not known:
            self._refused(peer, node_id, "no resources for this node id")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this controller has no resources for node {node_id[:200]!r}")
        stream = _Stream(node_id, peer, time.time(), StreamState(node_id))
        with self._lock:
            self._streams.add(stream)
        reader = asyncio.ensure_future(self._read(stream, first, requests))
        try:
            while True:
                item = await stream.queue.get()
                if item is None:
                    return
                if item is _GONE:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} left the mesh")
                if isinstance(item, PermissionError):
                    self._refused(peer, node_id, str(item))
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(item))
                yield _encoded(item)
        finally:
            reader.cancel()
            if stream.release is not None:
                stream.release.cancel()
            with self._lock:
                self._streams.discard(stream)

    async def _read(self, stream: _Stream, first: discovery_pb2.DiscoveryRequest,
                    requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            self._handle(stream, first)
            async for request in requests:
                if request.HasField("node") and request.node.id and request.node.id != stream.node_id:
                    stream.queue.put_nowait(PermissionError(f"node id changed on the stream to {request.node.id!r}"))
                    return
                self._handle(stream, request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        finally:
            stream.queue.put_nowait(None)

    def _handle(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        error = (request.error_detail.message or f"code {request.error_detail.code}") \
            if request.HasField("error_detail") else None
        parsed = Request(request.type_url, request.version_info, request.response_nonce,
                         tuple(request.resource_names), error)
        with self._lock:
            resources = self._served.get(stream.node_id)
            if resources is None:
                stream.queue.put_nowait(_GONE)
                return
            self._send(stream, stream.state.on_request(parsed, resources))

    async def _delta(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not served: use the state of the world ADS")
        yield b""  # pragma: no cover (makes this a stream handler)

    # --- identity ---

    def _refusal(self, node_id: str, auth: Mapping[str, Any]) -> str | None:
        """Why this stream may not have node_id's resources, or None when its certificate names it."""
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            return "no client certificate"
        try:
            leaf = x509.load_pem_x509_certificate(pems[0])
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return "the client certificate has no subject alternative names"
        prefix = f"spiffe://{self.trust_domain}/"
        if not any(uri.startswith(prefix) for uri in names.get_values_for_type(x509.UniformResourceIdentifier)):
            return f"the client certificate has no SPIFFE ID in the trust domain {self.trust_domain}"
        if not node_id or node_id not in names.get_values_for_type(x509.DNSName):
            return f"the client certificate does not name node {node_id[:200]!r}"
        return None

    def _refused(self, peer: str, node_id: str, reason: str) -> None:
        address = peer.rsplit(":", 1)[0]
        now = self.clock()
        with self._lock:
            if now - self._refusals_logged.get(address, float("-inf")) < REFUSAL_LOG_INTERVAL_S:
                return
            if len(self._refusals_logged) > 4096:
                self._refusals_logged.clear()
            self._refusals_logged[address] = now
        self.log.warning("xds_stream_refused", peer=peer, node_id=node_id[:200], reason=reason)

    # --- TLS ---

    def _tls_stamp(self) -> tuple[bytes, bytes]:
        """Digests of the serving certificate to use now (chain and key) and of the bundle file's content: what,
        when it changes, needs a server with new credentials. An equal certificate in a new object or with other
        dates, or the bundle written again with the same content, is no change."""
        cert = self.cert_source.current()
        with open(self.bundle_path, "rb") as handle:
            bundle = handle.read()
        return _digest(cert.chain_pem, cert.key_pem), _digest(bundle)

    def _credentials(self) -> grpc.ServerCredentials:
        cert = self.cert_source.current()
        with open(self.bundle_path, "rb") as handle:
            bundle = handle.read()
        x509.load_pem_x509_certificates(bundle)  # ValueError when it holds no certificate (or a cut one)
        return grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)], bundle, require_client_auth=True)

    async def _watch_tls(self) -> None:
        """Every tls_check_s: a new server when the serving certificate or the bundle file changed and was the
        same at the check before (a file caught half written is not taken). A failure is logged (once while it
        stays the same) and the current server keeps serving."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tls_check_s)
            try:
                seen = await loop.run_in_executor(None, self._tls_stamp)  # may sign: not in the loop's thread
                if seen == self._tls_seen:
                    self._tls_candidate = self._tls_error = None
                elif seen != self._tls_candidate:
                    self._tls_candidate = seen
                else:
                    await self._swap(self._credentials())
                    self._tls_seen, self._tls_candidate, self._tls_error = seen, None, None
            except (MeshError, OSError, ValueError, RuntimeError) as exc:
                if str(exc) != self._tls_error:
                    self.log.error("xds_server_tls_not_renewed", error=str(exc),
                                   effect="the current certificate and bundle are served")
                self._tls_error = str(exc)

    async def _swap(self, credentials: grpc.ServerCredentials) -> None:
        """Start a server with the new credentials on the port, then stop the old one: it accepts no connection
        from now on and its streams end after tls_swap_grace_s (their proxies reconnect to the new one)."""
        new = self._listening(credentials)
        await new.start()
        old, self._server = self._server, new
        if old is not None:
            self._retiring.add(old)
            ending = asyncio.ensure_future(old.stop(self.tls_swap_grace_s))
            ending.add_done_callback(lambda _: self._retiring.discard(old))
        self.log.info("xds_server_tls_renewed", port=self.port, grace_s=self.tls_swap_grace_s,
                      effect="new connections get the new certificate and bundle; open streams end after the grace")


def _digest(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.digest()


def _check_free(host: str, port: int) -> None:
    """OSError when some socket listens on host:port already (another process: the servers here set
    SO_REUSEPORT, which would share the port with it silently). Port 0: nothing to check."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        probe.bind((host, port))


def _identity(data: bytes) -> bytes:
    return data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encoded(response: Response) -> bytes:
    """The DiscoveryResponse's wire form: its scalar fields, then each serialized Any as field 2 (a protobuf
    message's fields may come in any order)."""
    head = discovery_pb2.DiscoveryResponse(version_info=response.version_info, type_url=response.type_url,
                                           nonce=response.nonce).SerializeToString()
    return head + b"".join(b"\x12" + _varint(len(item)) + item for item in response.resources)
