"""The demo app run for real on 127.0.0.1: a web -> api -> db chain, the request id and trace headers passed
on to upstreams, an unreachable upstream, db's line protocol, /healthz, keep-alive and a clean SIGTERM. Each
instance is a child process this test ends by PID.
"""

from __future__ import annotations

import ast
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import mesh.lab.demoapp

SCRIPT = Path(mesh.lab.demoapp.__file__)
Start = Callable[..., int]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def start(procs: list[subprocess.Popen[bytes]]) -> Start:
    def run(service: str, *flags: str, host: str = "vm1", **options: str) -> int:
        port = free_port()
        argv = [sys.executable, str(SCRIPT), "--service", service, "--port", str(port), "--bind", "127.0.0.1",
                "--host", host, *flags]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", value]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_listening(port, proc)
        return port

    return run


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_chain_web_api_db(start: Start) -> None:
    db = start("db", "--protocol", "tcp", host="vm3")
    api = start("api", "--upstream", f"db=127.0.0.1:{db}", host="dock1", version="v2", instance="api-v2-1",
                kind="container")
    web = start("web", "--upstream", f"api=127.0.0.1:{api}", host="vm1")
    status, body = get(web, "/some/path")
    assert status == 200
    assert json.loads(body) == {"hops": [
        {"service": "web", "version": "v1", "host": "vm1", "instance": "vm1", "kind": "vm"},
        {"service": "api", "version": "v2", "host": "dock1", "instance": "api-v2-1", "kind": "container"},
        {"service": "db", "version": "v1", "host": "vm3", "instance": "vm3", "kind": "vm"},
    ]}  # fmt: skip


TRACE_HEADERS = {
    "x-request-id": "6f1c2b7e-0d3a-4c55-9e2f-3a1b5c7d9e01",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=opaque",
    "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-b3-parentspanid": "05e3ac9a4f6e3b90",
    "x-b3-sampled": "1",
    "x-b3-flags": "0",
}


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """An upstream in this process that answers one hop and keeps the headers of every request it got."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({name.lower(): value for name, value in self.headers.items()})
            body = b'{"hops": [{"service": "recorder"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()
    thread.join()


def test_request_id_and_trace_headers_go_to_every_upstream(start: Start,
                                                          recorder: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = recorder
    db = start("db", "--protocol", "tcp", host="vm3")
    api = start("api", "--upstream", f"rec=127.0.0.1:{port}", "--upstream", f"db=127.0.0.1:{db}", host="vm2")
    web = start("web", "--upstream", f"api=127.0.0.1:{api}", host="vm1")
    status, body = get(web, "/", headers={**TRACE_HEADERS, "X-Other": "not forwarded", "Cookie": "a=b"})
    assert status == 200
    hops = json.loads(body)["hops"]
    assert [(hop["service"], hop.get("request_id")) for hop in hops] == [
        ("web", TRACE_HEADERS["x-request-id"]), ("api", TRACE_HEADERS["x-request-id"]), ("recorder", None),
        ("db", None)]  # db speaks TCP lines: no headers, no request id
    assert len(seen) == 1
    assert {name: seen[0].get(name) for name in TRACE_HEADERS} == TRACE_HEADERS
    assert "x-other" not in seen[0] and "cookie" not in seen[0]


def test_headers_are_passed_on_as_received_and_absent_ones_stay_absent(
        start: Start, recorder: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = recorder
    web = start("web", "--upstream", f"rec=127.0.0.1:{port}")
    status, body = get(web, "/", headers={"X-B3-Sampled": "0", "TraceParent": "00-ab-cd-00"})
    assert status == 200
    assert "request_id" not in json.loads(body)["hops"][0]
    assert {name: value for name, value in seen[0].items() if name in mesh.lab.demoapp.FORWARDED_HEADERS} == {
        "x-b3-sampled": "0", "traceparent": "00-ab-cd-00"}


def test_unreachable_upstream_gives_an_error_hop(start: Start) -> None:
    dead = free_port()
    web = start("web", "--upstream", f"api=127.0.0.1:{dead}", "--upstream", f"db=127.0.0.1:{dead}")
    hops = json.loads(get(web)[1])["hops"]
    assert [hop["service"] for hop in hops] == ["web", "api", "db"]
    assert hops[1]["error"] == f"127.0.0.1:{dead}: connection refused"
    assert "error" in hops[2] and "version" not in hops[2]


def test_upstream_answering_non_200_is_an_error_hop(start: Start) -> None:
    db = start("db", "--protocol", "tcp")
    # db speaks TCP lines, not HTTP: asked over HTTP it answers garbage, which must become an error hop
    web = start("web", "--upstream", f"api=127.0.0.1:{db}", "--upstream-protocol", "api=http")
    hops = json.loads(get(web)[1])["hops"]
    assert hops[1]["service"] == "api" and "error" in hops[1]


def test_tcp_line_protocol(start: Start) -> None:
    db = start("db", "--protocol", "tcp", host="vm3")
    with socket.create_connection(("127.0.0.1", db), timeout=5) as conn:
        reader = conn.makefile("rb")
        for _ in range(3):
            conn.sendall(b"anything\n")
            assert json.loads(reader.readline()) == {
                "service": "db", "version": "v1", "host": "vm3", "instance": "vm3", "kind": "vm"}


def test_healthz_and_keep_alive(start: Start) -> None:
    web = start("web")
    connection = http.client.HTTPConnection("127.0.0.1", web, timeout=5)
    started = time.monotonic()
    for _ in range(20):
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"ok\n")
    connection.close()
    assert time.monotonic() - started < 0.5  # 40 ms per request would mean Nagle is back


def test_sigterm_exits_cleanly(start: Start, procs: list[subprocess.Popen[bytes]]) -> None:
    start("web")
    procs[-1].send_signal(signal.SIGTERM)
    assert procs[-1].wait(timeout=5) == 0


def test_script_imports_only_the_standard_library() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {str(node.module).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - {"__future__"} <= sys.stdlib_module_names


XFCC = 'By=spiffe://lab.mesh/svc/api;Hash=5a3c;Subject="";URI=spiffe://lab.mesh/svc/web'


def test_a_hop_names_the_client_certificate_header_it_received_and_passes_it_on_to_no_upstream(
        start: Start, recorder: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = recorder
    api = start("api", "--upstream", f"rec=127.0.0.1:{port}", host="vm2")
    status, body = get(api, "/orders", headers={"X-Forwarded-Client-Cert": XFCC})
    assert status == 200
    hops = json.loads(body)["hops"]
    assert hops[0]["client_cert"] == XFCC
    assert "client_cert" not in hops[1]
    assert "x-forwarded-client-cert" not in seen[0]  # each hop reports what its own proxy told it


def test_a_request_without_a_client_certificate_header_has_no_client_cert_in_its_hop(start: Start) -> None:
    web = start("web", host="vm1")
    status, body = get(web, "/")
    assert status == 200
    assert json.loads(body)["hops"] == [
        {"service": "web", "version": "v1", "host": "vm1", "instance": "vm1", "kind": "vm"}]
