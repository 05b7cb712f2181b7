"""TraceStore: the controller's bounded ring of recent traces: what a query finds, what is dropped or pushed out
when it is full, a span reported twice kept once, and many threads adding at once."""

from __future__ import annotations

import threading
from types import MappingProxyType

import pytest

from mesh.traces.model import REQUEST_ID_TAG, Span
from mesh.traces.store import TraceStore


def span(trace: int, span_id: int, start_us: int = 1_000, service: str = "web", kind: str = "SERVER",
         parent: int | None = None, request: str | None = None) -> Span:
    tags = {REQUEST_ID_TAG: request} if request else {}
    return Span(trace_id=f"{trace:032x}", span_id=f"{span_id:016x}", parent_id=f"{parent:016x}" if parent else None,
                name="n", kind=kind, start_us=start_us, duration_us=10, service=service,
                tags=MappingProxyType(tags))


def test_a_trace_s_spans_come_back_by_start_time_and_a_repeat_is_kept_once() -> None:
    store = TraceStore()
    server = span(1, 2, start_us=200, service="api", parent=1)
    client = span(1, 1, start_us=100, kind="CLIENT")
    assert store.add([server, client]) == 2
    assert store.add([server]) == 0  # reported again (a retry): kept once
    assert store.trace(f"{1:032x}") == (client, server)
    assert store.trace(f"{9:032x}") == ()
    counts = store.counts()
    assert (counts.traces, counts.spans, counts.received, counts.duplicates) == (1, 2, 3, 1)


def test_by_request_gives_every_span_of_every_trace_holding_the_request() -> None:
    store = TraceStore()
    first = [span(1, 1, 100, request="r-1"), span(1, 2, 150, service="api")]  # api's span has no request tag
    second = [span(2, 3, 300, request="r-1")]  # the same request id in a second trace (a retry from the app)
    store.add([*first, *second, span(3, 4, 400, request="r-2")])
    assert store.by_request("r-1") == (*first, *second)
    assert store.by_request("nope") == ()


def test_last_is_newest_first_and_the_service_filter_keeps_traces_with_a_span_of_it() -> None:
    store = TraceStore()
    store.add([span(1, 1, 100), span(2, 2, 300), span(2, 3, 310, service="api"), span(3, 4, 200)])
    assert [spans[0].trace_id[-1] for spans in store.last(10)] == ["2", "3", "1"]
    assert [spans[0].trace_id[-1] for spans in store.last(2)] == ["2", "3"]
    assert [len(spans) for spans in store.last(10, service="api")] == [2]
    assert store.last(10, service="db") == [] and store.last(0) == []


def test_the_oldest_trace_goes_first_when_the_ring_is_full_and_its_request_index_with_it() -> None:
    store = TraceStore(max_traces=3)
    for trace in range(1, 6):
        store.add([span(trace, trace, start_us=trace, request=f"r-{trace}")])
    held = {spans[0].trace_id[-1] for spans in store.last(10)}
    assert held == {"3", "4", "5"}
    assert store.by_request("r-1") == () and store.trace(f"{1:032x}") == ()
    assert store.counts().evicted == 2


def test_a_full_trace_drops_further_spans() -> None:
    store = TraceStore(max_spans_per_trace=2)
    assert store.add([span(1, 1), span(1, 2), span(1, 3)]) == 2
    assert len(store.trace(f"{1:032x}")) == 2 and store.counts().dropped == 1


def test_the_total_span_bound_pushes_out_old_traces_but_never_the_trace_being_added() -> None:
    store = TraceStore(max_traces=100, max_spans_per_trace=10, max_spans=5)
    store.add([span(1, i) for i in range(1, 4)])
    store.add([span(2, i) for i in range(11, 14)])  # 6 spans: trace 1 goes
    assert store.trace(f"{1:032x}") == () and len(store.trace(f"{2:032x}")) == 3
    store.add([span(2, i) for i in range(14, 18)])  # trace 2 alone may pass max_spans (max_spans_per_trace bounds it)
    assert len(store.trace(f"{2:032x}")) == 7 and store.counts().traces == 1


def test_a_store_holds_at_least_one_span() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TraceStore(max_traces=0)


def test_threads_adding_at_once_lose_nothing_and_break_no_bound() -> None:
    store = TraceStore(max_traces=50)

    def feed(worker: int) -> None:
        for trace in range(100):
            store.add([span(worker * 1000 + trace, n, request=f"r-{worker}-{trace}") for n in range(1, 4)])

    threads = [threading.Thread(target=feed, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = store.counts()
    assert (counts.received, counts.traces, counts.spans, counts.evicted) == (2400, 50, 150, 750)
    assert all(len(store.by_request(spans[0].request_id or "")) == 3 for spans in store.last(50))
