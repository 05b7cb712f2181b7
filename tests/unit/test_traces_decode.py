"""Decoding span reports: Zipkin JSON v2 as Envoy 1.40's Zipkin tracer sends it (bodies captured from a real Envoy),
and OTLP/HTTP requests built with the official OpenTelemetry protobuf classes (xds-protos), in protobuf and in
OTLP's JSON (hex ids). Anything malformed is a ValueError with a message, never another exception."""

from __future__ import annotations

import base64
import json

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import InstrumentationLibrarySpans, ResourceSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from mesh.traces.decode import MAX_TAG_VALUE, MAX_TAGS, UnsupportedMediaType, otlp_spans, zipkin_spans
from mesh.traces.model import Span

# What Envoy 1.40 posted to /api/v2/spans for a request carrying B3 headers (tests/test_span_receiver_envoy.py's
# listener: shared_span_context false, 128-bit ids, custom tags mesh.service and mesh.direction)
ENVOY_B3 = (
    b'[{"kind":"SERVER","localEndpoint":{"ipv4":"192.0.2.2","port":0},"tags":{"http.method":"GET","request_size":"0",'
    b'"http.url":"http://127.0.0.1:39839/orders","response_flags":"-","mesh.direction":"inbound","user_agent":"-",'
    b'"guid:x-request-id":"7b3e4f5a-2c1d-4e8f-9a0b-1c2d3e4f5a6b","downstream_cluster":"-","peer.address":'
    b'"127.0.0.1","http.protocol":"HTTP/1.1","response_size":"3","component":"proxy","http.status_code":"200",'
    b'"mesh.service":"web"},"name":"127.0.0.1:39839","parentId":"a2fb4a1d1a96d312","annotations":[{"timestamp":'
    b'1796602568994038,"value":"ss"}],"id":"94ba934dcb59e394","duration":119,"timestamp":1796602568993813,'
    b'"traceId":"463ac35c9f6413ad48485a3953bb6124"}]')
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
PARENT_ID = "00f067aa0ba902b7"


def test_envoy_s_zipkin_json_becomes_spans() -> None:
    [span] = zipkin_spans(ENVOY_B3)
    assert (span.trace_id, span.span_id, span.parent_id) == ("463ac35c9f6413ad48485a3953bb6124", "94ba934dcb59e394",
                                                             "a2fb4a1d1a96d312")
    assert (span.kind, span.name, span.start_us, span.duration_us) == ("SERVER", "127.0.0.1:39839",
                                                                       1796602568993813, 119)
    assert span.service == "web" and span.request_id == "7b3e4f5a-2c1d-4e8f-9a0b-1c2d3e4f5a6b"
    assert span.tags["http.status_code"] == "200" and span.tags["mesh.direction"] == "inbound"
    assert Span.from_json(json.loads(json.dumps(span.to_json()))) == span


def test_zipkin_64_bit_trace_ids_are_widened_and_ids_lowercased_and_the_service_falls_back() -> None:
    body = json.dumps([{"traceId": "ABCDEF0123456789", "id": "0123456789ABCDEF", "timestamp": 5,
                        "localEndpoint": {"serviceName": "api"}, "tags": {"n": 3}}]).encode()
    [span] = zipkin_spans(body)
    assert (span.trace_id, span.span_id) == ("0000000000000000abcdef0123456789", "0123456789abcdef")
    assert (span.service, span.kind, span.duration_us, span.parent_id, span.tags) == ("api", "INTERNAL", 0, None,
                                                                                      {"n": "3"})


def test_zipkin_tags_are_bounded() -> None:
    tags = {f"t{i}": "x" * (MAX_TAG_VALUE + 100) for i in range(MAX_TAGS + 10)}
    [span] = zipkin_spans(json.dumps([{"traceId": TRACE_ID, "id": SPAN_ID, "tags": tags}]).encode())
    assert len(span.tags) == MAX_TAGS and {len(value) for value in span.tags.values()} == {MAX_TAG_VALUE}


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    (b'{"traceId": "x"}', "expected a JSON list"),
    (b'[1]', "span 0: expected an object"),
    (b'[{"id": "b7ad6b7169203331"}]', "span 0: traceId"),
    (b'[{"traceId": "0af7651916cd43dd8448eb211c80319c", "id": "xyz"}]', "span 0: id"),
    (b'[{"traceId": "00000000000000000000000000000000", "id": "b7ad6b7169203331"}]', "not all zero"),
    (b'[{"traceId": "0af7651916cd43dd8448eb211c80319c", "id": "b7ad6b7169203331", "kind": "BOSS"}]', "kind"),
    (b'[{"traceId": "0af7651916cd43dd8448eb211c80319c", "id": "b7ad6b7169203331", "timestamp": -1}]', "timestamp"),
    (b'[{"traceId": "0af7651916cd43dd8448eb211c80319c", "id": "b7ad6b7169203331", "tags": []}]', "tags"),
    (b'\xff\xfe', "not JSON"),
])
def test_malformed_zipkin_bodies_are_value_errors_naming_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zipkin_spans(body)


def otlp_request() -> ExportTraceServiceRequest:
    span = OtlpSpan(trace_id=bytes.fromhex(TRACE_ID), span_id=bytes.fromhex(SPAN_ID),
                    parent_span_id=bytes.fromhex(PARENT_ID), name="egress api", kind=OtlpSpan.SPAN_KIND_CLIENT,
                    start_time_unix_nano=1_700_000_000_123_456_789, end_time_unix_nano=1_700_000_000_125_456_789,
                    attributes=[KeyValue(key="guid:x-request-id", value=AnyValue(string_value="req-1")),
                                KeyValue(key="http.status_code", value=AnyValue(int_value=200)),
                                KeyValue(key="mesh.upstream", value=AnyValue(string_value="api")),
                                KeyValue(key="sampled", value=AnyValue(bool_value=True))])
    root = OtlpSpan(trace_id=bytes.fromhex(TRACE_ID), span_id=bytes.fromhex(PARENT_ID), name="ingress",
                    kind=OtlpSpan.SPAN_KIND_SERVER, start_time_unix_nano=1_700_000_000_000_000_000,
                    end_time_unix_nano=1_700_000_000_200_000_000)
    # xds-protos' older name of OTLP's scope_spans (the same field 2 on the wire)
    resource = ResourceSpans(instrumentation_library_spans=[InstrumentationLibrarySpans(spans=[span, root])])
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="web")))
    return ExportTraceServiceRequest(resource_spans=[resource])


def test_otlp_protobuf_becomes_spans() -> None:
    client, server = otlp_spans(otlp_request().SerializeToString(), "application/x-protobuf")
    assert (client.trace_id, client.span_id, client.parent_id, client.kind, client.name) == (
        TRACE_ID, SPAN_ID, PARENT_ID, "CLIENT", "egress api")
    assert (client.start_us, client.duration_us, client.service) == (1_700_000_000_123_456, 2000, "web")
    assert client.request_id == "req-1" and client.tags["http.status_code"] == "200"
    assert client.tags["sampled"] == "true"
    assert (server.kind, server.parent_id, server.duration_us) == ("SERVER", None, 200_000)


def test_otlp_json_with_hex_ids_becomes_the_same_spans() -> None:
    document = json_format.MessageToDict(otlp_request())
    resource = document["resourceSpans"][0]
    resource["scopeSpans"] = resource.pop("instrumentationLibrarySpans")  # what a current OTLP sender writes
    for span in resource["scopeSpans"][0]["spans"]:  # OTLP JSON: ids in hex, not base64
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in span:
                span[key] = base64.b64decode(span[key]).hex()
    document["futureField"] = {"ignored": True}
    body = json.dumps(document).encode()
    assert otlp_spans(body, "application/json; charset=utf-8") == \
        otlp_spans(otlp_request().SerializeToString(), "application/x-protobuf")


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (b"\x0a\x05garbage", "application/x-protobuf", "not an OTLP protobuf"),
    (b"{", "application/json", "not an OTLP JSON"),
    (b"[]", "application/json", "expected a JSON object"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "b7ad6b7169203331"}]}]}]}',
     "application/json", "traceId: expected hex"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "0af7", "spanId": "b7ad6b7169203331"}]}]}]}',
     "application/json", "trace_id: expected 16 bytes"),
])
def test_malformed_otlp_is_a_value_error(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        otlp_spans(body, content_type)


def test_an_otlp_body_of_another_content_type_is_unsupported() -> None:
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        otlp_spans(b"hello", "text/plain")


def test_a_current_otlp_sender_s_span_flags_field_is_skipped() -> None:
    """OTLP 1.x added Span.flags (field 16, fixed32), unknown to xds-protos' definitions: decoding skips it."""
    span = otlp_request().resource_spans[0].instrumentation_library_spans[0].spans[0]
    with_flags = span.SerializeToString() + bytes([0x85, 0x01]) + (0x301).to_bytes(4, "little")
    scope = b"\x12" + _varint(len(with_flags)) + with_flags  # ScopeSpans.spans (2)
    resource = b"\x12" + _varint(len(scope)) + scope  # ResourceSpans.scope_spans (2)
    body = b"\x0a" + _varint(len(resource)) + resource  # ExportTraceServiceRequest.resource_spans (1)
    [decoded] = otlp_spans(body, "application/x-protobuf")
    assert (decoded.trace_id, decoded.span_id, decoded.request_id) == (TRACE_ID, SPAN_ID, "req-1")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
