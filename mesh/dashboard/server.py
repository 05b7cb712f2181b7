"""The controller's loopback web server: `GET /` the dashboard page, `GET /api/dashboard` its JSON (view.py),
`GET /api/traces` the trace store's answers (mesh.traces.api), `GET /api/controller` who this controller is.

Bound to 127.0.0.1 only (`mesh dashboard` reaches it through an SSH tunnel); a request naming another Host than
a loopback one is refused (a web page elsewhere cannot read it through DNS rebinding). It owns HTTP; what the
answers say is view.py's and mesh.traces'. Every controller runs one, leader or standby.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

LISTEN_ADDRESS = "127.0.0.1"
PAGE = "index.html"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

Answer = tuple[int, Mapping[str, Any]]
Dashboard = Callable[[], Mapping[str, Any]]
Traces = Callable[[Mapping[str, str]], Answer]
Identity = Callable[[], Mapping[str, Any]]


def page_html() -> bytes:
    """The dashboard page as shipped in the package (mesh/dashboard/static/index.html)."""
    return (resources.files("mesh.dashboard") / "static" / PAGE).read_bytes()


def loopback_host(header: str | None) -> bool:
    """Whether a Host header names this machine's loopback (any port): what a browser sends through the tunnel."""
    if not header:
        return True  # HTTP/1.0 clients (curl --http1.0) send none
    name = header.strip().lower()
    if name.startswith("["):
        name = name[:name.find("]") + 1]
    else:
        name = name.split(":", 1)[0]
    return name in LOOPBACK_NAMES


class DashboardServer:
    """A ThreadingHTTPServer on 127.0.0.1:port in a daemon thread; `start()` binds (OSError when the port is
    taken), `stop()` closes. port 0 picks a free port (tests): `.port` says which."""

    def __init__(self, port: int, dashboard: Dashboard, traces: Traces | None = None,
                 identity: Identity | None = None, page: Callable[[], bytes] = page_html,
                 poll_interval: float = 0.5) -> None:
        self.wanted_port = port
        self.poll_interval = poll_interval  # how soon stop() is noticed
        self.dashboard = dashboard
        self.traces = traces
        self.identity: Identity = identity or dict
        self.page = page()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else 0

    def start(self) -> DashboardServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server = ThreadingHTTPServer((LISTEN_ADDRESS, self.wanted_port), Handler)
        server.daemon_threads = True
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": self.poll_interval},
                                       name="dashboard-web", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    def answer(self, path: str, query: Mapping[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET. Errors are JSON `{"error": ...}`."""
        if path in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html; charset=utf-8", self.page
        if path == "/favicon.ico":
            return HTTPStatus.NO_CONTENT, "image/x-icon", b""
        if path == "/api/dashboard":
            return _json(HTTPStatus.OK, self.dashboard())
        if path == "/api/controller":
            return _json(HTTPStatus.OK, self.identity())
        if path == "/api/traces":
            if self.traces is None:
                return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "this controller keeps no traces"})
            status, body = self.traces(query)
            return _json(status, body)
        return _json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})


def _json(status: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, separators=(",", ":")).encode()


class _Handler(BaseHTTPRequestHandler):
    server_owner: DashboardServer
    protocol_version = "HTTP/1.1"  # keep-alive: a page polling every 2 s reuses its connection
    server_version = "mesh-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        if not loopback_host(self.headers.get("Host")):
            self._send(*_json(HTTPStatus.FORBIDDEN, {"error": "the dashboard answers loopback names only"}))
            return
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        try:
            status, kind, body = self.server_owner.answer(parts.path, query)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 (the controller goes on); its log says it
            import structlog

            structlog.get_logger().exception("dashboard_request_failed", path=parts.path, error=str(exc))
            status, kind, body = _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
        self._send(status, kind, body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._send(*_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "the dashboard is read-only: GET only"}))

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a page polls every 2 s; the controller's journal is not an access log."""
