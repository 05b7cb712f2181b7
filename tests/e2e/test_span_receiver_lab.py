"""End to end on the lab (issue 22): mesh's own span collector runs on every controller after a deploy.

inventory/lab.yaml has `mesh_tracing: {sampling: 100}`: after `mesh deploy inventory/lab.yaml`, ctl1 and ctl2 each
listen on 9411 (the controller's process), a request through web (curl on vm1 to web's app) leaves web's outbound
span and api's inbound span, whose parent is web's, in the controllers' stores, read through each controller's
loopback traces API (`127.0.0.1:9191/api/traces`, as `mesh trace` reads it through SSH). From consul1 (no mesh
identity), a TLS client presenting mesh's certificate for a workload gets an HTTP answer, while one with no client
certificate, one from another CA, and one from mesh's CA outside the trust domain get none.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock (shared_lab) and leaves inventory/lab.yaml deployed.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import INVENTORY, out, sh, shared_lab, tls_from, wait_for
from lab_helpers import LabUp
from rollout_helpers import chain_ok, deploy, lab_state_dir

from mesh.config.tracing import TRACE_PORT
from mesh.controller.spec import DEFAULT_WEB_PORT
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.testing.certs import MeshCAProbeIssuer
from mesh.testing.health_endpoint import TestCA

CONTROLLERS = ("ctl1", "ctl2")
SPAN_WAIT = 90.0  # Envoy's Zipkin tracer flushes every 5 s (or 5 spans): generous, nothing timed
Json = dict[str, Any]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        tracing = check_inventory(load_inventory(str(INVENTORY)), str(INVENTORY)).mesh.settings.tracing
        assert tracing is not None and tracing.collector == "mesh", \
            f"inventory/lab.yaml must use mesh's own collector (mesh_tracing: {{sampling: 100}}), got {tracing}"
        done = deploy()
        assert done.code == 0, f"mesh deploy inventory/lab.yaml failed:\n{done}"
        yield up


@pytest.fixture(scope="module")
def trust_domain() -> str:
    return check_inventory(load_inventory(str(INVENTORY)), str(INVENTORY)).mesh.settings.trust_domain


def traces_on(lab: LabUp, controller: str, query: str) -> list[list[Json]]:
    """What the controller's loopback traces API answers (its own store)."""
    url = f"http://127.0.0.1:{DEFAULT_WEB_PORT}/api/traces?{query}"
    done = sh(lab, controller, f"curl -sS --max-time 5 {shlex.quote(url)}")
    assert done.returncode == 0, f"{controller}'s traces API did not answer: {done.stderr}"
    return list(json.loads(done.stdout)["traces"])


def spans_of_request(lab: LabUp, request_id: str) -> dict[str, list[Json]]:
    """controller -> the spans of the request's trace(s) it holds."""
    return {controller: [span for trace in traces_on(lab, controller, f"request_id={request_id}") for span in trace]
            for controller in CONTROLLERS}


def test_every_controller_listens_on_the_trace_port_in_its_own_process(lab: LabUp) -> None:
    for controller in CONTROLLERS:
        listening = out(lab, controller, f"ss -Hltnp 'sport = :{TRACE_PORT}'")
        assert f"0.0.0.0:{TRACE_PORT}" in listening and "python" in listening, f"{controller}: {listening!r}"
        pid = out(lab, controller, "systemctl show -p MainPID --value mesh-controller.service").strip()
        assert f"pid={pid}," in listening, f"{controller}: 9411 is not the controller's (pid {pid}): {listening!r}"


def test_a_request_through_web_leaves_web_s_and_api_s_spans_at_the_controllers(lab: LabUp) -> None:
    request_id = str(uuid.uuid4())
    done = sh(lab, "vm1", f"curl -sS --max-time 10 -H 'x-request-id: {request_id}' http://127.0.0.1:8080/",
              timeout=20)
    assert done.returncode == 0 and chain_ok(json.loads(done.stdout).get("hops")), \
        f"web on vm1 did not answer web -> api -> db: {done.stdout}{done.stderr}"

    def both(found: dict[str, list[Json]]) -> bool:
        services = {(span["service"], span["kind"]) for spans in found.values() for span in spans}
        return {("web", "CLIENT"), ("api", "SERVER")} <= services

    found = wait_for(lambda: spans_of_request(lab, request_id), both,
                     f"web's and api's spans of request {request_id} at a controller", timeout=SPAN_WAIT, interval=2.0)
    spans = [span for held in found.values() for span in held]
    [web] = [span for span in spans if (span["service"], span["kind"]) == ("web", "CLIENT")]
    [api] = [span for span in spans if (span["service"], span["kind"]) == ("api", "SERVER")]
    assert api["trace_id"] == web["trace_id"] and api["parent_id"] == web["span_id"], (web, api)
    assert web["tags"]["guid:x-request-id"] == request_id  # as sent: Envoy packs no trace reason into it
    assert api["tags"]["mesh.host"] in ("vm2", "dock1") and web["tags"]["mesh.host"] == "vm1"
    print("spans per controller:", {controller: len(held) for controller, held in found.items()})


def test_the_receiver_answers_only_clients_with_a_mesh_identity(lab: LabUp, trust_domain: str,
                                                                tmp_path: Path) -> None:
    mesh_ca = MeshCAProbeIssuer(lab_state_dir())
    address = lab.hosts["ctl1"]

    def probe(client: Any) -> Any:
        return tls_from(lab, "consul1", address, TRACE_PORT, "http", mesh_ca.root_file, client)

    # the control: a workload's certificate from mesh's CA gets an HTTP answer (404: GET / is no span endpoint),
    # so the refusals below are the certificate's doing, not the network's
    valid = probe(mesh_ca.issue(f"spiffe://{trust_domain}/svc/web", tmp_path, "valid"))
    assert valid.handshake and valid.http_status() == 404, valid
    refused = {
        "no client certificate": probe(None),
        "a certificate from another CA": probe(TestCA(tmp_path / "other", "other CA").issue(
            f"spiffe://{trust_domain}/svc/web", "other-ca")),
        "a mesh-CA certificate of another trust domain": probe(
            mesh_ca.issue("spiffe://other.mesh/svc/web", tmp_path, "foreign")),
    }
    answered = {case: seen for case, seen in refused.items() if seen.answer}
    assert not answered, f"ctl1:{TRACE_PORT} answered: {answered}"
