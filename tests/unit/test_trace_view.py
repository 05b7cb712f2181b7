"""`mesh trace`'s view (mesh.traces.view): spans into trees with self time and offsets, access lines into hops
with the right parents, and the text view as goldens (tests/golden/traces/; `pytest --update-goldens` rewrites
them for a reviewer to read the diff)."""

from __future__ import annotations

import time
from pathlib import Path

from trace_samples import CONTAINERS, OTHER_TRACE, REQUEST, TRACE, span, web_api_db_lines, web_api_pricing

from mesh.telemetry.accesslog import parse_access_lines
from mesh.traces.model import Span
from mesh.traces.view import (
    build_trace,
    group_traces,
    header,
    hop_trace,
    hops_from_lines,
    render_json,
    render_text,
    self_time,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "traces"
PLACES = {"web-vm1-8080": ("vm1", None), "api-vm2-9090": ("vm2", None)}


def check_golden(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


def ids(spans: tuple[Span, ...] | list[Span]) -> list[str]:
    return [item.span_id.lstrip("0") for item in spans]


# ---- trees -------------------------------------------------------------------------------------------------

def test_a_trace_is_its_tree_depth_first_with_children_by_start_time() -> None:
    trace = build_trace(list(reversed(web_api_pricing())), "collector", TRACE)
    assert ids(trace.spans) == ["a1", "b1", "b2", "c1", "b3", "b4", "d1"]
    assert [row.depth for row in trace.rows] == [0, 1, 2, 3, 2, 2, 3]
    by_id = {row.span.span_id.lstrip("0"): row for row in trace.rows}
    assert [child.lstrip("0") for child in by_id["b1"].children] == ["b2", "b3", "b4"]
    assert by_id["a1"].parent_id is None and by_id["c1"].parent_id == "00000000000000b2"
    assert trace.duration_us == 24_600 and trace.request_ids == (REQUEST,)


def test_self_time_is_what_no_child_covers_overlaps_counted_once() -> None:
    trace = build_trace(web_api_pricing(), "collector", TRACE)
    self_ms = {row.span.span_id.lstrip("0"): row.self_us / 1000 for row in trace.rows}
    # api's inbound 0.4..24.3 ms; its calls 1.2..7.3, 8.0..22.0 and 9.0..12.0 (inside the second): 20.1 ms covered
    assert self_ms["b1"] == 3.8
    assert self_ms["a1"] == 0.7 and self_ms["c1"] == 5.5


def test_a_child_running_past_its_parent_on_another_hosts_clock_is_clipped() -> None:
    parent = span("1", None, "web", "outbound", "vm1", 0, 10)
    late = span("2", "1", "api", "inbound", "vm2", 4, 9)  # ends at 13 ms by vm2's clock
    assert self_time(parent, [late]) == 4_000
    assert self_time(parent, [span("3", "1", "api", "inbound", "vm2", 20, 5)]) == 10_000


def test_a_span_whose_parent_is_elsewhere_is_a_root_and_a_parent_cycle_still_shows_every_span_once() -> None:
    orphan = span("5", "99", "api", "inbound", "vm2", 3, 1)  # its parent reached a controller that did not answer
    cycle = [span("6", "7", "x", "inbound", "vm2", 5, 1), span("7", "6", "y", "inbound", "vm2", 6, 1)]
    own = span("8", "8", "z", "inbound", "vm2", 7, 1)
    trace = build_trace([span("1", None, "web", "outbound", "vm1", 0, 10), orphan, *cycle, own], "collector", TRACE)
    assert sorted(ids(trace.spans)) == ["1", "5", "6", "7", "8"]
    assert [row.depth for row in trace.rows if row.span.span_id.endswith(("1", "5", "8"))] == [0, 0, 0]


def test_a_chain_of_a_thousand_spans_needs_no_recursion() -> None:
    chain = [span(f"{index + 1:x}", f"{index:x}" if index else None, "s", "inbound", "h", index, 2000 - index)
             for index in range(1000)]
    trace = build_trace(chain, "collector", TRACE)
    assert len(trace.rows) == 1000 and trace.rows[-1].depth == 999
    assert render_text([trace]).count("\n") == 1002


def test_spans_from_several_controllers_are_grouped_by_trace_each_span_once_newest_trace_first() -> None:
    older = web_api_pricing()
    newer = [span("e1", None, "web", "outbound", "vm1", 100, 5, trace_id=OTHER_TRACE, request_id="r2")]
    traces = group_traces(older[:4] + newer + older + older[2:])
    assert [trace.trace_id for trace in traces] == [OTHER_TRACE, TRACE]
    assert len(traces[1].rows) == 7


# ---- hops from access lines --------------------------------------------------------------------------------

def test_access_lines_make_hops_caller_outbound_parent_of_callee_inbound() -> None:
    spans = hops_from_lines(parse_access_lines("\n".join(web_api_db_lines())), PLACES)
    trace = hop_trace(spans)
    assert [(row.span.service, row.span.tags["mesh.direction"], row.span.tags["mesh.host"], row.depth)
            for row in trace.rows] == [("web", "outbound", "vm1", 0), ("api", "inbound", "vm2", 1)]
    assert trace.trace_id is None and trace.source == "access logs"
    assert trace.rows[1].offset_us == 2_000 and trace.rows[0].self_us == 3_000


def test_an_inbound_line_is_the_parent_of_the_outbound_lines_its_proxy_started_meanwhile() -> None:
    from trace_samples import line

    lines = [*web_api_db_lines(),
             line("2026-12-07T00:30:01.006000Z", "api-vm2-9090", "outbound", "api", "pricing", 2,
                  destination_instance="pricing-vm3-7070"),
             line("2026-12-07T00:30:01.006500Z", "pricing-vm3-7070", "inbound", "api", "pricing", 1,
                  source_instance="api-vm2-9090", destination_instance="pricing-vm3-7070"),
             # the same request id sent by another caller, to another api instance: not under web's call
             line("2026-12-07T00:30:01.003000Z", "api-dock1-api-v2-1", "inbound", "web", "api", 1,
                  source_instance="web-vm9-8080", destination_instance="api-dock1-api-v2-1")]
    trace = hop_trace(hops_from_lines(parse_access_lines("\n".join(lines)), PLACES))
    assert [(row.span.service, row.span.tags["mesh.direction"], row.depth) for row in trace.rows] == [
        ("web", "outbound", 0), ("api", "inbound", 1), ("api", "outbound", 2), ("pricing", "inbound", 3),
        ("api", "inbound", 0)]


def test_hops_carry_the_lines_trace_id_when_they_have_one() -> None:
    lines = web_api_db_lines()
    traced = [text.replace('"trace_id": null', f'"trace_id": "{TRACE}"') for text in lines]
    trace = hop_trace(hops_from_lines(parse_access_lines("\n".join(traced)), PLACES))
    assert trace.trace_id == TRACE and header(trace).startswith(f"trace {TRACE} · request {REQUEST} · 2 spans")


# ---- the text view -----------------------------------------------------------------------------------------

def test_collector_trace_golden(update_goldens: bool) -> None:
    text = render_text([build_trace(web_api_pricing(), "collector", TRACE)], CONTAINERS)
    check_golden("collector-web-api-pricing.txt", text, update_goldens)


def test_access_log_hops_golden(update_goldens: bool) -> None:
    spans = hops_from_lines(parse_access_lines("\n".join(web_api_db_lines())), PLACES)
    check_golden("access-logs-web-api.txt", render_text([hop_trace(spans)]), update_goldens)


def test_last_traces_golden(update_goldens: bool) -> None:
    newer = [span("e1", None, "web", "outbound", "vm1", 100, 5, trace_id=OTHER_TRACE, request_id="r2"),
             span("e2", "e1", "api", "inbound", "vm2", 101, 3.5, trace_id=OTHER_TRACE, request_id="r2")]
    check_golden("last-two.txt", render_text(group_traces(web_api_pricing() + newer), CONTAINERS), update_goldens)


def test_what_a_caller_sent_cannot_drive_the_terminal() -> None:
    hostile = span("1", None, "web", "outbound", "vm1", 0, 1, request_id="id\x1b[2J", path="/\x1b]0;pwned\x07")
    text = render_text([build_trace([hostile], "collector", TRACE)])
    assert "\x1b" not in text and "\x07" not in text
    assert "request id\\x1b[2J" in text


def test_a_long_path_is_cut() -> None:
    long = span("1", None, "web", "outbound", "vm1", 0, 1, path="/" + "a" * 200)
    text = render_text([build_trace([long], "collector", TRACE)])
    assert "/" + "a" * 58 + "…" in text and "a" * 60 not in text


# ---- the JSON view -----------------------------------------------------------------------------------------

def test_json_holds_the_spans_and_the_tree_in_the_text_order() -> None:
    trace = build_trace(web_api_pricing(), "collector", TRACE)
    data = render_json([trace], "request x", ["controller ctl2: timed out"])
    only = data["traces"][0]
    assert only["trace_id"] == TRACE and only["source"] == "collector" and only["request_ids"] == [REQUEST]
    assert [item["span_id"] for item in only["spans"]] == [item["span_id"] for item in only["tree"]]
    api = only["tree"][1]
    assert api["parent_id"] == "00000000000000a1" and api["depth"] == 1 and api["self_us"] == 3_800
    assert api["children"] == ["00000000000000b2", "00000000000000b3", "00000000000000b4"]
    assert Span.from_json(only["spans"][1]) == web_api_pricing()[1]
    assert data["warnings"] == ["controller ctl2: timed out"] and data["searched"] == "request x"


def test_an_id_sent_thousands_of_times_pairs_each_call_with_its_own_and_stays_fast() -> None:
    from trace_samples import line

    lines = []
    for index in range(5000):
        second, milli = divmod(index * 10, 1000)
        at = f"2026-12-07T01:{second // 60:02d}:{second % 60:02d}.{milli:03d}"
        lines.append(line(f"{at}000Z", "web-vm1-8080", "outbound", "web", "api", 5,
                          destination_instance="api-vm2-9090"))
        lines.append(line(f"{at}500Z", "api-vm2-9090", "inbound", "web", "api", 4, source_instance="web-vm1-8080"))
    started = time.monotonic()
    spans = hops_from_lines(parse_access_lines("\n".join(lines)), PLACES)
    trace = hop_trace(spans)
    assert time.monotonic() - started < 10
    by_id = {item.span_id: item for item in spans}
    inbound = [item for item in spans if item.kind == "SERVER"]
    assert len(inbound) == 5000
    assert all(by_id[str(item.parent_id)].start_us == item.start_us - 500 for item in inbound)
    assert len(trace.rows) == 10_000


def test_a_callee_whose_clock_runs_behind_still_hangs_under_its_caller() -> None:
    from trace_samples import line

    lines = [line("2026-12-07T00:30:01.010000Z", "web-vm1-8080", "outbound", "web", "api", 12,
                  destination_instance="api-vm2-9090"),
             line("2026-12-07T00:30:01.007000Z", "api-vm2-9090", "inbound", "web", "api", 9,
                  source_instance="web-vm1-8080")]  # vm2's clock 4 ms behind vm1's
    trace = hop_trace(hops_from_lines(parse_access_lines("\n".join(lines)), PLACES))
    assert [(row.span.service, row.depth) for row in trace.rows] == [("web", 0), ("api", 1)]
    far = [lines[0], lines[1].replace("00:30:01.007", "00:30:00.900")]  # 110 ms before: another request
    assert [row.depth for row in hop_trace(hops_from_lines(parse_access_lines("\n".join(far)), PLACES)).rows] == [
        0, 0]
