"""Reads `mesh_tracing` (mesh-wide): whether proxies trace, what share of requests, and where spans go (mesh's
own collector on the controllers, or an outside Zipkin or OTLP/HTTP collector by URL).

It owns the variable's syntax and the check of a collector URL (it goes into every Envoy's config: nothing but
a scheme, a host, a port and a plain path passes); it must not read files or decide Envoy's config.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast

from mesh.inventory.located import Located, Problems
from mesh.inventory.model import Collector, TracingSettings
from mesh.inventory.policy_reading import mapping
from mesh.inventory.policy_values import parse_percent
from mesh.inventory.values import BadValue, describe, source_family

TRACING_KEY = "mesh_tracing"
TRACING_KEYS = ("sampling", "zipkin", "otlp")
OUTSIDE: tuple[Collector, ...] = ("zipkin", "otlp")
DEFAULT_SAMPLING = 1.0  # percent
MAX_URL = 2048
# scheme://host[:port][/path]: a host name, an IPv4 literal or a bracketed IPv6 literal (no scope); a path of
# unreserved characters and %-escapes only (no query, fragment, userinfo, space, quote or control character).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
                  r"(?::(?P<port>[0-9]{1,5}))?(?P<path>(?:/(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})*)*)", re.ASCII)
EXAMPLE = "{sampling: 100} (mesh's collector), {zipkin: http://zipkin.example:9411, sampling: 5} or {otlp: ...}"


def read_tracing(where: Located | None, problems: Problems) -> TracingSettings | None:
    """`mesh_tracing` (None when unset, null, or invalid: recorded)."""
    if where is None or where.value is None:
        return None
    if isinstance(where.value, str):
        problems.at(where, f"expected a mapping such as {EXAMPLE}, got {describe(where.value)}",
                    "in INI write a Python literal, such as mesh_tracing={'sampling': 100}")
        return None
    count = len(problems.errors)
    if not mapping(where, TRACING_KEYS, TRACING_KEY, problems, EXAMPLE):
        return None
    values = where.value
    sampling = DEFAULT_SAMPLING
    if "sampling" in values:
        sampling = problems.read(where.child("sampling"), parse_percent) or 0.0
    outside = [name for name in OUTSIDE if name in values]
    if len(outside) > 1:
        problems.add_error(where, outside[1], "name one outside collector: zipkin or otlp, not both")
    if len(problems.errors) != count:
        return None
    if not outside:
        return TracingSettings("mesh", sampling)
    collector = outside[0]
    url = problems.read(where.child(collector), collector_url)
    if url is None:
        return None
    text, scheme, host, port, path = url
    return TracingSettings(cast(Collector, collector), sampling, text, scheme, host, port, path)


def collector_url(value: Any) -> tuple[str, str, str, int, str | None]:
    """An outside collector's URL: (the URL as written, scheme, host, port, path). http or https only; a host
    name, IPv4 or bracketed IPv6 literal; a port 1-65535 (default 80 or 443); a path of plain characters (the
    collector's endpoint; None when the URL has none: mesh.config.tracing's default for the collector). No userinfo, query, fragment or '..'."""
    expected = "an http(s) URL of a collector such as http://zipkin.example:9411/api/v2/spans"
    if not isinstance(value, str):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    match = _URL.fullmatch(value) if len(value) <= MAX_URL else None
    if match is None:
        raise BadValue(f"expected {expected} (no userinfo, query, fragment, space or quote), got {describe(value)}")
    scheme = match["scheme"].lower()
    if scheme not in ("http", "https"):
        raise BadValue(f"expected {expected}: http or https, got {describe(value)}")
    host = match["host"]
    if host.startswith("["):
        host = host[1:-1]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise BadValue(f"expected {expected}: [{host}] is not an IPv6 address, got {describe(value)}") from None
    elif source_family(host) not in ("ipv4", "name"):
        raise BadValue(f"expected {expected}: {host!r} is not a host name or IPv4 address, got {describe(value)}")
    port_text = match["port"]
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535 or (port_text is not None and port_text != str(port)):
        raise BadValue(f"expected {expected}: a port 1-65535 with no leading zero, got {describe(value)}")
    path = match["path"]
    if ".." in path.split("/"):
        raise BadValue(f"expected {expected} with no '..' in its path, got {describe(value)}")
    return value, scheme, host, port, path if path not in ("", "/") else None
