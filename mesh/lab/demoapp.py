#!/usr/bin/env python3
"""The lab's demo application: answers {"hops": [...]} over HTTP (or one JSON hop per line over TCP).

Over HTTP it forwards the request id and the trace headers it received (FORWARDED_HEADERS) to every upstream
HTTP call, as a mesh asks of every application so that one id follows a request through every hop, and its own
hop names the request id it saw (`request_id`, absent when the request had none) and the `x-forwarded-client-cert`
header it received (`client_cert`, absent when none: what a mesh's inbound proxy tells the app of its caller).

Its behaviour is read at each request from a file on its host (in its container, for a container instance):
`/run/mesh-demo/<port>.json`, e.g. {"status": 500, "delay_ms": 300, "fail_every": 2, "fail_status": 503,
"health_status": 500}. A missing or unreadable file means normal behaviour; the health path (/healthz) keeps
answering 200 unless the file sets "health_status". `demoapp.py behave PORT [JSON]` writes (or, without JSON,
removes) that file, so a test or a person changes an instance's behaviour with `mesh lab exec` and no control
endpoint is reachable through the mesh. An error answer still names the instance: {"hops": [its hop], "error"}.

Standard library only, one file: it is copied to nodes and into the app image and must never import mesh.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

UPSTREAM_TIMEOUT = 2.0
TCP_BY_DEFAULT = {"db"}
BEHAVIOUR_DIR = "/run/mesh-demo"
HEALTH_PATH = "/healthz"
BEHAVIOUR_KEYS = {"status", "delay_ms", "fail_every", "fail_status", "health_status"}
# What an app must pass on from the request it serves to the requests it makes: Envoy's request id, W3C trace
# context and Zipkin's B3 (single and multi header), the set Istio asks applications to propagate.
FORWARDED_HEADERS = (
    "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags",
)  # fmt: skip
# Envoy's header naming the caller's certificate (set by the inbound proxy; never passed on to upstreams: each hop
# reports what its own proxy told it).
CLIENT_CERT_HEADER = "x-forwarded-client-cert"


class Upstream:
    """One upstream as the app knows it: a name, where to reach it, and how to speak to it."""

    def __init__(self, name: str, host: str, port: int, protocol: str) -> None:
        self.name, self.host, self.port, self.protocol = name, host, port, protocol

    def hops(self, forwarded: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The hops this upstream reports, or one error hop naming it; `forwarded` headers go with an HTTP call."""
        try:
            return self._tcp_hops() if self.protocol == "tcp" else self._http_hops(forwarded or {})
        except (OSError, ValueError, TypeError, http.client.HTTPException) as exc:
            return [{"service": self.name, "error": f"{self.host}:{self.port}: {_reason(exc)}"}]

    def _http_hops(self, forwarded: dict[str, str]) -> list[dict[str, Any]]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=UPSTREAM_TIMEOUT)
        try:
            connection.request("GET", "/", headers={**forwarded, "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            text = body.decode(errors="replace").strip()[:200]
            raise ValueError(f"HTTP {response.status}" + (f": {text}" if text else ""))
        hops = json.loads(body).get("hops")
        if not isinstance(hops, list):
            raise TypeError("the answer has no hops list")
        return hops

    def _tcp_hops(self) -> list[dict[str, Any]]:
        with socket.create_connection((self.host, self.port), timeout=UPSTREAM_TIMEOUT) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"hop\n")
            line = conn.makefile("rb").readline()
        if not line:
            raise ValueError("connection closed without an answer")
        hop = json.loads(line)
        if not isinstance(hop, dict):
            raise TypeError("the answer is not a JSON object")
        return [hop]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Behaviour:
    """What this instance should do with its next request, from its behaviour file (read at each request)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._served = 0  # requests other than health checks, counted for fail_every
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        """The file's settings; {} when it is missing, unreadable or not a JSON object."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def next_request(self) -> tuple[int, float]:
        """(status, delay in seconds) for the next request that is not a health check."""
        settings = self.read()
        with self._lock:
            self._served += 1
            count = self._served
        status = _int(settings.get("status"), 200)
        every = _int(settings.get("fail_every"), 0)
        if every > 0 and count % every == 0:
            status = _int(settings.get("fail_status"), 503)
        return status, max(0, _int(settings.get("delay_ms"), 0)) / 1000

    def health_status(self) -> int:
        return _int(self.read().get("health_status"), 200)

    def delay(self) -> float:
        return max(0, _int(self.read().get("delay_ms"), 0)) / 1000


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def behaviour_path(port: int, folder: str = BEHAVIOUR_DIR) -> str:
    return os.path.join(folder, f"{port}.json")


class App:
    """One instance's identity, upstreams and behaviour file; makes the answers both servers send."""

    def __init__(self, hop: dict[str, str], upstreams: list[Upstream], behaviour: Behaviour | None = None) -> None:
        self.hop = hop
        self.upstreams = upstreams
        self.behaviour = behaviour or Behaviour(os.devnull)

    def answer(self, forwarded: dict[str, str] | None = None, client_cert: str | None = None) -> dict[str, Any]:
        """This instance's hop (with the request id and the client certificate header it saw, if any) and its
        upstreams', each upstream called with the `forwarded` headers of the request being answered."""
        forwarded = forwarded or {}
        hop: dict[str, Any] = dict(self.hop)
        if "x-request-id" in forwarded:
            hop["request_id"] = forwarded["x-request-id"]
        if client_cert is not None:
            hop["client_cert"] = client_cert
        hops = [hop]
        for upstream in self.upstreams:
            hops.extend(upstream.hops(forwarded))
        return {"hops": hops}


def forwarded_headers(headers: Any) -> dict[str, str]:
    """The FORWARDED_HEADERS present in a request's headers (an email.message.Message), first value each."""
    found: dict[str, str] = {}
    for name in FORWARDED_HEADERS:
        value = headers.get(name)
        if value is not None:
            found[name] = value
    return found


class HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive stalls 40 ms per request (Nagle + delayed ACK)
    server: AppHTTPServer

    def do_GET(self) -> None:
        app = self.server.app
        if self.path.split("?", 1)[0] == HEALTH_PATH:
            status = app.behaviour.health_status()
            self._send(status, b"ok\n" if status == 200 else f"health status {status}\n".encode(), "text/plain")
            return
        status, delay = app.behaviour.next_request()
        if delay:
            time.sleep(delay)
        if status == 200:
            answer = app.answer(forwarded_headers(self.headers), self.headers.get(CLIENT_CERT_HEADER))
        else:  # an error answer from the behaviour file: no upstream is called, the hop says who answered
            answer = {"hops": [dict(app.hop)], "error": f"status {status} from the behaviour file"}
        self._send(status, json.dumps(answer).encode() + b"\n", "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.do_GET()

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_POST

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: the journal and `docker logs` stay readable


class AppHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: socketserver's 5 drops connections under concurrent load

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, HttpHandler)


class LineHandler(socketserver.StreamRequestHandler):
    server: AppTCPServer

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        app = self.server.app
        answer = json.dumps(app.hop).encode() + b"\n"
        for _line in self.rfile:
            delay = app.behaviour.delay()
            if delay:
                time.sleep(delay)
            self.wfile.write(answer)


class AppTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, LineHandler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mesh demo app: reports the services a request went through")
    parser.add_argument("--service", required=True)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--host", default=socket.gethostname(), help="the inventory host name")
    parser.add_argument("--instance", help="the container name, or the host name on a VM (default: --host)")
    parser.add_argument("--kind", choices=("vm", "container"), default="vm")
    parser.add_argument("--protocol", choices=("http", "tcp"), default="http")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--upstream-protocol", action="append", default=[], metavar="NAME=http|tcp",
                        help="default: tcp for db, http for the rest")
    parser.add_argument("--behaviour-dir", default=BEHAVIOUR_DIR,
                        help="where this instance reads <port>.json at each request (default: %(default)s)")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> App:
    protocols = {}
    for item in args.upstream_protocol:
        name, _, protocol = item.partition("=")
        if protocol not in ("http", "tcp"):
            raise SystemExit(f"--upstream-protocol {item}: expected NAME=http or NAME=tcp")
        protocols[name] = protocol
    upstreams = []
    for item in args.upstream:
        name, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if not name or not host or not port.isdigit():
            raise SystemExit(f"--upstream {item}: expected NAME=HOST:PORT")
        default = "tcp" if name in TCP_BY_DEFAULT else "http"
        upstreams.append(Upstream(name, host, int(port), protocols.get(name, default)))
    hop = {"service": args.service, "version": args.version, "host": args.host,
           "instance": args.instance or args.host, "kind": args.kind}
    return App(hop, upstreams, Behaviour(behaviour_path(args.port, args.behaviour_dir)))


def behave(argv: list[str]) -> int:
    """`behave PORT [JSON] [--dir DIR]`: write the instance's behaviour file atomically, or remove it."""
    parser = argparse.ArgumentParser(prog="demoapp.py behave",
                                     description="set (or, without JSON, reset) a demo app instance's behaviour")
    parser.add_argument("port", type=int)
    parser.add_argument("settings", nargs="?", help='e.g. \'{"status": 500, "delay_ms": 300}\'')
    parser.add_argument("--dir", default=BEHAVIOUR_DIR)
    args = parser.parse_intermixed_args(argv)
    path = behaviour_path(args.port, args.dir)
    if args.settings is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return 0
    try:
        settings = json.loads(args.settings)
    except ValueError as exc:
        parser.error(f"not JSON: {exc}")
    if not isinstance(settings, dict) or set(settings) - BEHAVIOUR_KEYS:
        parser.error(f"expected a JSON object with keys among {', '.join(sorted(BEHAVIOUR_KEYS))}")
    os.makedirs(args.dir, mode=0o755, exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)
    os.chmod(temporary, 0o644)  # the app may run as another user (DynamicUser on the lab's VMs)
    os.replace(temporary, path)
    return 0


class Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler in the main thread, which is in serve_forever."""


def _stop(signum: int, frame: object) -> None:
    raise Stop


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["behave"]:
        return behave(words[1:])
    args = parse_args(words)
    app = build_app(args)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    server_class = AppTCPServer if args.protocol == "tcp" else AppHTTPServer
    try:
        server = server_class((args.bind, args.port), app)
        try:
            print(f"{args.service} {args.version} listening on {args.bind}:{args.port} ({args.protocol})",
                  flush=True)
            server.serve_forever(poll_interval=0.2)
        finally:
            server.server_close()
    except Stop:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
