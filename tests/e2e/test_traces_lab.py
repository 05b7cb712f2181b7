"""End to end on the lab (issue 22): `mesh trace` shows one request's path across every HTTP hop.

- With mesh's own collector (inventory/lab.yaml: `mesh_tracing: {sampling: 100}`): a request sent to web's app on
  vm1 with a B3 header (a trace id the test made) and one with a W3C `traceparent` each stay one trace under that
  trace id: web's outbound span (CLIENT, on vm1, the child of the span id the test sent) and the answering api
  instance's inbound span (SERVER, on vm2 or dock1's container), whose parent is web's span; `mesh trace
  <request id> --json` and `mesh trace <trace id>` both show it from the collector. A request with neither header
  (and no x-request-id: web's Envoy makes one, api's app reports it) is one trace too, found by that id, and
  `mesh trace --last 5 --service api` lists it. db is TCP: no span there. A caller's own request id that is not a
  UUID, with no trace header, is not sampled by Envoy: `mesh trace` finds its hops in the access logs.
- With no `mesh_tracing` (an inventory copy deployed), `mesh trace <request id>` rebuilds the same hops from the
  access logs; inventory/lab.yaml is deployed again at the end, whatever happened.

Envoy's Zipkin tracer sends its spans every few seconds, so every wait here is generous and nothing is timed. A
request sent soon after tracing was turned back on may be served by api's old, untraced listener (web's Envoy
keeps pooled connections to it while Envoy drains it, gradually): sent_and_traced then sends another.
The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab) and leaves inventory/lab.yaml
deployed.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import INVENTORY, Run, inventory_copy, run_mesh, sh, shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import chain_ok, lab_state_dir

from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory

DEPLOY_TIMEOUT = 900.0
TRACE_WAIT = 90.0  # generous: Envoy's Zipkin tracer flushes its spans every 5 s by default
ATTEMPT_WAIT = 30.0  # for one request of several (sent_and_traced)
ATTEMPTS = 4
WEB_PORT = 8080  # web's demo app on vm1, asked on loopback as a user would
API_HOSTS = ("vm2", "dock1")

Json = dict[str, Any]


# ---- asking web, and mesh trace ----------------------------------------------------------------------------

def web_hops(lab: LabUp, headers: dict[str, str]) -> list[Json]:
    """What web's app on vm1 answers (its hops: web, api, db), asked with these headers; it must answer."""
    options = " ".join(f"-H {shlex.quote(f'{name}: {value}')}" for name, value in headers.items())
    done = sh(lab, "vm1", f"curl -sS --max-time 10 {options} http://127.0.0.1:{WEB_PORT}/", timeout=20)
    assert done.returncode == 0, f"web on vm1 did not answer: {done.stderr}"
    hops = json.loads(done.stdout).get("hops")
    assert chain_ok(hops), f"web on vm1 did not answer web -> api -> db: {done.stdout}"
    return list(hops)


def mesh_trace(*args: str, inventory: Path = INVENTORY) -> Run:
    return run_mesh("trace", "-i", str(inventory), *args, timeout=120)


def traces_of(run: Run) -> list[Json]:
    assert run.code in (0, 1, 2), f"mesh trace failed:\n{run}"
    return list(json.loads(run.stdout)["traces"])


def complete(traces: list[Json], source: str) -> bool:
    """One trace from `source` holding web's span and api's (Envoy may send them apart)."""
    return (len(traces) == 1 and traces[0]["source"] == source
            and {span["service"] for span in traces[0]["spans"]} >= {"web", "api"})


def traced(request_id: str, source: str = "collector", inventory: Path = INVENTORY,
           timeout: float = TRACE_WAIT) -> Json:
    """The trace `mesh trace <request id> --json` shows, once it shows web's and api's spans from `source`."""
    found = wait_for(lambda: traces_of(mesh_trace(request_id, "--json", inventory=inventory)),
                     lambda traces: complete(traces, source), f"the trace of request {request_id} from the {source}",
                     timeout=timeout, interval=2.0)
    return found[0]


@dataclass(frozen=True)
class Sent:
    """One request sent to web: its request id, web's answer, and the trace ids the test put in its header."""

    request_id: str
    hops: list[Json]
    trace_id: str | None = None
    parent: str | None = None


def sent_and_traced(send: Callable[[], Sent]) -> tuple[Sent, Json]:
    """A request (sent by `send`, with new ids each time) and its whole trace from the collector. When the lab's
    tracing was off a moment ago (this module's last test, in an earlier run, or another module), web's Envoy
    still holds pooled connections to api's old inbound listener, untraced, which Envoy drains gradually: a
    request that went through one has no api span, and another request is sent (ATTEMPTS at most)."""
    missed = []
    for attempt in range(1, ATTEMPTS + 1):
        sent = send()
        try:
            trace = traced(sent.request_id, timeout=ATTEMPT_WAIT)
        except AssertionError as exc:
            missed.append(str(exc)[:400])
            continue
        print(f"request {sent.request_id}: its whole trace at attempt {attempt}")
        return sent, trace
    raise AssertionError(f"none of {ATTEMPTS} requests went the whole way traced:\n" + "\n".join(missed))


@dataclass(frozen=True)
class Hop:
    web: Json
    api: Json


def web_and_api(trace: Json, same_trace: bool = True) -> Hop:
    """web's outbound CLIENT span on vm1 and api's inbound SERVER span on vm2 or dock1, and nothing else."""
    spans = trace["spans"]
    assert sorted((span["service"], span["kind"]) for span in spans) == [("api", "SERVER"), ("web", "CLIENT")], \
        json.dumps(spans, indent=1)
    web = next(span for span in spans if span["service"] == "web")
    api = next(span for span in spans if span["service"] == "api")
    assert (web["tags"]["mesh.direction"], web["tags"]["mesh.host"]) == ("outbound", "vm1"), web
    assert web["tags"].get("mesh.upstream") == "api", web
    assert api["tags"]["mesh.direction"] == "inbound" and api["tags"]["mesh.host"] in API_HOSTS, api
    assert api["parent_id"] == web["span_id"], "api's span is not the child of web's"
    if same_trace:
        assert api["trace_id"] == web["trace_id"] == trace["trace_id"]
    return Hop(web, api)


def answering_api(hops: list[Json]) -> str:
    return str(hops[1]["host"])


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        yield up


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    tracing = check_inventory(load_inventory(str(INVENTORY)), str(INVENTORY)).mesh.settings.tracing
    assert tracing is not None and tracing.collector == "mesh" and tracing.sampling == 100, \
        f"{INVENTORY} does not send every request's spans to mesh's collector: {tracing}"
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    if run.code != 0:
        pytest.fail(f"the deploy failed, so there are no traces to read:\n{run}")
    wait_for(lambda: sh(lab, "vm1", f"curl -sS --max-time 10 http://127.0.0.1:{WEB_PORT}/").stdout,
             lambda text: '"db"' in text and '"error"' not in text, "web -> api -> db after the deploy", timeout=120)
    return lab


# ---- with mesh's collector ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["b3", "traceparent"])
def test_a_request_with_a_trace_header_stays_one_trace_under_that_id(deployed: LabUp, header: str) -> None:
    def send() -> Sent:
        trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        request_id = f"mesh-e2e-trace-{header}-{uuid.uuid4().hex[:12]}"
        value = f"{trace_id}-{parent}-1" if header == "b3" else f"00-{trace_id}-{parent}-01"
        return Sent(request_id, web_hops(deployed, {header: value, "x-request-id": request_id}), trace_id, parent)

    sent, trace = sent_and_traced(send)
    request_id, hops, trace_id, parent = sent.request_id, sent.hops, sent.trace_id, sent.parent
    assert trace["trace_id"] == trace_id and trace["request_ids"] == [request_id]
    found = web_and_api(trace)
    assert found.web["parent_id"] == parent, f"web's span does not continue the {header} header's span"
    assert found.api["tags"]["mesh.host"] == answering_api(hops)
    assert found.web["tags"]["guid:x-request-id"] == found.api["tags"]["guid:x-request-id"] == request_id
    tree = {node["span_id"]: node for node in trace["tree"]}
    assert tree[found.api["span_id"]]["depth"] == 1 and tree[found.web["span_id"]]["depth"] == 0

    by_trace_id = mesh_trace(trace_id)
    assert by_trace_id.code == 0, str(by_trace_id)
    lines = by_trace_id.stdout.splitlines()
    assert lines[0] == (f"trace {trace_id} · request {request_id} · 2 spans · "
                        f"{trace['duration_us'] / 1000:.1f} ms · from the collector"), by_trace_id.stdout
    assert lines[1].split() == ["SERVICE", "DIRECTION", "WHERE", "REQUEST", "STATUS", "TOTAL", "SELF", "START"]
    assert lines[2].split()[:3] == ["web", "outbound", "vm1"], by_trace_id.stdout
    assert lines[3].split()[:3] == ["└─", "api", "inbound"], by_trace_id.stdout
    assert lines[3].split()[3].split("/")[0] == answering_api(hops) and "GET /" in lines[3]


def test_a_request_with_no_headers_is_one_trace_found_by_the_id_envoy_made(deployed: LabUp) -> None:
    def send() -> Sent:
        hops = web_hops(deployed, {})
        assert "request_id" not in hops[0], "web's app got a request id it was not sent"
        request_id = str(hops[1].get("request_id") or "")
        assert request_id, f"api's app saw no request id from web's Envoy: {hops}"
        return Sent(request_id, hops)

    sent, trace = sent_and_traced(send)
    request_id, hops = sent.request_id, sent.hops
    found = web_and_api(trace)
    assert found.web["parent_id"] is None  # the trace starts at web's Envoy
    assert found.api["tags"]["mesh.host"] == answering_api(hops)

    latest = mesh_trace("--last", "5", "--service", "api", "--json")
    assert latest.code == 0, str(latest)
    assert trace["trace_id"] in [item["trace_id"] for item in traces_of(latest)], latest.stdout
    assert all(any(span["service"] == "api" for span in item["spans"]) for item in traces_of(latest))
    text = mesh_trace("--last", "5", "--service", "api")
    assert f"trace {trace['trace_id']} · request {request_id} · 2 spans" in text.stdout, str(text)


def test_a_callers_own_request_id_envoy_does_not_sample_is_found_in_the_access_logs(deployed: LabUp) -> None:
    """Envoy draws its sampling decision from a UUID request id's digits: a caller's own id that is not a UUID,
    with no sampled b3 or traceparent header, sends no span. `mesh trace` finds its hops in the access logs,
    still under one trace id (Envoy propagates the unsampled trace), and says where it looked."""
    request_id = f"mesh-e2e-trace-own-{uuid.uuid4().hex[:12]}"
    hops = web_hops(deployed, {"x-request-id": request_id})
    trace = traced(request_id, source="access logs")
    found = web_and_api(trace, same_trace=False)  # api's line has no trace id if its old listener served it
    assert found.api["tags"]["mesh.host"] == answering_api(hops)
    assert found.web["trace_id"] and trace["trace_id"] == found.web["trace_id"], \
        "web's access line of an unsampled request carries no trace id"
    shown = mesh_trace(request_id)
    assert shown.code == 0 and f"the collector (ctl1, ctl2) holds no trace of {request_id}" in shown.stderr, \
        str(shown)


# ---- without a collector -----------------------------------------------------------------------------------

def test_without_a_collector_the_hops_come_from_the_access_logs(deployed: LabUp, tmp_path: Path) -> None:
    def no_tracing(document: Json) -> None:
        document["all"]["vars"].pop("mesh_tracing", None)

    copy = inventory_copy(tmp_path / "no-tracing", lab_state_dir(), edit=no_tracing)
    try:
        run = run_mesh("deploy", str(copy), timeout=DEPLOY_TIMEOUT)
        assert run.code == 0, f"the deploy without mesh_tracing failed:\n{run}"
        request_id = f"mesh-e2e-trace-logs-{uuid.uuid4().hex[:12]}"
        hops = web_hops(deployed, {"x-request-id": request_id})
        trace = traced(request_id, source="access logs", inventory=copy)
        spans = trace["spans"]
        assert [(span["service"], span["kind"], span["tags"]["mesh.direction"]) for span in spans] == [
            ("web", "CLIENT", "outbound"), ("api", "SERVER", "inbound")], json.dumps(spans, indent=1)
        assert spans[0]["tags"]["mesh.host"] == "vm1" and spans[1]["tags"]["mesh.host"] == answering_api(hops)
        assert spans[1]["parent_id"] == spans[0]["span_id"]
        # web's Envoy traces no more (its app opens a new connection per call, served by the new listener); api's
        # inbound line may still carry a trace id for a while: web's Envoy keeps its pooled connections to api's
        # old listener, which Envoy drains gradually
        assert spans[0]["trace_id"] == "", "web's Envoy still traces after a deploy without mesh_tracing"

        shown = mesh_trace(request_id, inventory=copy)
        assert shown.code == 0, str(shown)
        lines = shown.stdout.splitlines()
        head = f"trace {trace['trace_id'] or '-'} · request {request_id} · 2 spans · "
        assert lines[0].startswith(head) and lines[0].endswith(" · from the access logs"), shown.stdout
        assert lines[2].split()[:3] == ["web", "outbound", "vm1"] and lines[3].split()[:3] == ["└─", "api", "inbound"]

        missing = mesh_trace(f"mesh-e2e-no-such-{uuid.uuid4().hex[:8]}", "--since", "5m", inventory=copy)
        assert missing.code == 2 and missing.stdout == "", str(missing)
        assert "in the access logs of vm1, vm2, dock1 in the last 5m" in missing.stderr, str(missing)
    finally:
        back = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
        assert back.code == 0, f"inventory/lab.yaml could not be deployed again:\n{back}"
