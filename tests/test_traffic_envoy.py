"""Traffic policies with real Envoys on loopback (no lab): `web` (127.0.0.2) calls `api`, which runs v1
(127.0.0.3) and v2.1 (127.0.0.4); each api app answers with its version and keeps what it received.

Every policy change is applied the way the deploy applies it: the proxies' files rendered again from the new
policy, and only the files that changed moved into place (checked by Envoy first, each waited for until the
running Envoy took it). Each change is a route file only (never a listener, cluster or bootstrap), and then:
a weighted split lands within 5 sigma, a header match picks v2, an abort fault hits its share and a header-scoped
one only the requests that carry the header, a delay holds each request, a rate limit answers 429 past its bucket,
a mirror sends copies to v2 while the caller sees v1, web's Prometheus text labels each version cluster's
requests with destination_version, with zones web keeps to its zone until the instance there fails, retries hide
an instance failing every other request, a per-route timeout cuts slow requests, a circuit breaker rejects
overflow with 503 (its overflow counter rises) and outlier detection ejects an instance answering 500s.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.config import compute_proxy_config
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.inventory.policy import (
    Abort,
    CircuitBreaker,
    Delay,
    Fault,
    HashOn,
    LoadBalancing,
    Mirror,
    OutlierPolicy,
    PathMatch,
    RateLimit,
    Retries,
    RouteMatch,
    RouteRule,
    ServicePolicy,
)
from mesh.pki import CertificateAuthority
from mesh.render import ProxyFiles, render_proxy_files, validate_proxy_files
from mesh.testing.loopback import (
    Identity,
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    move_into_place,
    proxy_config_in,
    start_proxy,
    stop_envoys,
)
from tests.unit.test_traffic_config import RICH_API, traffic_mesh

TRUST_DOMAIN = "loop.mesh"
WEB, API_V1, API_V2 = "web", "api-v1", "api-v2"
ADDRESSES = {WEB: "127.0.0.2", API_V1: "127.0.0.3", API_V2: "127.0.0.4"}
VERSIONS = {API_V1: "v1", API_V2: "v2.1"}  # v2.1's '.' is '_' in stat names and labels
WAIT_S = 30.0
SIGMAS = 5


# --- the api apps: answer with their version, keep every request but health checks ---

@dataclass
class Received:
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    healthy: bool = True  # what the app's /healthz says (its other answers do not change)
    fail_every: int = 0  # answer 500 to every Nth request (0: never)
    slow_s: float = 0.0  # how long requests to /slow... take
    answered: int = 0

    def count(self, **wanted: str) -> int:
        with self.lock:
            return sum(1 for request in self.requests if all(request.get(k) == v for k, v in wanted.items()))


def version_app(version: str, received: Received) -> http.server.ThreadingHTTPServer:
    class Answer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            status = 200
            if self.path == "/healthz":
                status = 200 if received.healthy else 503
            else:
                with received.lock:
                    received.requests.append({"method": self.command, "path": self.path,
                                              "authority": self.headers.get("host", ""),
                                              **{k.lower(): v for k, v in self.headers.items()}})
                    received.answered += 1
                    if received.fail_every and received.answered % received.fail_every == 0:
                        status = 500
                if self.path.startswith("/slow"):
                    time.sleep(received.slow_s)
            body = version.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    return server


# --- the mesh, its files and the running Envoys ---

@dataclass
class TrafficLoop:
    folder: Path
    workloads: dict[str, Workload]
    identities: dict[str, Identity]
    received: dict[str, Received]
    files: dict[str, ProxyFiles] = field(default_factory=dict)
    envoys: dict[str, RunningEnvoy] = field(default_factory=dict)

    def mesh(self, policy: ServicePolicy, zones: bool = False) -> Mesh:
        """web and api v1 in zone a, api v2.1 in zone b (when `zones`)."""
        hosts = tuple(ManagedHost(w.host, "vm", Connection(ADDRESSES[name]), (w,),
                                  zone=("b" if name == API_V2 else "a") if zones else None)
                      for name, w in self.workloads.items())
        services: dict[str, tuple[Workload, ...]] = {}
        for w in self.workloads.values():
            services[w.service] = (*services.get(w.service, ()), w)
        return Mesh(MeshSettings(trust_domain=TRUST_DOMAIN), hosts, (), MappingProxyType(services),
                    policies=MappingProxyType({"api": policy}))

    def render(self, policy: ServicePolicy, zones: bool = False) -> dict[str, ProxyFiles]:
        mesh = self.mesh(policy, zones)
        return {name: render_proxy_files(proxy_config_in(compute_proxy_config(mesh, workload), self.folder / name,
                                                         ADDRESSES[name]))
                for name, workload in self.workloads.items()}

    def apply(self, policy: ServicePolicy, zones: bool = False) -> dict[str, list[str]]:
        """Render every proxy's files for `policy` and move the changed ones into place as a deploy does (Envoy
        checks them, the running Envoy takes each); the file names moved, per proxy."""
        moved: dict[str, list[str]] = {}
        for name, files in self.render(policy, zones).items():
            if files == self.files[name]:
                moved[name] = []
                continue
            paths = move_into_place(files, self.files[name])
            moved[name] = [Path(path).name for path in paths]
            self.files[name] = files
        return moved

    @property
    def outbound_port(self) -> int:
        return self.workloads[WEB].upstreams[0].local_port


def traffic_workloads(api_ports: dict[str, int]) -> dict[str, Workload]:
    second = datetime.timedelta(seconds=1)

    def workload(name: str, service: str, port: int, version: str = "v1", **extra: Any) -> Workload:
        address = ADDRESSES[name]
        return Workload(f"h-{name}", 0, service, port, TRUST_DOMAIN, version=version,
                        proxy_port=free_port(address), admin_port=free_port(), metrics_port=free_port(address),
                        **extra)

    return {
        WEB: workload(WEB, "web", free_port(), upstreams=(Upstream("api", free_port()),)),
        **{name: workload(name, "api", api_ports[name], VERSIONS[name], health=Health("http", "/healthz", second,
                                                                                         second))
           for name in (API_V1, API_V2)},
    }


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrafficLoop]:
    folder = tmp_path_factory.mktemp("traffic")
    received = {name: Received() for name in (API_V1, API_V2)}
    apps = {name: version_app(VERSIONS[name], received[name]) for name in (API_V1, API_V2)}
    with contextlib.ExitStack() as stack:
        for app in apps.values():
            threading.Thread(target=app.serve_forever, daemon=True).start()
            stack.callback(app.server_close)
            stack.callback(app.shutdown)
        workloads = traffic_workloads({name: app.server_address[1] for name, app in apps.items()})
        identities = issue_identities(folder / "state", TRUST_DOMAIN, tuple(workloads.values()))
        # issue_identities keys by service: both api instances share api's identity (same SPIFFE id)
        by_proxy = {name: identities[workload.service] for name, workload in workloads.items()}
        state = TrafficLoop(folder, workloads, by_proxy, received)
        state.files = state.render(ServicePolicy())
        for name, files in state.files.items():
            lay_out_proxy(files, by_proxy[name])
        try:
            for (name, files), base_id in zip(state.files.items(), free_base_ids(len(state.files)), strict=True):
                state.envoys[name] = start_proxy(name, files, base_id)
            # both versions reachable through web's cluster of every instance
            eventually(lambda: {call(state)[1] for _ in range(20)} == {b"v1", b"v2.1"} or None, WAIT_S,
                       "web reaches both api versions", state.envoys[WEB].log)
            yield state
        finally:
            stop_envoys(list(state.envoys.values()))


# --- requests through web's outbound listener ---

class Caller:
    """A keep-alive connection to web's outbound listener, reopened after a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None

    def get(self, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET") \
            -> tuple[int, bytes, float]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                started = time.monotonic()
                self.connection.request(method, path, headers=headers or {})
                response = self.connection.getresponse()
                body = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status, body, time.monotonic() - started
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def call(state: TrafficLoop, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    caller = Caller(state.outbound_port)
    try:
        status, body, _elapsed = caller.get(path, headers)
        return status, body
    finally:
        caller.close()


def within_sigmas(count: int, total: int, share: float) -> bool:
    sigma = math.sqrt(total * share * (1 - share))
    return abs(count - total * share) <= SIGMAS * sigma


def only_routes_moved(moved: dict[str, list[str]], proxy: str, route_file: str) -> None:
    assert moved[proxy] == [route_file], moved
    assert all(not files for name, files in moved.items() if name != proxy), moved


def split(v1: int, v2: int) -> tuple[tuple[str, int], ...]:
    return (("v1", v1), ("v2.1", v2))


# --- the tests (one mesh for the module; each applies the policy it needs) ---

def test_a_weighted_split_lands_within_five_sigma(loop: TrafficLoop) -> None:
    moved = loop.apply(ServicePolicy(routes=(RouteRule(to=split(80, 20)),)))
    only_routes_moved(moved, WEB, "rds.outbound-api.yaml")
    caller, total = Caller(loop.outbound_port), 600
    answers = [caller.get() for _ in range(total)]
    caller.close()
    assert {status for status, _body, _t in answers} == {200}
    to_v2 = sum(1 for _status, body, _t in answers if body == b"v2.1")
    assert within_sigmas(to_v2, total, 0.2), to_v2


def test_a_header_match_sends_exactly_the_matching_requests_to_v2(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(routes=(RouteRule(to=split(0, 100), match=RouteMatch(headers=(("x-canary", "yes"),))),
                                     RouteRule(to=split(100, 0)))))
    caller = Caller(loop.outbound_port)
    marked = [caller.get("/a", {"x-canary": "yes"})[1] for _ in range(30)]
    plain = [caller.get("/a", {"x-canary": "no"})[1] for _ in range(30)]
    caller.close()
    assert set(marked) == {b"v2.1"} and set(plain) == {b"v1"}


def test_an_abort_fault_hits_its_share_and_a_header_scoped_one_only_those_requests(loop: TrafficLoop) -> None:
    moved = loop.apply(ServicePolicy(fault=Fault(abort=Abort(503, 50.0))))
    only_routes_moved(moved, WEB, "rds.outbound-api.yaml")
    caller, total = Caller(loop.outbound_port), 400
    statuses = [caller.get()[0] for _ in range(total)]
    assert set(statuses) == {200, 503}
    assert within_sigmas(statuses.count(503), total, 0.5), statuses.count(503)

    loop.apply(ServicePolicy(fault=Fault(abort=Abort(418, 100.0), when_headers=(("x-test", "1"),))))
    with_header = [caller.get("/", {"x-test": "1"}) for _ in range(20)]
    without = [caller.get("/", {"x-test": "2"})[0] for _ in range(20)]
    caller.close()
    assert {(status, body) for status, body, _t in with_header} == {(418, b"fault filter abort")}
    assert set(without) == {200}


def test_a_delay_fault_holds_every_affected_request(loop: TrafficLoop) -> None:
    caller = Caller(loop.outbound_port)
    loop.apply(ServicePolicy())
    assert max(caller.get()[2] for _ in range(4)) < 0.15
    loop.apply(ServicePolicy(fault=Fault(delay=Delay(300, 100.0))))
    timed = [caller.get() for _ in range(4)]
    caller.close()
    # (Envoy's timers may fire a few ms early)
    assert all(status == 200 and elapsed >= 0.28 for status, _body, elapsed in timed), timed


def test_a_rate_limit_answers_429_past_the_bucket(loop: TrafficLoop) -> None:
    # everything to v1, whose own inbound route gets the bucket: 3 at once, then 1 a second
    moved = loop.apply(ServicePolicy(routes=(RouteRule(to=split(100, 0)),),
                                     rate_limit=RateLimit(requests_per_second=1, burst=3)))
    assert moved[API_V1] == moved[API_V2] == ["rds.inbound.yaml"], moved
    caller = Caller(loop.outbound_port)
    answers = [caller.get()[:2] for _ in range(12)]
    caller.close()
    statuses = [status for status, _body in answers]
    assert 3 <= statuses.count(200) <= 5 and statuses.count(429) >= 7, statuses
    assert statuses[:3] == [200, 200, 200]
    assert (429, b"local_rate_limited") in answers
    counted = dict(line.split(": ") for line in loop.envoys[API_V1].admin("/stats?filter=rate_limit").splitlines())
    assert int(counted["inbound_rate_limit.http_local_rate_limit.rate_limited"]) == statuses.count(429)


def test_a_mirror_sends_copies_to_v2_while_the_caller_sees_v1(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(routes=(RouteRule(to=split(100, 0)),), mirror=Mirror("v2.1", 100.0)))
    before = loop.received[API_V2].count()
    caller, total = Caller(loop.outbound_port), 25
    bodies = [caller.get("/mirrored", {"x-copy": str(index)})[1] for index in range(total)]
    caller.close()
    assert set(bodies) == {b"v1"}
    copies = eventually(lambda: loop.received[API_V2].count(path="/mirrored") >= total or None, WAIT_S,
                        "every copy reaches v2.1", loop.envoys[WEB].log)
    assert copies and loop.received[API_V2].count() - before == total
    with loop.received[API_V2].lock:
        shadowed = [r for r in loop.received[API_V2].requests if r["path"] == "/mirrored"]
    assert all(r["authority"].split(":")[0].endswith("-shadow") for r in shadowed), shadowed[:1]  # marked copies
    assert sorted(int(r["x-copy"]) for r in shadowed) == list(range(total))


def test_version_clusters_count_under_destination_version(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(routes=(RouteRule(to=split(50, 50)),)))
    caller = Caller(loop.outbound_port)
    for _ in range(40):
        caller.get()
    caller.close()
    web = loop.workloads[WEB]

    def samples() -> list[tuple[str, dict[str, str], float]]:
        connection = http.client.HTTPConnection(ADDRESSES[WEB], web.metrics_port, timeout=10)
        try:
            connection.request("GET", "/stats/prometheus")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        return [(sample.name, dict(sample.labels), sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]

    def requests_of(found: list[tuple[str, dict[str, str], float]], cluster: str) -> list[dict[str, str]]:
        return [labels for name, labels, value in found
                if name == "envoy_cluster_upstream_rq_total" and labels.get("envoy_cluster_name") == cluster
                and value >= 1]

    def counted() -> list[tuple[str, dict[str, str], float]] | None:
        found = samples()
        return found if requests_of(found, "outbound|web|v1|api|v2_1") else None

    found = eventually(counted, WAIT_S, "web counts requests to api v2.1", loop.envoys[WEB].log)
    edge = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
    for cluster, version in (("outbound|web|v1|api|v1", "v1"), ("outbound|web|v1|api|v2_1", "v2_1")):
        labelled = requests_of(found, cluster)
        assert labelled, cluster
        assert all(labels.items() >= {**edge, "destination_version": version}.items() for labels in labelled), labelled
    every = requests_of(found, "outbound|web|v1|api")  # the cluster of every instance: no version of its own
    assert every and all("destination_version" not in labels and labels.items() >= edge.items() for labels in every)


def test_zones_keep_traffic_in_the_callers_zone_until_its_instances_fail(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy())
    moved = loop.apply(ServicePolicy(), zones=True)  # endpoints only: the priorities are web's
    assert moved[WEB] == ["eds.upstream-api.yaml", "eds.upstream-api.v1.yaml", "eds.upstream-api.v2.1.yaml"], moved
    assert not moved[API_V1] and not moved[API_V2]
    caller = Caller(loop.outbound_port)
    try:
        # (an endpoint file is not waited for when moved in: Envoy reads it within moments)
        eventually(lambda: {caller.get()[:2] for _ in range(10)} == {(200, b"v1")} or None, WAIT_S,
                   "web keeps to zone a", loop.envoys[WEB].log)
        assert {caller.get()[:2] for _ in range(30)} == {(200, b"v1")}  # zone a only
        loop.received[API_V1].healthy = False  # v1's Envoy reports it down, web's checks see it within ~4 s
        eventually(lambda: {caller.get()[:2] for _ in range(10)} == {(200, b"v2.1")} or None, WAIT_S,
                   "web fails over to zone b", loop.envoys[WEB].log)
        loop.received[API_V1].healthy = True
        eventually(lambda: {caller.get()[:2] for _ in range(10)} == {(200, b"v1")} or None, WAIT_S,
                   "web comes back to zone a", loop.envoys[WEB].log)
    finally:
        loop.received[API_V1].healthy = True
        caller.close()
        loop.apply(ServicePolicy())


@contextlib.contextmanager
def behaving(received: Received, fail_every: int = 0, slow_s: float = 0.0) -> Iterator[None]:
    received.fail_every, received.slow_s, received.answered = fail_every, slow_s, 0
    try:
        yield
    finally:
        received.fail_every, received.slow_s = 0, 0.0


def web_samples(loop: TrafficLoop) -> list[tuple[str, dict[str, str], float]]:
    connection = http.client.HTTPConnection(ADDRESSES[WEB], loop.workloads[WEB].metrics_port, timeout=10)
    try:
        connection.request("GET", "/stats/prometheus")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return [(sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def stat(loop: TrafficLoop, name: str, cluster: str) -> float:
    return sum(value for sample, labels, value in web_samples(loop)
               if sample == name and labels.get("envoy_cluster_name") == cluster)


def test_retries_hide_an_instance_that_fails_every_other_request(loop: TrafficLoop) -> None:
    to_v1 = RouteRule(to=split(100, 0))
    caller = Caller(loop.outbound_port)
    try:
        loop.apply(ServicePolicy(routes=(to_v1,)))  # mesh's default retries: connection failures only
        with behaving(loop.received[API_V1], fail_every=2):
            assert [caller.get()[0] for _ in range(20)].count(500) == 10
        loop.apply(ServicePolicy(routes=(to_v1,), retries=Retries(attempts=2, on=("5xx",))))
        with behaving(loop.received[API_V1], fail_every=2):
            assert {caller.get()[0] for _ in range(20)} == {200}
            # tries: ok, fail + ok, fail + ok, ...: every request after the first was retried once
            assert loop.received[API_V1].answered == 1 + 19 * 2
    finally:
        caller.close()


def test_a_per_route_timeout_cuts_slow_requests_only(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(routes=(
        RouteRule(to=split(100, 0), match=RouteMatch(path=PathMatch("prefix", "/slow")), timeout_ms=200,
                  retries=Retries(attempts=0)),
        RouteRule(to=split(100, 0)),
    )))
    caller = Caller(loop.outbound_port)
    try:
        with behaving(loop.received[API_V1], slow_s=0.6):
            status, body, elapsed = caller.get("/slow/report")
            assert (status, body) == (504, b"upstream request timeout") and 0.18 <= elapsed < 0.5
            assert caller.get("/fast")[0] == 200
    finally:
        caller.close()


def test_a_circuit_breaker_rejects_overflow_with_503(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(routes=(RouteRule(to=split(100, 0)),), retries=Retries(attempts=0),
                             circuit_breaker=CircuitBreaker(max_connections=1, max_pending_requests=1,
                                                            max_requests=1)))
    before = stat(loop, "envoy_cluster_upstream_rq_pending_overflow_total", "outbound|web|v1|api|v1")
    results: list[tuple[int, bytes, float]] = []

    def one() -> None:
        caller = Caller(loop.outbound_port)
        try:
            results.append(caller.get("/slow"))
        finally:
            caller.close()

    with behaving(loop.received[API_V1], slow_s=0.4):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    statuses = sorted(status for status, _body, _t in results)
    assert len(statuses) == 8 and 1 <= statuses.count(200) <= 3 and statuses.count(503) >= 5, statuses
    assert all(body.endswith(b"reset reason: overflow") for status, body, _t in results if status == 503), results
    assert stat(loop, "envoy_cluster_upstream_rq_pending_overflow_total", "outbound|web|v1|api|v1") > before


def test_outlier_detection_ejects_an_instance_answering_500s(loop: TrafficLoop) -> None:
    loop.apply(ServicePolicy(retries=Retries(attempts=0), outlier_detection=OutlierPolicy(
        consecutive_5xx=3, interval_ms=200, base_ejection_time_ms=30_000, max_ejection_percent=50)))
    caller = Caller(loop.outbound_port)
    try:
        with behaving(loop.received[API_V1], fail_every=1):
            first = [caller.get()[:2] for _ in range(20)]
            assert (500, b"v1") in first
            # ejected after 3 consecutive 500s: only v2.1 answers then
            eventually(lambda: {caller.get()[:2] for _ in range(10)} == {(200, b"v2.1")} or None, WAIT_S,
                       "v1 is ejected", loop.envoys[WEB].log)
        assert stat(loop, "envoy_cluster_outlier_detection_ejections_enforced_total", "outbound|web|v1|api") >= 1
    finally:
        caller.close()


def test_every_policy_field_passes_envoys_own_validation(tmp_path: Path) -> None:
    """The unit tests' rich policy (every field) and a TCP ring hash as the caller (web) reads them, with and without
    zones, and the rate limit as the callee (api) reads it."""
    authority, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    tcp_hash = ServicePolicy(lb=LoadBalancing("ring_hash", HashOn("source_ip")))
    for zones, host in ((True, "h-web"), (False, "h-web"), (False, "h-api1")):
        mesh = traffic_mesh({"api": RICH_API, "db": tcp_hash}, zones=zones)
        workload = next(w for w in mesh.workloads if w.host == host)
        validate_proxy_files(render_proxy_files(compute_proxy_config(mesh, workload)), authority.root_pem)
