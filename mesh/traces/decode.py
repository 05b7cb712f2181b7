"""Span reports as the proxies send them, decoded into mesh's Span: Zipkin's JSON v2 (Envoy's Zipkin tracer,
HTTP_JSON) and OTLP/HTTP in protobuf or JSON (Envoy's OpenTelemetry tracer), with the official OpenTelemetry
definitions that xds-protos ships. Pure; ValueError (the receiver's 400) on anything malformed, never another
exception.

xds-protos ships OTLP's older trace definitions: a ResourceSpans' `instrumentation_library_spans` (field 2) is what
OTLP now calls `scope_spans` (field 2, the same wire format: `spans` is field 2 in both), so current senders'
protobuf decodes as is; in JSON, `scopeSpans` is read as that field.

A span's strings are cut to bounded lengths (name, tag keys and values, at most MAX_TAGS tags): what a proxy sends
cannot make one span large.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from mesh.traces.model import SERVICE_TAG, Span

MAX_NAME = 256
MAX_TAGS = 64
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 2048
_HEX = frozenset("0123456789abcdef")
_KINDS = {OtlpSpan.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED", OtlpSpan.SPAN_KIND_INTERNAL: "INTERNAL",
          OtlpSpan.SPAN_KIND_SERVER: "SERVER", OtlpSpan.SPAN_KIND_CLIENT: "CLIENT",
          OtlpSpan.SPAN_KIND_PRODUCER: "PRODUCER", OtlpSpan.SPAN_KIND_CONSUMER: "CONSUMER"}
_ZIPKIN_KINDS = frozenset({"CLIENT", "SERVER", "PRODUCER", "CONSUMER"})


class MalformedSpans(ValueError):
    """A body that is not the report its path says (the receiver's 400)."""


class UnsupportedMediaType(ValueError):
    """A body whose content type no decoder reads (the receiver's 415)."""


# --- Zipkin JSON v2 ---

def zipkin_spans(body: bytes) -> list[Span]:
    """The spans of a Zipkin v2 JSON list (`POST /api/v2/spans`). 64-bit trace ids are widened to 32 hex digits
    (zeros first, as Zipkin does); a span without a kind is INTERNAL."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedSpans(f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise MalformedSpans("expected a JSON list of spans")
    return [_zipkin_span(item, index) for index, item in enumerate(data)]


def _zipkin_span(item: Any, index: int) -> Span:
    where = f"span {index}"
    if not isinstance(item, dict):
        raise MalformedSpans(f"{where}: expected an object")
    trace_id = _hex_id(item.get("traceId"), (16, 32), f"{where}: traceId").rjust(32, "0")
    span_id = _hex_id(item.get("id"), (16,), f"{where}: id")
    parent = item.get("parentId")
    parent_id = None if parent in (None, "") else _hex_id(parent, (16,), f"{where}: parentId")
    kind = item.get("kind")
    if kind is not None and kind not in _ZIPKIN_KINDS:
        raise MalformedSpans(f"{where}: kind: expected one of {', '.join(sorted(_ZIPKIN_KINDS))}, got {kind!r}")
    raw_tags = item.get("tags", {})
    if not isinstance(raw_tags, dict):
        raise MalformedSpans(f"{where}: tags: expected an object")
    tags = _tags((str(key), value if isinstance(value, str) else json.dumps(value))
                 for key, value in raw_tags.items())
    endpoint = item.get("localEndpoint")
    local = endpoint.get("serviceName") if isinstance(endpoint, dict) else None
    return Span(trace_id=trace_id, span_id=span_id, parent_id=parent_id, name=_cut(item.get("name"), MAX_NAME),
                kind=kind or "INTERNAL", start_us=_micros(item.get("timestamp"), f"{where}: timestamp"),
                duration_us=_micros(item.get("duration"), f"{where}: duration"),
                service=tags.get(SERVICE_TAG) or (_cut(local, MAX_NAME) if isinstance(local, str) else None),
                tags=tags)


def _micros(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2 ** 63:
        raise MalformedSpans(f"{where}: expected microseconds (a non-negative number), got {value!r}")
    return int(value)


# --- OTLP/HTTP ---

def otlp_spans(body: bytes, content_type: str) -> list[Span]:
    """The spans of an OTLP/HTTP ExportTraceServiceRequest: `application/x-protobuf`, or `application/json`
    (OTLP's JSON: ids in hex, not base64). UnsupportedMediaType for another content type."""
    media = content_type.split(";", 1)[0].strip().lower()
    request = ExportTraceServiceRequest()
    if media == "application/x-protobuf":
        try:
            request.ParseFromString(body)
        except (DecodeError, RuntimeWarning) as exc:
            raise MalformedSpans(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from None
    elif media == "application/json":
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise MalformedSpans("expected a JSON object")
            json_format.ParseDict(_ids_as_base64(data), request, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            raise MalformedSpans(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from None
    else:
        raise UnsupportedMediaType(f"content type {content_type!r}: expected application/x-protobuf or "
                                   "application/json")
    spans = []
    for resource_spans in request.resource_spans:
        resource = {item.key: _any_text(item.value) for item in resource_spans.resource.attributes}
        for scope_spans in resource_spans.instrumentation_library_spans:  # OTLP's scope_spans (field 2)
            for index, span in enumerate(scope_spans.spans):
                spans.append(_otlp_span(span, resource.get("service.name"), f"span {index}"))
    return spans


def _otlp_span(span: OtlpSpan, resource_service: str | None, where: str) -> Span:
    trace_id = _bytes_id(span.trace_id, 16, f"{where}: trace_id")
    span_id = _bytes_id(span.span_id, 8, f"{where}: span_id")
    parent_id = _bytes_id(span.parent_span_id, 8, f"{where}: parent_span_id") if span.parent_span_id else None
    tags = _tags((item.key, _any_text(item.value)) for item in span.attributes)
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    return Span(trace_id=trace_id, span_id=span_id, parent_id=parent_id, name=_cut(span.name, MAX_NAME),
                kind=_KINDS.get(span.kind, "UNSPECIFIED"), start_us=start // 1000,
                duration_us=max(0, end - start) // 1000,
                service=tags.get(SERVICE_TAG) or (_cut(resource_service, MAX_NAME) if resource_service else None),
                tags=tags)


def _any_text(value: AnyValue) -> str:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "int_value":
        return str(value.int_value)
    if which == "double_value":
        return repr(value.double_value)
    if which is None:
        return ""
    return json.dumps(json_format.MessageToDict(value), sort_keys=True)


_ID_KEYS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _ids_as_base64(data: dict[str, Any]) -> dict[str, Any]:
    """OTLP JSON's hex ids as protobuf JSON's base64 bytes (in spans and their links), and `scopeSpans` under the
    older definitions' name; anything else unchanged."""
    for resource_spans in _list(data, "resourceSpans", "resource_spans"):
        for key in ("scopeSpans", "scope_spans"):
            if key in resource_spans:
                resource_spans["instrumentationLibrarySpans"] = resource_spans.pop(key)
        for scope_spans in _list(resource_spans, "instrumentationLibrarySpans", "instrumentation_library_spans"):
            for span in _list(scope_spans, "spans"):
                for item in (span, *_list(span, "links")):
                    for key in _ID_KEYS:
                        if isinstance(item.get(key), str):
                            item[key] = _hex_to_base64(item[key], key)
    return data


def _list(data: Any, *keys: str) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        return []
    for key in keys:
        value = data.get(key)
        if isinstance(value, list):
            return [item for item in value if isinstance(item, dict)]
    return []


def _hex_to_base64(value: str, key: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise MalformedSpans(f"{key}: expected hex digits, got {value[:40]!r}") from None


# --- shared ---

def _hex_id(value: Any, lengths: tuple[int, ...], where: str) -> str:
    if not isinstance(value, str):
        raise MalformedSpans(f"{where}: expected hex digits, got {value!r}")
    lowered = value.lower()
    if len(lowered) not in lengths or not set(lowered) <= _HEX or not lowered.strip("0"):
        raise MalformedSpans(f"{where}: expected {' or '.join(map(str, lengths))} hex digits (not all zero), got "
                         f"{value[:40]!r}")
    return lowered


def _bytes_id(value: bytes, length: int, where: str) -> str:
    if len(value) != length or not any(value):
        raise MalformedSpans(f"{where}: expected {length} bytes (not all zero), got {len(value)}")
    return binascii.hexlify(value).decode()


def _cut(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _tags(items: Any) -> Mapping[str, str]:
    tags: dict[str, str] = {}
    for key, value in items:
        if len(tags) >= MAX_TAGS:
            break
        tags[key[:MAX_TAG_KEY]] = value[:MAX_TAG_VALUE]
    return MappingProxyType(tags)
