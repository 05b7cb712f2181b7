"""One probe of one instance through its Envoy's health chain: mTLS 1.3, SPIFFE check, GET /mesh/health.

It owns the client TLS (stdlib ssl only: controllers need no cryptography) and the verdict; it writes nothing.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mesh.healthcheck.config import CheckerConfig, Instance

HEALTH_PATH = "/mesh/health"
MAX_BODY = 512

ProbeStatus = Literal["passing", "critical"]


@dataclass(frozen=True)
class ProbeResult:
    """The verdict on one instance and why, in words that go into the Consul check's Output."""

    status: ProbeStatus
    output: str


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 only, the checker's own certificate, the server's chain verified against the mesh CA.

    Host names are not checked: the server's identity is its SPIFFE URI SAN, which probe() checks.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(certfile=cert, keyfile=key)
    return context


def probe(context: ssl.SSLContext, instance: Instance, config: CheckerConfig) -> ProbeResult:
    """Probe one instance; any failure is critical, with the stage and the reason in the output."""
    where = f"{instance.address}:{instance.proxy_port}"
    started = time.monotonic()
    try:
        address = (instance.address, instance.proxy_port)
        with (socket.create_connection(address, timeout=config.timeout) as raw,
              context.wrap_socket(raw, server_hostname=config.sni) as tls):
            identity = _spiffe_ids(tls.getpeercert())
            expected = f"spiffe://{config.trust_domain}/svc/{instance.service}"
            if expected not in identity:
                return ProbeResult("critical", f"{where}: the server is {identity or 'no SPIFFE ID'}, "
                                               f"expected {expected}")
            tls.settimeout(max(0.1, config.timeout - (time.monotonic() - started)))
            status, reason = _get_health(tls, config.sni)
    except TimeoutError:
        return ProbeResult("critical", f"{where}: timed out after {config.timeout:g}s")
    except ssl.SSLError as exc:
        return ProbeResult("critical", f"{where}: TLS: {exc.reason or exc}")
    except (OSError, http.client.HTTPException) as exc:
        return ProbeResult("critical", f"{where}: {type(exc).__name__}: {exc}")
    if status == 200:
        return ProbeResult("passing", f"{where}: GET {HEALTH_PATH}: 200 {reason}")
    return ProbeResult("critical", f"{where}: GET {HEALTH_PATH}: {status} {reason}")


def _get_health(tls: ssl.SSLSocket, sni: str) -> tuple[int, str]:
    request = f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {sni}\r\nUser-Agent: mesh-health-checker\r\n" \
              "Connection: close\r\n\r\n"
    tls.sendall(request.encode("ascii"))
    response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]  # it only needs makefile()
    response.begin()
    try:
        response.read(MAX_BODY)
    finally:
        response.close()
    return response.status, response.reason


def _spiffe_ids(peer: Mapping[str, object] | None) -> list[str]:
    names = (peer or {}).get("subjectAltName") or ()
    assert isinstance(names, tuple)
    return [str(value) for kind, value in names if kind == "URI"]
