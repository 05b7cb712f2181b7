"""One ADS stream's state of the world (mesh.xds.sotw) with fake requests: wildcard and named types, ACK, NACK
recorded once and never resent, stale nonces, subscription changes, warming order, failover with no resend."""

from __future__ import annotations

import hashlib

from mesh.render import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    EXTENSION_CONFIG_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)
from mesh.xds.resources import SHORT_NAMES, ProxyResources, assembled
from mesh.xds.sotw import EMPTY_VERSION, Request, Response, StreamState

NODE = "web-vm1-8080"


def resources(**named: dict[str, bytes]) -> ProxyResources:
    """lds=..., cds=..., eds=..., rds=..., sds=..., ecds=...: name -> stand-in bytes of an Any."""
    urls = {"lds": LISTENER_TYPE, "cds": CLUSTER_TYPE, "eds": ENDPOINT_TYPE, "rds": ROUTE_TYPE, "sds": SECRET_TYPE,
            "ecds": EXTENSION_CONFIG_TYPE}
    return assembled(NODE, [(urls[kind], name, data, hashlib.sha256(data).hexdigest())
                            for kind, items in named.items() for name, data in items.items()])


BASE = resources(lds={"inbound": b"L1", "outbound": b"L2"}, cds={"api": b"C1", "local": b"C2"},
                 eds={"api": b"E1", "local": b"E2"}, rds={"inbound": b"R1", "outbound": b"R2"},
                 sds={"mesh-ca": b"S1"})


def test_wildcard_types_get_every_resource_and_an_ack_is_answered_by_nothing() -> None:
    stream = StreamState(NODE)
    [lds] = stream.on_request(Request(LISTENER_TYPE), BASE)
    assert (lds.type_url, lds.version_info, lds.nonce, lds.names) == (LISTENER_TYPE, BASE.versions[LISTENER_TYPE],
                                                                       "1", ("inbound", "outbound"))
    assert lds.resources == (b"L1", b"L2")
    [cds] = stream.on_request(Request(CLUSTER_TYPE, resource_names=("api",)), BASE)  # names mean nothing here
    assert cds.names == ("api", "local") and cds.nonce == "2"  # nonces count per stream, over every type
    assert [item.state for item in stream.status(BASE)] == ["stale", "stale"]
    assert stream.on_request(Request(LISTENER_TYPE, lds.version_info, lds.nonce), BASE) == []
    assert stream.on_request(Request(CLUSTER_TYPE, cds.version_info, cds.nonce), BASE) == []
    assert [(item.type, item.state, item.sent, item.acked) for item in stream.status(BASE)] == [
        ("CDS", "synced", cds.version_info, cds.version_info), ("LDS", "synced", lds.version_info, lds.version_info)]


def test_named_types_get_only_the_requested_names_and_a_subscription_change_is_answered() -> None:
    stream = StreamState(NODE)
    [first] = stream.on_request(Request(ENDPOINT_TYPE, resource_names=("api", "gone")), BASE)
    assert first.names == ("api",) and first.resources == (b"E1",)  # an unknown name is left out
    # the ACK names one more cluster: answered although the version is the same
    [second] = stream.on_request(Request(ENDPOINT_TYPE, first.version_info, first.nonce, ("api", "local")), BASE)
    assert second.version_info == first.version_info and second.names == ("api", "local")
    assert second.nonce != first.nonce
    # the same names again: nothing
    assert stream.on_request(Request(ENDPOINT_TYPE, second.version_info, second.nonce, ("local", "api")), BASE) == []


def test_a_stale_nonce_is_ignored() -> None:
    stream = StreamState(NODE)
    [first] = stream.on_request(Request(ROUTE_TYPE, resource_names=("inbound",)), BASE)
    changed = resources(rds={"inbound": b"R1-new", "outbound": b"R2"})
    [second] = stream.on_resources(changed)
    # the ACK of the first response (and a request before the proxy saw any), with other names: ignored
    assert stream.on_request(Request(ROUTE_TYPE, first.version_info, first.nonce, ("outbound",)), changed) == []
    assert stream.on_request(Request(ROUTE_TYPE, "", "", ("outbound",)), changed) == []
    [status] = stream.status(changed)
    assert status.acked is None and status.state == "stale"
    assert stream.on_request(Request(ROUTE_TYPE, second.version_info, second.nonce, ("inbound",)), changed) == []
    [status] = stream.status(changed)
    assert status.state == "synced"


def test_a_nack_is_recorded_once_and_the_refused_version_is_never_resent() -> None:
    stream = StreamState(NODE)
    [good] = stream.on_request(Request(LISTENER_TYPE), BASE)
    stream.on_request(Request(LISTENER_TYPE, good.version_info, good.nonce), BASE)
    bad = resources(lds={"inbound": b"L1", "outbound": b"L2", "broken": b"LX"})
    [pushed] = stream.on_resources(bad)
    message = "Error adding/updating listener(s) broken: malformed IP address: not-an-ip"
    assert stream.on_request(Request(LISTENER_TYPE, good.version_info, pushed.nonce, error_message=message),
                             bad) == []
    assert [(nack.version, nack.message) for nack in stream.new_nacks] == [(pushed.version_info, message)]
    stream.new_nacks.clear()
    [status] = stream.status(bad)
    assert (status.state, status.sent, status.acked, status.error, status.responses) == (
        "nacked", pushed.version_info, good.version_info, message, 2)
    assert stream.on_resources(bad) == []  # the same resources again: nothing resent
    assert stream.on_request(Request(LISTENER_TYPE, good.version_info, pushed.nonce, error_message=message),
                             bad) == []
    assert stream.new_nacks == []  # the same refusal is not noted twice
    # new resources go out; once ACKed the error is gone
    fixed = resources(lds={"inbound": b"L1", "outbound": b"L2-new"})
    [again] = stream.on_resources(fixed)
    stream.on_request(Request(LISTENER_TYPE, again.version_info, again.nonce), fixed)
    [status] = stream.status(fixed)
    assert (status.state, status.error, status.responses) == ("synced", None, 3)


def ack(stream: StreamState, response: Response, current: ProxyResources, names: tuple[str, ...] = ()) -> list[Response]:
    """The proxy's ACK of `response` (for a named type: its subscription, unchanged unless `names` are given)."""
    return stream.on_request(Request(response.type_url, response.version_info, response.nonce,
                                     names or tuple(sorted(stream.types[response.type_url].names or ()))), current)


def synced(current: ProxyResources) -> StreamState:
    """A stream on which the proxy subscribed to every type (EDS to every cluster) and ACKed every response."""
    stream = StreamState(NODE)
    for request in (Request(CLUSTER_TYPE), Request(ENDPOINT_TYPE, resource_names=("api", "local")),
                    Request(LISTENER_TYPE), Request(ROUTE_TYPE, resource_names=("inbound", "outbound")),
                    Request(SECRET_TYPE, resource_names=("mesh-ca",))):
        for response in stream.on_request(request, current):
            assert ack(stream, response, current, request.resource_names) == []
    assert {item.state for item in stream.status(current)} == {"synced"} and not stream.holding
    return stream


def kinds(responses: list[Response]) -> list[str]:
    return [SHORT_NAMES[item.type_url] for item in responses]


def test_listeners_and_routes_wait_for_the_clusters_and_their_endpoints() -> None:
    stream = synced(BASE)
    changed = resources(lds={"inbound": b"L1+"}, cds={"api": b"C1+", "local": b"C2"},
                        eds={"api": b"E1+", "local": b"E2"}, rds={"inbound": b"R1+", "outbound": b"R2"},
                        sds={"mesh-ca": b"S1+"}, ecds={"mesh.authz.deny": b"X"})  # ECDS never asked for
    cds, eds, sds = stream.on_resources(changed)
    assert kinds([cds, eds, sds]) == ["CDS", "EDS", "SDS"] and stream.holding
    assert stream.on_resources(changed) == []  # nothing twice
    assert ack(stream, cds, changed) == []  # the endpoints are still on their way
    lds, rds = ack(stream, eds, changed)
    assert kinds([lds, rds]) == ["LDS", "RDS"] and not stream.holding
    assert [int(item.nonce) for item in (cds, eds, sds, lds, rds)] == sorted(
        int(item.nonce) for item in (cds, eds, sds, lds, rds))
    for response in (sds, lds, rds):
        assert ack(stream, response, changed) == []
    assert {item.state for item in stream.status(changed)} == {"synced"}


def test_a_new_cluster_holds_the_routes_until_the_proxy_has_its_endpoints() -> None:
    stream = synced(BASE)
    added = resources(lds=dict(BASE.by_type[LISTENER_TYPE]), cds={**BASE.by_type[CLUSTER_TYPE], "db": b"C3"},
                      eds={**BASE.by_type[ENDPOINT_TYPE], "db": b"E3"}, rds={"inbound": b"R1", "outbound": b"R2-db"},
                      sds=dict(BASE.by_type[SECRET_TYPE]))
    cds, eds = stream.on_resources(added)
    assert eds.names == ("api", "local")  # not subscribed to db yet
    assert ack(stream, cds, added) == []
    [eds_db] = ack(stream, eds, added, ("api", "db", "local"))  # the subscription change is answered
    assert eds_db.names == ("api", "db", "local") and eds_db.version_info == eds.version_info
    [rds] = ack(stream, eds_db, added)
    assert rds.type_url == ROUTE_TYPE and rds.resources == (b"R1", b"R2-db")


def test_a_refused_cluster_update_holds_the_routes_until_released() -> None:
    stream = synced(BASE)
    changed = resources(lds=dict(BASE.by_type[LISTENER_TYPE]), cds={"api": b"C1-bad", "local": b"C2"},
                        eds=dict(BASE.by_type[ENDPOINT_TYPE]), rds={"inbound": b"R1", "outbound": b"R2+"},
                        sds=dict(BASE.by_type[SECRET_TYPE]))
    [cds] = stream.on_resources(changed)
    assert stream.on_request(Request(CLUSTER_TYPE, BASE.versions[CLUSTER_TYPE], cds.nonce,
                                     error_message="bad cluster"), changed) == []
    assert stream.holding
    [rds] = stream.release(changed)
    assert rds.type_url == ROUTE_TYPE and not stream.holding


def test_clusters_that_leave_are_removed_after_the_routes_that_named_them() -> None:
    stream = synced(BASE)
    # api-v2 comes, api leaves: the route moves to api-v2
    moved = resources(cds={"api-v2": b"C3", "local": b"C2"}, eds={"api-v2": b"E3", "local": b"E2"},
                      rds={"inbound": b"R1", "outbound": b"R2-to-v2"}, lds=dict(BASE.by_type[LISTENER_TYPE]),
                      sds=dict(BASE.by_type[SECRET_TYPE]))
    keeping, eds = stream.on_resources(moved)
    assert (keeping.type_url, keeping.names, keeping.resources) == (CLUSTER_TYPE, ("api", "api-v2", "local"),
                                                                    (b"C1", b"C3", b"C2"))
    assert keeping.version_info not in (moved.versions[CLUSTER_TYPE], BASE.versions[CLUSTER_TYPE])
    assert ack(stream, keeping, moved) == []
    [eds_v2] = ack(stream, eds, moved, ("api", "api-v2", "local"))
    [rds] = ack(stream, eds_v2, moved)
    assert (rds.type_url, rds.resources) == (ROUTE_TYPE, (b"R1", b"R2-to-v2"))
    [final] = ack(stream, rds, moved)  # the routes no longer name api: it goes
    assert (final.type_url, final.names, final.version_info) == (CLUSTER_TYPE, ("api-v2", "local"),
                                                                 moved.versions[CLUSTER_TYPE])
    assert ack(stream, final, moved) == []
    assert {item.state for item in stream.status(moved)} == {"synced"}
    assert stream.on_resources(moved) == []


def test_a_type_with_no_resource_is_answered_empty() -> None:
    stream = StreamState(NODE)
    [response] = stream.on_request(Request(EXTENSION_CONFIG_TYPE, resource_names=("mesh.authz.deny",)), BASE)
    assert (response.version_info, response.resources) == (EMPTY_VERSION, ())


def test_a_proxy_that_already_runs_the_version_gets_no_wildcard_resend_after_a_failover() -> None:
    stream = StreamState(NODE)  # another controller's stream: the proxy names the versions it runs
    assert stream.on_request(Request(LISTENER_TYPE, BASE.versions[LISTENER_TYPE]), BASE) == []
    assert stream.on_request(Request(CLUSTER_TYPE, BASE.versions[CLUSTER_TYPE]), BASE) == []
    assert {item.type: item.state for item in stream.status(BASE)} == {"CDS": "synced", "LDS": "synced"}
    # a named type is answered (a name may have been added just before the failover)
    [eds] = stream.on_request(Request(ENDPOINT_TYPE, BASE.versions[ENDPOINT_TYPE], "", ("api",)), BASE)
    assert eds.names == ("api",)
    # an older version than ours: sent
    other = StreamState(NODE)
    [lds] = other.on_request(Request(LISTENER_TYPE, "0" * 64), BASE)
    assert lds.version_info == BASE.versions[LISTENER_TYPE]
    # and after the skip, a change goes out as usual
    changed = resources(lds={"inbound": b"L1+"}, cds=dict(BASE.by_type[CLUSTER_TYPE]),
                        eds=dict(BASE.by_type[ENDPOINT_TYPE]))
    [pushed] = stream.on_resources(changed)
    assert pushed.type_url == LISTENER_TYPE and pushed.nonce == "2"


def test_a_reconnecting_proxy_gets_its_new_listeners_after_its_new_clusters() -> None:
    stream = StreamState(NODE)  # the proxy runs an older config (the controllers were down while it changed)
    [cds] = stream.on_request(Request(CLUSTER_TYPE, "old-clusters"), BASE)
    [eds] = stream.on_request(Request(ENDPOINT_TYPE, "old-endpoints", "", ("api", "local")), BASE)
    assert stream.on_request(Request(LISTENER_TYPE, "old-listeners"), BASE) == []
    assert stream.on_request(Request(ROUTE_TYPE, "old-routes", "", ("inbound", "outbound")), BASE) == []
    assert stream.holding and ack(stream, cds, BASE) == []
    lds, rds = ack(stream, eds, BASE)
    assert kinds([lds, rds]) == ["LDS", "RDS"] and rds.names == ("inbound", "outbound")
    # a cold start (no version yet) is answered at once: Envoy's own start waits for the clusters
    cold = StreamState(NODE)
    cold.on_request(Request(CLUSTER_TYPE), BASE)
    assert kinds(cold.on_request(Request(LISTENER_TYPE), BASE)) == ["LDS"]


def test_versions_are_content_hashes() -> None:
    again = resources(lds={"outbound": b"L2", "inbound": b"L1"}, cds={"local": b"C2", "api": b"C1"},
                      eds={"api": b"E1", "local": b"E2"}, rds={"inbound": b"R1", "outbound": b"R2"},
                      sds={"mesh-ca": b"S1"})
    assert again.versions == BASE.versions
    renamed = resources(lds={"inbound": b"L1", "other": b"L2"})
    assert renamed.versions[LISTENER_TYPE] != BASE.versions[LISTENER_TYPE]
