"""The controller's traces: `Controller.traces` always exists; run() starts the span receiver on spec.trace_port
(served with the controller's own certificate, clients checked against ControllerOptions.root_cert) whether or not
it leads, and stopping the controller closes it; a reload (SIGHUP) that changes trace_port starts, stops or moves it.
trace_port 0 (no mesh collector): no receiver."""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path

from test_span_receiver_envoy import mesh_leaf

from mesh.config.tracing import ZIPKIN_PATH
from mesh.controller.daemon import Controller, ControllerOptions
from mesh.controller.spec import ControllerSpec
from mesh.pki import CertificateAuthority
from mesh.testing.fake_ctl import (
    TRUST_DOMAIN,
    FakeCtlHost,
    FakeCtlTransport,
    controller_spec,
    host_spec,
    proxy_spec,
)
from mesh.testing.fake_ctl import web_files as fake_web_files
from mesh.testing.loopback import eventually, free_port
from mesh.traces.store import TraceStore


class Standby:
    """A lock this controller never gets: the receiver runs on standbys too."""

    def step(self) -> bool:
        return False

    def holds(self) -> bool:
        return False

    def release(self) -> None:
        pass


class NoStore:
    def deploy_locked(self) -> bool:
        return False

    def put(self, key: str, value: str) -> None:
        pass

    def values(self, prefix: str) -> list[bytes]:
        return []


def controller(tmp_path: Path, trace_port: int,
               specs: list[ControllerSpec] | None = None) -> tuple[Controller, CertificateAuthority, Path]:
    """A standby controller; `specs`, when given, receives the spec and is what every (re)load reads (its last)."""
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    issuer = authority.controller_issuer()
    assert issuer is not None
    ca = tmp_path / "controller-ca"
    ca.mkdir()
    (ca / "intermediate.pem").write_bytes(issuer.cert_pem)
    (ca / "intermediate.key").write_bytes(issuer.key_pem)
    (ca / "root.pem").write_bytes(authority.root_pem)
    files = fake_web_files(tmp_path / "vm1" / "web")
    spec = replace(controller_spec((host_spec("vm1", (proxy_spec(files),)),)), trace_port=trace_port)

    held = specs if specs is not None else []
    held.append(spec)

    def loaded() -> ControllerSpec:
        return held[-1]

    options = ControllerOptions(intermediate_cert=str(ca / "intermediate.pem"),
                                intermediate_key=str(ca / "intermediate.key"), root_cert=str(ca / "root.pem"),
                                holder="ctl-test", serve_metrics=False)
    made = Controller(loaded, options, transport=FakeCtlTransport({"vm1": FakeCtlHost("vm1")}),
                      validate=lambda _files: None, leader=lambda _spec, _holder: Standby(),
                      store=lambda _spec: NoStore(), watch=False)
    return made, authority, ca / "root.pem"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_standby_controller_receives_spans_on_its_trace_port_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    running, authority, root = controller(tmp_path, port)
    assert isinstance(running.traces, TraceStore)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: _listening(port) or None, 10, "the span receiver listening")
        client = mesh_leaf(authority, f"spiffe://{TRUST_DOMAIN}/svc/web", tmp_path / "web", "web")
        context = ssl.create_default_context(cafile=str(root))
        context.check_hostname = False
        context.load_cert_chain(str(client.chain), str(client.key))
        trace_id = secrets.token_hex(16)
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        connection.request("POST", ZIPKIN_PATH, body=json.dumps(
            [{"traceId": trace_id, "id": secrets.token_hex(8), "timestamp": 1, "duration": 1}]).encode())
        assert connection.getresponse().status == 202
        connection.close()
        assert len(running.traces.trace(trace_id)) == 1
    finally:
        running.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    deadline = time.monotonic() + 5
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _listening(port)


def test_no_trace_port_means_no_receiver(tmp_path: Path) -> None:
    running, _authority, _root = controller(tmp_path, 0)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        assert running.span_receiver is None and running.traces.counts().spans == 0
    finally:
        running.stop()
        thread.join(timeout=30)


def test_a_reload_starts_and_stops_the_receiver_as_trace_port_says(tmp_path: Path) -> None:
    """Turning mesh_tracing on or off changes only spec.json: the deploy reloads the controller (SIGHUP)."""
    specs: list[ControllerSpec] = []
    running, _authority, _root = controller(tmp_path, 0, specs)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    port = free_port()
    try:
        specs.append(replace(specs[-1], trace_port=port))
        running.request_reload()
        eventually(lambda: _listening(port) or None, 10, "the span receiver listening after the reload")
        specs.append(replace(specs[-1], trace_port=0))
        running.request_reload()
        eventually(lambda: (not _listening(port)) or None, 10, "the span receiver closed after the reload")
        assert running.span_receiver is None
    finally:
        running.stop()
        thread.join(timeout=30)
