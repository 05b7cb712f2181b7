"""XdsFeed.acked: an xds proxy runs its snapshot once its stream, on any controller, acknowledged every type at the
versions this controller serves it (what `mesh route set` and `mesh authz deny` wait for under xds)."""

from __future__ import annotations

from types import MappingProxyType

from mesh.controller.xds_feed import XdsFeed
from mesh.render import CLUSTER_TYPE, ENDPOINT_TYPE
from mesh.xds.resources import ProxyResources
from mesh.xds.status import StreamStatus, TypeStatus


def feed_serving(versions: dict[str, str], snapshot_version: str) -> XdsFeed:
    feed = XdsFeed(lambda spec: None, "/nonexistent")
    feed.served["web-vm1-8080"] = ProxyResources("web-vm1-8080", MappingProxyType({}), MappingProxyType(versions),
                                                 MappingProxyType({}))
    feed.served_of["web-vm1-8080"] = (snapshot_version, "bundle")
    return feed


def stream(**acked: str) -> dict[str, StreamStatus]:
    types = tuple(TypeStatus(name, "synced", version, version, None) for name, version in acked.items())
    return {"web-vm1-8080": StreamStatus("web-vm1-8080", "10.77.0.11:40000", 0.0, types, "ctl2:99")}


def test_acked_only_when_every_type_is_at_the_served_version_of_this_snapshot() -> None:
    feed = feed_serving({CLUSTER_TYPE: "c1", ENDPOINT_TYPE: "e2"}, "snap-2")
    assert feed.acked("web-vm1-8080", "snap-2", stream(CDS="c1", EDS="e2"))
    assert not feed.acked("web-vm1-8080", "snap-2", stream(CDS="c1", EDS="e1")), "EDS still at the old version"
    assert not feed.acked("web-vm1-8080", "snap-2", stream(CDS="c1")), "EDS not acknowledged at all"
    assert not feed.acked("web-vm1-8080", "snap-3", stream(CDS="c1", EDS="e2")), "served for another snapshot"
    assert not feed.acked("web-vm1-8080", "snap-2", {}), "no stream anywhere"
    assert not feed.acked("api-vm2-9090", "snap-2", stream(CDS="c1", EDS="e2")), "not served"
