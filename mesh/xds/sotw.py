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
- pushes go out in warming order: CDS, EDS, then LDS and RDS once the clusters are ready (CDS and EDS ACKed, EDS
  subscribed to every cluster with endpoints: a route to a cluster still warming fails its requests), SDS and ECDS
  at once (clusters and listeners wait for them); a type the proxy never asked for is not pushed. Clusters that
  leave are removed last (make before break): a first CDS response keeps them beside the new ones, the final one
  goes once the listeners and routes are ACKed. Nonces count up per stream.
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
    in_flight: bool = False  # the last response not answered (ACK or NACK) yet
    acked_version: str | None = None
    nack: Nack | None = None  # the last refusal, until a later version is ACKed
    responses: int = 0  # responses sent for this type on this stream
    sent_clusters: dict[str, tuple[bytes, str]] | None = None  # CDS only: what it last sent, name -> (Any, digest)


@dataclass
class StreamState:
    """One stream's SotW state for one node. `on_request` and `on_resources` return what to send, in order, and
    note refusals in `new_nacks` (the caller logs and clears them). While `holding`, listener and route changes
    wait for the clusters (the caller calls `release` when they wait too long: HOLD_MAX_S)."""

    node_id: str
    types: dict[str, TypeState] = field(default_factory=dict)
    nonce_counter: int = 0
    new_nacks: list[Nack] = field(default_factory=list)
    holding: bool = False

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
                return self._due(resources)
            if request.type_url in (LISTENER_TYPE, ROUTE_TYPE) and request.version_info \
                    and not self._clusters_ready(resources):
                # a proxy that runs an older config (a reconnect): the new listeners and routes wait for the clusters
                state.sent_version = request.version_info if request.version_info != current else None
                return self._due(resources)
            return [self._response(request.type_url, state, resources), *self._due(resources)]
        state.in_flight = False
        state.acked_version = request.version_info or None  # a NACK names the version the proxy keeps
        if request.error_message is None:
            if state.acked_version == state.sent_version:
                state.nack = None
        else:
            nack = Nack(request.type_url, state.sent_version or "", request.error_message)
            if state.nack is None or state.nack.version != nack.version:
                self.new_nacks.append(nack)
            state.nack = nack
        answer = [self._response(request.type_url, state, resources)] if changed else []
        return answer + self._due(resources)

    def on_resources(self, resources: ProxyResources) -> list[Response]:
        """The responses new resources call for now (the rest follows as the proxy answers)."""
        return self._due(resources)

    def release(self, resources: ProxyResources) -> list[Response]:
        """The listener and route changes held for the clusters, sent now (they waited too long)."""
        return self._due(resources, force=True)

    def _due(self, resources: ProxyResources, force: bool = False) -> list[Response]:
        """What to send now, in warming order. A type whose version differs from the one last sent (a refused
        version is never sent again: it is the one last sent) goes out, but:
        - listeners and routes wait until the clusters are ready: CDS and EDS answered, and EDS subscribed to every
          cluster that has endpoints (a route to a cluster still warming fails);
        - clusters that leave are removed last: a first CDS response keeps them beside the new ones, the final one
          goes once the listeners and routes that named them are ACKed."""
        responses: list[Response] = []
        cds = self._subscribed(CLUSTER_TYPE)
        if cds is not None and _version(resources, CLUSTER_TYPE) != cds.sent_version:
            keeping = self._clusters_kept(resources, cds)
            if keeping is None:
                responses.append(self._response(CLUSTER_TYPE, cds, resources))
            elif keeping[1] != cds.sent_version:
                responses.append(self._sent(CLUSTER_TYPE, cds, *keeping))
        eds = self._subscribed(ENDPOINT_TYPE)
        if eds is not None and _version(resources, ENDPOINT_TYPE) != eds.sent_version:
            responses.append(self._response(ENDPOINT_TYPE, eds, resources))
        ready = force or self._clusters_ready(resources)
        for type_url in (LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE, EXTENSION_CONFIG_TYPE):
            state = self._subscribed(type_url)
            if state is None or _version(resources, type_url) == state.sent_version:
                continue
            if type_url in (LISTENER_TYPE, ROUTE_TYPE) and not ready:
                continue
            responses.append(self._response(type_url, state, resources))
        self.holding = any(
            (state := self._subscribed(type_url)) is not None and _version(resources, type_url) != state.sent_version
            for type_url in (LISTENER_TYPE, ROUTE_TYPE))
        if cds is not None and cds.sent_version != _version(resources, CLUSTER_TYPE) \
                and self._routes_applied(resources):
            responses.append(self._response(CLUSTER_TYPE, cds, resources))  # the leaving clusters go
        return responses

    def _subscribed(self, type_url: str) -> TypeState | None:
        state = self.types.get(type_url)
        return None if state is None or state.names is None else state

    def _clusters_ready(self, resources: ProxyResources) -> bool:
        cds, eds = self._subscribed(CLUSTER_TYPE), self._subscribed(ENDPOINT_TYPE)
        if cds is None:
            return True
        if cds.in_flight or (cds.nack is not None and cds.nack.version == cds.sent_version):
            return False
        clusters = set(cds.sent_clusters or ())
        needed = clusters & set(resources.by_type.get(ENDPOINT_TYPE, {}))
        if not needed:
            return True
        return eds is not None and not eds.in_flight and needed <= (eds.names or frozenset()) \
            and eds.sent_version == _version(resources, ENDPOINT_TYPE)

    def _routes_applied(self, resources: ProxyResources) -> bool:
        for type_url in (LISTENER_TYPE, ROUTE_TYPE):
            state = self._subscribed(type_url)
            if state is not None and (state.in_flight or state.acked_version != _version(resources, type_url)):
                return False
        return True

    def _clusters_kept(self, resources: ProxyResources, state: TypeState) -> tuple[dict[str, tuple[bytes, str]],
                                                                                   str] | None:
        """The new clusters and those leaving with their version, when some leave; None otherwise."""
        if state.sent_clusters is None:
            return None
        named, digests = resources.by_type.get(CLUSTER_TYPE, {}), resources.digests.get(CLUSTER_TYPE, {})
        leaving = {name: sent for name, sent in state.sent_clusters.items() if name not in named}
        if not leaving:
            return None
        kept = {**leaving, **{name: (named[name], digests[name]) for name in named}}
        return kept, content_version({name: item[1] for name, item in kept.items()})

    def _response(self, type_url: str, state: TypeState, resources: ProxyResources) -> Response:
        named, digests = resources.by_type.get(type_url, {}), resources.digests.get(type_url, {})
        wanted = sorted(named) if type_url in WILDCARD_TYPES else sorted(set(named) & (state.names or frozenset()))
        return self._sent(type_url, state, {name: (named[name], digests[name]) for name in wanted},
                          _version(resources, type_url))

    def _sent(self, type_url: str, state: TypeState, items: dict[str, tuple[bytes, str]], version: str) -> Response:
        self.nonce_counter += 1
        state.sent_version, state.sent_nonce, state.in_flight = version, str(self.nonce_counter), True
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

