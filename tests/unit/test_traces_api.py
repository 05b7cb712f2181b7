"""The traces API's answers (`GET /api/traces` on the controller's loopback): by trace id, by request id, the last
N (of a service), and a 400 naming the problem for any other query."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from mesh.traces.api import MAX_LAST, traces_api
from mesh.traces.model import REQUEST_ID_TAG, Span
from mesh.traces.store import TraceStore

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(trace_id: str, span_id: str, start_us: int, service: str, request: str | None = None,
         parent: str | None = None) -> Span:
    return Span(trace_id, span_id, parent, "n", "SERVER", start_us, 5, service,
                MappingProxyType({REQUEST_ID_TAG: request} if request else {}))


@pytest.fixture
def store() -> TraceStore:
    store = TraceStore()
    store.add([span(TRACE, "b7ad6b7169203331", 100, "web", request="req-1"),
               span(TRACE, "00f067aa0ba902b7", 120, "api", parent="b7ad6b7169203331"),
               span("0" * 16 + "abcdef0123456789", "1111111111111111", 300, "web", request="req-2")])
    return store


def test_a_trace_by_its_id_in_any_case(store: TraceStore) -> None:
    status, body = traces_api(store, {"trace_id": TRACE.upper()})
    assert status == 200
    [[first, second]] = body["traces"]
    assert (first["service"], second["service"], second["parent_id"]) == ("web", "api", "b7ad6b7169203331")
    assert Span.from_json(json.loads(json.dumps(first))) == store.trace(TRACE)[0]


def test_a_64_bit_trace_id_finds_its_widened_trace(store: TraceStore) -> None:
    assert len(traces_api(store, {"trace_id": "abcdef0123456789"})[1]["traces"]) == 1


def test_an_unknown_trace_or_request_is_an_empty_list(store: TraceStore) -> None:
    assert traces_api(store, {"trace_id": "f" * 32}) == (200, {"traces": []})
    assert traces_api(store, {"request_id": "nope"}) == (200, {"traces": []})


def test_a_request_id_gives_its_whole_trace(store: TraceStore) -> None:
    status, body = traces_api(store, {"request_id": "req-1"})
    assert status == 200 and [[item["service"] for item in spans] for spans in body["traces"]] == [["web", "api"]]


def test_last_n_newest_first_and_of_a_service(store: TraceStore) -> None:
    assert [spans[0]["start_us"] for spans in traces_api(store, {"last": "5"})[1]["traces"]] == [300, 100]
    assert [len(spans) for spans in traces_api(store, {"last": "5", "service": "api"})[1]["traces"]] == [2]


@pytest.mark.parametrize(("query", "message"), [
    ({}, "exactly one of"),
    ({"trace_id": TRACE, "last": "1"}, "exactly one of"),
    ({"last": "0"}, f"from 1 to {MAX_LAST}"),
    ({"last": str(MAX_LAST + 1)}, f"from 1 to {MAX_LAST}"),
    ({"last": "-1"}, "last: expected a number"),
    ({"last": "²"}, "last: expected a number"),
    ({"trace_id": "xyz"}, "trace_id: expected 32"),
    ({"trace_id": TRACE + "0"}, "trace_id: expected 32"),
    ({"request_id": ""}, "request_id: empty"),
    ({"request_id": "r" * 300}, "longer than"),
    ({"trace_id": TRACE, "service": "api"}, "service goes with last"),
    ({"last": "3", "service": ""}, "service goes with last"),
    ({"last": "3", "limit": "2"}, "unknown parameter 'limit'"),
])
def test_a_bad_query_is_a_400_naming_the_problem(store: TraceStore, query: dict[str, str], message: str) -> None:
    status, body = traces_api(store, query)
    assert status == 400 and message in body["error"] and set(body) == {"error"}
