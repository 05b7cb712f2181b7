"""One ADS stream's state of the world (SotW) protocol, as a state machine: what to answer to each request of the
proxy and what to push when its resources change. Pure: requests and responses are plain data (the server turns
them into protobuf), no gRPC, no clock.

Per resource type the stream keeps the names the proxy subscribes to, the version and nonce last sent, the version
the proxy last acknowledged and its last refusal (NACK). The rules (Envoy's xDS protocol, "state of the world"):
- a request whose response_nonce is not the nonce last sent for its type is stale (it answers an older response,
  or was sent before the proxy saw the newest): ignored; the proxy sends its current subscription again with its
  next ACK;
- a request carrying the last nonce ACKs (no error_detail) or NACKs (error_detail: Envoy's message) that response;
  a NACK is recorded once per version and the refused version is not sent again: the next response for the type
  goes out when its resources change (or the subscription does);
- a subscription change (other names for EDS, RDS, SDS and ECDS) is answered even when the version did not change;
- LDS and CDS are wildcard (every resource of the proxy); EDS, RDS, SDS and ECDS carry only the requested names;
- a new stream's first request for a wildcard type that already names the current version (the proxy got it from
  another controller: versions are content hashes) gets no response: nothing is resent on a failover;
- pushes go out in warming order: CDS, EDS, LDS, RDS, then SDS and ECDS; a type the proxy never asked for is not
  pushed. Clusters that leave are removed last (make before break): a first CDS response keeps them beside the
  new ones, the final one after the routes and listeners. Nonces count up per stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.render import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_CONFIG_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)
from mesh.xds.resources import SHORT_NAMES, ProxyResources, content_version
from mesh.xds.status import TypeStatus

PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE, EXTENSION_CONFIG_TYPE)
WILDCARD_TYPES = frozenset((LISTENER_TYPE, CLUSTER_TYPE))
EMPTY_VERSION = "empty"  # the version of a type the proxy has no resource of (sent as an empty response)


@dataclass(frozen=True)
class Request:
    """A DiscoveryRequest as the state machine needs it."""

    type_url: str
    version_info: str = ""
    response_nonce: str = ""
    resource_names: tuple[str, ...] = ()
    error_message: str | None = None  # error_detail.message of a NACK


@dataclass(frozen=True)
class Response:
    """A DiscoveryResponse to send: `resources` are serialized Anys, in name order."""

    type_url: str
    version_info: str
    nonce: str
    resources: tuple[bytes, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class Nack:
    """A refusal the proxy sent, recorded once per (type, version)."""

    type_url: str
    version: str
    message: str


@dataclass
class TypeState:
    names: frozenset[str] | None = None  # subscribed names (None: not known yet; wildcard types: empty)
    sent_version: str | None = None  # the version the proxy has or is being sent (None: nothing yet)
    sent_nonce: str | None = None  # the nonce of the last response on this stream (None: none sent)
    acked_version: str | None = None
    nack: Nack | None = None  # the last refusal, until a later version is ACKed
    responses: int = 0  # responses sent for this type on this stream
    sent_clusters: dict[str, tuple[bytes, str]] | None = None  # CDS only: what it last sent, name -> (Any, digest)


@dataclass
class StreamState:
    """One stream's SotW state for one node. `on_request` and `on_resources` return what to send, in order, and
    note refusals in `new_nacks` (the caller logs and clears them)."""

    node_id: str
    types: dict[str, TypeState] = field(default_factory=dict)
    nonce_counter: int = 0
    new_nacks: list[Nack] = field(default_factory=list)

    def on_request(self, request: Request, resources: ProxyResources) -> list[Response]:
        state = self.types.setdefault(request.type_url, TypeState())
        if state.sent_nonce is not None and request.response_nonce != state.sent_nonce:
            return []  # stale: the proxy has not seen our last response yet, or answers an older one
        wildcard = request.type_url in WILDCARD_TYPES
        names = frozenset() if wildcard else frozenset(request.resource_names)
        changed = state.names is not None and names != state.names
        state.names = names
        current = _version(resources, request.type_url)
        if state.sent_nonce is None:  # nothing sent for this type on this stream yet
            state.acked_version = request.version_info or None
            if wildcard and request.version_info == current:
                state.sent_version = current  # it has it already (from another controller): nothing to resend
                return []
            return [self._response(request.type_url, state, resources)]
        if request.error_message is None:
            state.acked_version = request.version_info or None
            if state.acked_version == state.sent_version:
                state.nack = None
        else:
            state.acked_version = request.version_info or None  # a NACK names the version the proxy keeps
            nack = Nack(request.type_url, state.sent_version or "", request.error_message)
            if state.nack is None or state.nack.version != nack.version:
                self.new_nacks.append(nack)
            state.nack = nack
        if changed or current != state.sent_version:
            return [self._response(request.type_url, state, resources)]
        return []

    def on_resources(self, resources: ProxyResources) -> list[Response]:
        """The responses for new resources, in warming order: a type whose version differs from the one last sent
        (a refused version is never sent again: it is the one last sent). Clusters that leave are removed last:
        first a CDS response that keeps them beside the new ones, then the rest, then the final CDS (a route
        still naming a leaving cluster never meets a proxy without it)."""
        keeping = self._clusters_kept(resources)
        responses = [] if keeping is None else [keeping]
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.names is None or (keeping is not None and type_url == CLUSTER_TYPE):
                continue
            if _version(resources, type_url) != state.sent_version:
                responses.append(self._response(type_url, state, resources))
        if keeping is not None:
            responses.append(self._response(CLUSTER_TYPE, self.types[CLUSTER_TYPE], resources))
        return responses

    def _clusters_kept(self, resources: ProxyResources) -> Response | None:
        """A CDS response with the new clusters and those leaving, when some leave; None otherwise."""
        state = self.types.get(CLUSTER_TYPE)
        if state is None or state.sent_clusters is None or _version(resources, CLUSTER_TYPE) == state.sent_version:
            return None
        named, digests = resources.by_type.get(CLUSTER_TYPE, {}), resources.digests.get(CLUSTER_TYPE, {})
        leaving = {name: sent for name, sent in state.sent_clusters.items() if name not in named}
        if not leaving:
            return None
        kept = {**leaving, **{name: (named[name], digests[name]) for name in named}}
        return self._sent(CLUSTER_TYPE, state, kept, content_version({name: item[1] for name, item in kept.items()}))

    def _response(self, type_url: str, state: TypeState, resources: ProxyResources) -> Response:
        named, digests = resources.by_type.get(type_url, {}), resources.digests.get(type_url, {})
        wanted = sorted(named) if type_url in WILDCARD_TYPES else sorted(set(named) & (state.names or frozenset()))
        return self._sent(type_url, state, {name: (named[name], digests[name]) for name in wanted},
                          _version(resources, type_url))

    def _sent(self, type_url: str, state: TypeState, items: dict[str, tuple[bytes, str]], version: str) -> Response:
        self.nonce_counter += 1
        state.sent_version, state.sent_nonce = version, str(self.nonce_counter)
        state.responses += 1
        if type_url == CLUSTER_TYPE:
            state.sent_clusters = items
        names = tuple(sorted(items))
        return Response(type_url, version, state.sent_nonce, tuple(items[name][0] for name in names), names)

    def status(self, resources: ProxyResources | None) -> tuple[TypeStatus, ...]:
        """Per type the proxy subscribed to, in push order: synced, nacked or stale."""
        shown = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.names is None:
                continue
            current = _version(resources, type_url) if resources is not None else state.sent_version
            if state.nack is not None and state.nack.version == current:
                verdict = "nacked"
            elif state.acked_version is not None and state.acked_version == current == state.sent_version:
                verdict = "synced"
            else:
                verdict = "stale"
            shown.append(TypeStatus(SHORT_NAMES[type_url], verdict, state.sent_version, state.acked_version,
                                    state.nack.message if state.nack is not None else None, state.responses))
        return tuple(shown)


def _version(resources: ProxyResources, type_url: str) -> str:
    return resources.versions.get(type_url, EMPTY_VERSION)

