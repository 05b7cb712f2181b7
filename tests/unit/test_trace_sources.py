"""Where `mesh trace` reads spans (mesh.traces.sources): every controller's traces API through an SSH channel to
its loopback web port (fake channels answering with the real API over a real TraceStore; one real HTTP server for
a controller run locally), merged across controllers; the access lines kept for a request."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from trace_fakes import FakeController, Fleet, http_answer
from trace_samples import OTHER_TRACE, REQUEST, TRACE, span, web_api_db_lines, web_api_pricing

from mesh.controller.spec import DEFAULT_WEB_PORT
from mesh.inventory.model import Connection, ManagedHost
from mesh.telemetry.accesslog import parse_access_lines
from mesh.traces.api import traces_api
from mesh.traces.sources import Collector, CollectorError, ControllerAPI, RequestLines, parse_answer
from mesh.traces.store import TraceStore


def controller(name: str, local: bool = False) -> ManagedHost:
    return ManagedHost(name, "vm", Connection("10.77.0.3", local=local), is_controller=True)


def collector(**controllers: FakeController) -> Collector:
    fleet = Fleet(controllers)
    return Collector([ControllerAPI(controller(name), fleet) for name in controllers])


# ---- one answer --------------------------------------------------------------------------------------------

def test_an_answer_is_read_whole_and_chunked_answers_too() -> None:
    body = json.dumps({"traces": [[item.to_json() for item in web_api_pricing()[:2]]]}).encode()
    for chunked in (False, True):
        spans = parse_answer(http_answer(200, body, chunked=chunked))
        assert spans == web_api_pricing()[:2]


@pytest.mark.parametrize(("raw", "said"), [
    (http_answer(400, b'{"error": "last: expected a number from 1 to 500"}', reason="Bad Request"),
     "HTTP 400: last: expected a number from 1 to 500"),
    (http_answer(404, b"", reason="Not Found"), "its controller has no traces API (HTTP 404: deploy this version"),
    (http_answer(200, b"<html>"), "answered something other than"),
    (http_answer(200, b'{"traces": [[{"trace_id": "zz"}]]}'), "answered a span mesh cannot read"),
    (b"SSH-2.0-OpenSSH\r\n", "answered no HTTP"),
    (b"", "answered no HTTP"),
])
def test_an_answer_that_is_not_traces_says_why(raw: bytes, said: str) -> None:
    with pytest.raises(CollectorError) as caught:
        parse_answer(raw)
    assert str(caught.value).startswith(said)


def test_the_request_goes_to_the_controllers_loopback_web_port_with_the_id_quoted() -> None:
    ctl1 = FakeController()
    spans = collector(ctl1=ctl1).ask({"request_id": "a&b=c d/é"})
    assert spans == []
    assert ctl1.ports == [("127.0.0.1", DEFAULT_WEB_PORT)]
    assert ctl1.queries == [{"request_id": "a&b=c d/é"}]
    assert ctl1.channels[0].sent.startswith(b"GET /api/traces?request_id=a%26b%3Dc+d%2F%C3%A9 HTTP/1.1\r\n")
    assert ctl1.channels[0].closed


@pytest.fixture
def local_api() -> Iterator[tuple[int, TraceStore]]:
    """The traces API on a real loopback HTTP server, as a controller run on this machine serves it."""
    store = TraceStore()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, document = traces_api(store, dict(parse_qsl(urlsplit(self.path).query)))
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], store
    server.shutdown()
    server.server_close()


def test_a_controller_run_on_this_machine_is_asked_over_plain_loopback(local_api: tuple[int, TraceStore]) -> None:
    port, store = local_api
    store.add(web_api_pricing())
    api = ControllerAPI(controller("ctl1", local=True), port=port)
    assert sorted(item.span_id for item in api.get({"trace_id": TRACE})) == sorted(
        item.span_id for item in web_api_pricing())
    with pytest.raises(CollectorError, match="HTTP 400: give exactly one of"):
        api.get({})


def test_nothing_listening_on_a_local_controllers_port_is_named() -> None:
    api = ControllerAPI(controller("ctl1", local=True), port=1)
    with pytest.raises(CollectorError, match="nothing answers on 127.0.0.1:1 .*is mesh-controller running here"):
        api.get({"last": "1"})


# ---- every controller --------------------------------------------------------------------------------------

def test_spans_spread_over_controllers_are_merged_and_each_missing_part_asked_by_trace_id() -> None:
    spans = web_api_pricing()
    ctl1 = FakeController().holding(spans[:3])  # web's, api's inbound and first call: all hold the request id
    ctl2 = FakeController().holding([span("c9", "b3", "pricing", "inbound", "vm3", 8.2, 13, request_id="other")])
    ctl2.holding(spans[3:])
    got = collector(ctl1=ctl1, ctl2=ctl2)
    found = got.lookup(REQUEST)
    assert len({item.span_id for item in found}) == 8
    assert ctl1.queries == [{"request_id": REQUEST}]
    assert ctl2.queries == [{"request_id": REQUEST}]  # it holds spans of that request: the whole trace came back
    lone = FakeController().holding([span("c9", "b3", "pricing", "inbound", "vm3", 8.2, 13, request_id="other")])
    got = collector(ctl1=FakeController().holding(spans), ctl2=lone)
    assert len({item.span_id for item in got.lookup(REQUEST)}) == 8
    assert lone.queries == [{"request_id": REQUEST}, {"trace_id": TRACE}]


def test_a_trace_id_is_asked_as_a_trace_id_then_as_a_request_id() -> None:
    ctl1 = FakeController().holding(web_api_pricing())
    assert collector(ctl1=ctl1).lookup(TRACE.upper())
    assert ctl1.queries == [{"trace_id": TRACE}]
    ctl1 = FakeController().holding([span("1", None, "web", "outbound", "vm1", 0, 1, trace_id=OTHER_TRACE,
                                          request_id=TRACE)])
    assert [item.trace_id for item in collector(ctl1=ctl1).lookup(TRACE)] == [OTHER_TRACE]
    assert ctl1.queries == [{"trace_id": TRACE}, {"request_id": TRACE}]  # it answered with all of OTHER_TRACE


def test_a_controller_that_fails_is_named_and_not_asked_again_while_the_others_count() -> None:
    ctl1 = FakeController(unreachable="cannot connect to 10.77.0.3:22: timed out")
    ctl2 = FakeController(refused=True)
    ctl3 = FakeController().holding(web_api_pricing())
    ctl4 = FakeController(raw=http_answer(500, b"", reason="Internal Server Error"))
    got = collector(ctl1=ctl1, ctl2=ctl2, ctl3=ctl3, ctl4=ctl4)
    assert len(got.lookup(REQUEST)) == 7
    assert got.got.problems == {
        "ctl1": "cannot connect to 10.77.0.3:22: timed out",
        "ctl2": "nothing answers on 127.0.0.1:9191 there: is mesh-controller running?",
        "ctl4": "HTTP 500 Internal Server Error",
    }
    assert got.got.unreachable == {"ctl1"}
    assert len(ctl4.queries) == 1 and ctl3.queries == [{"request_id": REQUEST}]


def test_last_asks_every_controller_for_its_newest_traces_of_the_service() -> None:
    ctl1 = FakeController().holding(web_api_pricing())
    got = collector(ctl1=ctl1)
    assert len(got.last(3, "api")) == 7
    assert ctl1.queries == [{"last": "3", "service": "api"}]


# ---- access lines ------------------------------------------------------------------------------------------

def test_the_lines_kept_are_the_requests_http_lines_by_request_or_trace_id() -> None:
    lines = parse_access_lines("\n".join(web_api_db_lines()))
    assert [line.get("proxy") for line in lines if RequestLines(wanted=REQUEST)(line)] == [
        "api-vm2-9090", "web-vm1-8080"]
    assert not [line for line in lines if RequestLines(wanted="5c0a1e6e")(line)]
    traced = parse_access_lines("\n".join(text.replace('"trace_id": null', f'"trace_id": "{TRACE.upper()}"')
                                          for text in web_api_db_lines(request_id="r9")))
    assert len([line for line in traced if RequestLines(wanted=TRACE)(line)]) == 2
    assert len([line for line in lines if RequestLines()(line)]) == 2  # --last: every HTTP line with an id
