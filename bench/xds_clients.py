"""The xDS load generator of bench/convergence (`--delivery xds`): N simulated proxies in ONE process, each an ADS
stream over mTLS (grpc.aio, its own channel and TCP connection) acting as Envoy does on the wire.

Each simulated proxy:
- presents its own leaf (DNS SAN = its node id, URI SAN = its service's SPIFFE ID) and checks the server's;
- opens StreamAggregatedResources and sends its node id on the first request only
  (set_node_on_first_message_only, as mesh's ADS bootstrap asks);
- subscribes CDS (wildcard), then EDS for the EDS clusters CDS gave, then LDS (wildcard), then RDS for the route
  configurations its listeners name over ADS, and SDS/ECDS for the secrets and filter configs referenced with an ADS
  config source;
- ACKs every response (its version_info and nonce, the type's current names) or, when asked (`nack`), NACKs the
  next response of a type (the last ACKed version, the nonce, an error_detail), as Envoy does for a config it
  refuses;
- reconnects when the server ends the stream (jittered backoff, as mesh's ADS bootstrap asks Envoy to),
  re-subscribing with the versions it has;
- records, per type and version, when it received that version and when it ACKed it (time.monotonic(): the same
  clock in every process on this machine).

It owns the client side only; what the server serves and how the bench reads these records is elsewhere
(bench/convergence_xds.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2

from mesh.render import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_CONFIG_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)

SHORT = {CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS", LISTENER_TYPE: "LDS", ROUTE_TYPE: "RDS", SECRET_TYPE: "SDS",
         EXTENSION_CONFIG_TYPE: "ECDS"}
TYPE_OF = {short: url for url, short in SHORT.items()}
WILDCARD = (CLUSTER_TYPE, LISTENER_TYPE)
INVALID_ARGUMENT = 3  # google.rpc.Code, what Envoy puts in a NACK's error_detail
RETRY_BASE_S, RETRY_MAX_S = 0.5, 10.0  # mesh's ADS bootstrap: jittered backoff, base 0.5 s, max 10 s


@dataclass(frozen=True)
class ClientIdentity:
    """One simulated proxy's name and TLS material (PEM)."""

    node_id: str
    cert_chain_pem: bytes  # leaf, then the intermediate
    key_pem: bytes = field(repr=False)


@dataclass
class TypeRecord:
    """One type's history on one stream."""

    names: frozenset[str] = frozenset()  # what the client subscribes to (empty for a wildcard type)
    acked: str = ""  # the last version ACKed
    nonce: str = ""  # the last nonce received
    received_at: dict[str, float] = field(default_factory=dict)  # version -> first received (monotonic)
    acked_at: dict[str, float] = field(default_factory=dict)  # version -> ACKed (monotonic)
    nacked: dict[str, str] = field(default_factory=dict)  # version -> the error_detail sent


@dataclass
class SimulatedProxy:
    """One simulated proxy's ADS client: `run()` streams until cancelled, reconnecting when the server ends a stream
    (or, with retry=False, returns when it ends)."""

    identity: ClientIdentity
    types: dict[str, TypeRecord] = field(default_factory=dict)  # type URL -> its record
    nack: set[str] = field(default_factory=set)  # type URLs whose next response is NACKed (then ACKs again)
    ended: str | None = None  # why the last stream ended when run() returned (retry=False), None while it runs
    ends: list[str] = field(default_factory=list)  # why each stream ended (the gRPC status), oldest first
    responses: int = 0
    # (wildcard type URL, other type URL) -> the names the wildcard type's resources reference over ADS
    references: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    _queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = field(default_factory=asyncio.Queue)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def acked(self, type_url: str) -> str:
        record = self.types.get(type_url)
        return record.acked if record is not None else ""

    async def run(self, target: str, root_pem: bytes, server_name: str, retry: bool = True) -> None:
        """Stream until cancelled; when the server ends the stream, reconnect after a jittered backoff (0.5 s
        doubling to 10 s, reset once a stream got a response), as Envoy's ADS retry policy does, re-subscribing
        with the versions it has; without `retry`, return after the first stream."""
        credentials = grpc.ssl_channel_credentials(root_certificates=root_pem,
                                                   private_key=self.identity.key_pem,
                                                   certificate_chain=self.identity.cert_chain_pem)
        options = [("grpc.ssl_target_name_override", server_name), ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        backoff = RETRY_BASE_S
        async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            while True:
                responses = self.responses
                reason = await self._stream(stub)
                self.ends.append(reason)
                if not retry:
                    self.ended = reason
                    return
                backoff = RETRY_BASE_S if self.responses > responses else min(backoff * 2, RETRY_MAX_S)
                await asyncio.sleep(random.uniform(backoff / 2, backoff))

    async def _stream(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> str:
        """One stream: the subscriptions the proxy has (CDS first, with the node), then ACKs; why it ended."""
        self._queue = asyncio.Queue()
        for record in self.types.values():
            record.nonce = ""
        self._subscribe(CLUSTER_TYPE, frozenset(), first=True)
        for type_url, record in list(self.types.items()):
            if type_url != CLUSTER_TYPE:
                self._subscribe(type_url, record.names)
        call = stub.StreamAggregatedResources(self._requests())
        try:
            async for response in call:
                self._handle(response)
            return "closed by the server (OK)"
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        except Exception as error:  # noqa: BLE001 - the generator's own bug: shown in the report, not lost
            return f"generator error: {error!r}"
        finally:
            self._queue.put_nowait(None)

    async def _requests(self) -> Any:
        while True:
            request = await self._queue.get()
            if request is None:
                return
            yield request

    def _subscribe(self, type_url: str, names: frozenset[str], first: bool = False) -> None:
        record = self.types.setdefault(type_url, TypeRecord())
        record.names = names
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=record.acked,
                                                 response_nonce=record.nonce, resource_names=sorted(names))
        if first:
            request.node.id = self.node_id
        self._queue.put_nowait(request)

    def _handle(self, response: discovery_pb2.DiscoveryResponse) -> None:
        now = time.monotonic()
        self.responses += 1
        type_url, version = response.type_url, response.version_info
        record = self.types.setdefault(type_url, TypeRecord())
        record.nonce = response.nonce
        record.received_at.setdefault(version, now)
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=response.nonce,
                                                 resource_names=sorted(record.names))
        if type_url in self.nack:
            self.nack.discard(type_url)
            message = f"bench: {self.node_id} refuses {SHORT.get(type_url, type_url)} version {version}"
            request.version_info = record.acked
            request.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=message))
            record.nacked[version] = message
            self._queue.put_nowait(request)
            return
        request.version_info = version
        self._queue.put_nowait(request)
        record.acked = version
        record.acked_at.setdefault(version, time.monotonic())
        if type_url in WILDCARD:
            wanted = referenced([bytes(item.value) for item in response.resources], type_url)
            for other in (ENDPOINT_TYPE, ROUTE_TYPE, SECRET_TYPE, EXTENSION_CONFIG_TYPE):
                self.references[(type_url, other)] = wanted.get(other, frozenset())
                self._follow(other, self.references.get((CLUSTER_TYPE, other), frozenset())
                             | self.references.get((LISTENER_TYPE, other), frozenset()))
            if type_url == CLUSTER_TYPE and LISTENER_TYPE not in self.types:  # LDS after CDS, as Envoy starts
                self._subscribe(LISTENER_TYPE, frozenset())

    def _follow(self, type_url: str, names: frozenset[str]) -> None:
        record = self.types.get(type_url)
        if record is not None and record.names == names:
            return
        if record is None and not names:
            return
        self._subscribe(type_url, names)


# ---- what a resource references over ADS (memoized by the resource's bytes: proxies share most) -----------------

_REFERENCES: dict[tuple[str, bytes], dict[str, frozenset[str]]] = {}


def referenced(resources: Iterable[bytes], type_url: str) -> dict[str, frozenset[str]]:
    """Type URL -> names the given Clusters or Listeners (serialized) make Envoy subscribe to over ADS: EDS for an
    EDS cluster (its service_name, else its name), RDS for an HttpConnectionManager's `rds` with an ADS source,
    SDS for an SdsSecretConfig with an ADS source, ECDS for a filter whose config_discovery has an ADS source."""
    found: dict[str, set[str]] = {}
    for blob in resources:
        key = (type_url, blob)
        if key not in _REFERENCES:
            _REFERENCES[key] = _references_of(blob, type_url)
        for other, names in _REFERENCES[key].items():
            found.setdefault(other, set()).update(names)
    return {other: frozenset(names) for other, names in found.items()}


def _references_of(blob: bytes, type_url: str) -> dict[str, frozenset[str]]:
    found: dict[str, set[str]] = {}
    if type_url == CLUSTER_TYPE:
        cluster = cluster_pb2.Cluster.FromString(blob)
        if cluster.HasField("type") and cluster.type == cluster_pb2.Cluster.EDS:
            found.setdefault(ENDPOINT_TYPE, set()).add(cluster.eds_cluster_config.service_name or cluster.name)
        _walk(cluster, found)
    else:
        _walk(listener_pb2.Listener.FromString(blob), found)
    return {other: frozenset(names) for other, names in found.items()}


def _is_ads(source: Message) -> bool:
    return source.HasField("ads")


def _walk(message: Message, found: dict[str, set[str]]) -> None:
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Any":
        inner = _unpack(message)
        if inner is not None:
            _walk(inner, found)
        return
    if name == "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig" and _is_ads(message.sds_config):  # type: ignore[attr-defined]
        found.setdefault(SECRET_TYPE, set()).add(message.name)  # type: ignore[attr-defined]
    elif name == "envoy.extensions.filters.network.http_connection_manager.v3.Rds" \
            and _is_ads(message.config_source):  # type: ignore[attr-defined]
        found.setdefault(ROUTE_TYPE, set()).add(message.route_config_name)  # type: ignore[attr-defined]
    if "config_discovery" in message.DESCRIPTOR.fields_by_name and message.HasField("config_discovery") \
            and _is_ads(message.config_discovery.config_source):  # type: ignore[attr-defined]
        found.setdefault(EXTENSION_CONFIG_TYPE, set()).add(message.name)  # type: ignore[attr-defined]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            values = value.values()
            if descriptor.message_type.fields_by_name["value"].message_type is None:
                continue
        elif descriptor.is_repeated:
            values = value
        else:
            values = (value,)
        for item in values:
            _walk(item, found)


def _unpack(any_message: Message) -> Message | None:
    """The message inside an Any, importing its xds-protos module on first sight; None for an unknown type."""
    full_name = any_message.type_url.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName(full_name)
    except KeyError:
        _import_package(full_name.rsplit(".", 1)[0])
        try:
            descriptor = pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None
    inner = message_factory.GetMessageClass(descriptor)()
    inner.ParseFromString(any_message.value)  # type: ignore[attr-defined]
    return inner


def _import_package(package: str) -> None:
    """Every *_pb2 module of an xds-protos package (`envoy.extensions.filters.http.router.v3`)."""
    with contextlib.suppress(ImportError):
        module = importlib.import_module(package)
        for folder in getattr(module, "__path__", []):
            for path in Path(folder).glob("*_pb2.py"):
                with contextlib.suppress(ImportError):
                    importlib.import_module(f"{package}.{path.stem}")


# ---- a fleet of them in one event loop --------------------------------------------------------------------------

class Generator:
    """N simulated proxies on the running event loop; `start()` opens their streams (spread over `ramp_s`)."""

    def __init__(self, identities: Iterable[ClientIdentity], target: str, root_pem: bytes, server_name: str) -> None:
        self.proxies = [SimulatedProxy(identity) for identity in identities]
        self.target, self.root_pem, self.server_name = target, root_pem, server_name
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, ramp_s: float = 0.0) -> None:
        for index, proxy in enumerate(self.proxies):
            self._tasks.append(asyncio.create_task(proxy.run(self.target, self.root_pem, self.server_name)))
            if ramp_s and index % 50 == 49:
                await asyncio.sleep(ramp_s * 50 / len(self.proxies))

    async def wait_for(self, done: Callable[[SimulatedProxy], bool], timeout: float, poll_s: float = 0.01) -> list[
            SimulatedProxy]:
        """Wait until done(proxy) for every proxy or timeout; the proxies not done (empty: all done)."""
        deadline = time.monotonic() + timeout
        while True:
            behind = [proxy for proxy in self.proxies if not done(proxy)]
            if not behind or time.monotonic() > deadline:
                return behind
            if all(proxy.ended is not None for proxy in behind):
                return behind
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
