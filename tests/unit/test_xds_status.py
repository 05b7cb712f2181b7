"""What controllers publish of their ADS streams and the merge (mesh.xds.status): per node the stream connected
last wins, a publication older than 30 s is ignored, anything malformed is skipped."""

from __future__ import annotations

import json

from mesh.xds.status import (
    PUBLICATION_MAX_AGE_S,
    StreamStatus,
    TypeStatus,
    merged,
    parse_publication,
    publication,
)

NOW = 1_765_080_000.0


def stream(node: str, since: float, *states: str) -> StreamStatus:
    kinds = ("CDS", "EDS", "LDS", "RDS", "SDS")
    return StreamStatus(node, "ipv4:10.0.0.2:4000", since,
                        tuple(TypeStatus(kind, state, "v2", "v2" if state == "synced" else "v1",
                                         "refused" if state == "nacked" else None, 1)
                              for kind, state in zip(kinds, states, strict=False)))


def test_a_publication_round_trips_through_json() -> None:
    published = publication("ctl1", {"api-vm2-1": stream("api-vm2-1", NOW - 5, "synced", "nacked")}, NOW)
    [(node, shown)] = merged([parse_publication(json.dumps(published))], NOW).items()
    assert node == "api-vm2-1" and shown.controller == "ctl1" and shown.state == "nacked"
    assert [(item.type, item.state, item.error) for item in shown.types] == [("CDS", "synced", None),
                                                                            ("EDS", "nacked", "refused")]


def test_the_stream_connected_last_wins_and_an_old_publication_is_ignored() -> None:
    one = publication("ctl1", {"a": stream("a", NOW - 100, "stale"), "b": stream("b", NOW - 50, "synced")}, NOW - 1)
    two = publication("ctl2", {"a": stream("a", NOW - 10, "synced")}, NOW - 2)
    gone = publication("ctl3", {"a": stream("a", NOW - 5, "nacked"), "c": stream("c", NOW - 5, "synced")},
                       NOW - PUBLICATION_MAX_AGE_S - 1)
    shown = merged([one, two, gone], NOW)
    assert {node: (item.controller, item.state) for node, item in shown.items()} == {
        "a": ("ctl2", "synced"), "b": ("ctl1", "synced")}


def test_malformed_publications_and_streams_are_skipped() -> None:
    good = publication("ctl1", {"a": stream("a", NOW - 1, "synced")}, NOW)
    bad_stream = {"controller": "ctl2", "published_at": NOW,
                  "streams": {"b": {"connected_since": "yesterday", "types": []}, "c": "x",
                              "d": {"connected_since": NOW, "types": [{"type": "LDS", "state": "weird"}, 7]}}}
    shown = merged([parse_publication(b"{not json"), None, [1], {"controller": 1}, good, bad_stream,
                    {"controller": "x", "published_at": float("nan"), "streams": {}}, True], NOW)
    assert set(shown) == {"a", "d"}
    assert shown["d"].types == () and shown["d"].state == "stale"  # no type known yet
