"""Tracing's fixed names and numbers: one place for the proxies' side and the controllers' span receiver."""

from __future__ import annotations

TRACE_PORT = 9411  # the controllers' span receiver (mTLS), where every proxy sends its spans
TRACE_CLUSTER = "mesh-traces"  # the Envoy cluster of the span collector (mesh's own or an outside one)
ZIPKIN_PATH = "/api/v2/spans"  # Zipkin's JSON v2 endpoint (mesh's receiver and an outside Zipkin's default)
OTLP_PATH = "/v1/traces"  # OTLP/HTTP's traces endpoint (an outside collector's default)
