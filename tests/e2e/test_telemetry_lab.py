"""End to end on the lab (issue 19): what a user sees of the mesh's telemetry.

- One HTTP request with a known x-request-id sent to web on vm1 goes web -> api -> db (one such request for each
  api instance: vm2's, on a VM, and dock1's container): web's outbound line and the answering api's inbound line
  both carry that id with the SPIFFE identities of web and api; api's outbound and db's inbound TCP lines have
  bytes and a duration; `mesh logs --since 1m --json` returns these lines, as the hosts' journals and the
  sidecar's log hold them, merged in time order; --service and --host keep the lines they name.
- Every proxy's metrics port, read from consul1 (a named scraper), parses with prometheus-client's text parser
  and counts the requests just made under their source and destination labels; a host that is neither a scraper
  nor a controller cannot connect to another host's metrics port, consul1 and the controllers can; the port
  answers nothing but `GET /stats/prometheus`.
- `mesh metrics targets` prints file_sd JSON naming every proxy; `mesh top`, in a detached tmux session while a
  request loop runs, shows the edges web -> api and api -> db with non-zero rates.

Nothing here depends on which api instance (vm2's v1 or dock1's v2) answers a request: the demo app's hops
name it. Envoy writes its access lines out every few seconds, so every wait here is generous and nothing is timed.
The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab), deploys inventory/lab.yaml,
changes nothing, and leaves the lab deployed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import INVENTORY, Run, hops, out, run_mesh, shared_lab, tcp_from, wait_for
from lab_helpers import MESH, LabUp
from prometheus_client.parser import text_string_to_metric_families
from rollout_helpers import chain_ok, request_loop

from mesh.config import paths
from mesh.containers.sidecar import sidecar_name
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh, Workload
from mesh.lab.topology import TRUST_DOMAIN

DEPLOY_TIMEOUT = 900.0
LOG_WAIT = 90.0  # generous: a line reaches the journal (or the sidecar's log) in well under a second
METRICS_WAIT = 90.0  # Envoy publishes histograms at its stats flush (5 s by default)
TOP_WAIT = 120.0
SCRAPER = "consul1"  # in the lab inventory's `monitoring` group, which mesh_metrics_scrapers names
ALLOWED = ("consul1", "ctl1", "ctl2")  # the scraper and the controllers
NOT_ALLOWED = ("vm1", "vm2", "dock1")  # proxies' hosts, neither scrapers nor controllers
WEB_PORT = 8080  # web's demo app on vm1, reached on loopback as a user would
REQUESTS = 4


def identity(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/svc/{service}"


# ---- the lab's proxies, as the inventory makes them --------------------------------------------------------

@dataclass(frozen=True)
class Proxy:
    host: str
    address: str  # the host's address: a container's metrics port is forwarded from it
    workload: Workload

    @property
    def node_id(self) -> str:
        """The access log's `proxy` field (the Consul service id)."""
        return self.workload.consul_id

    @property
    def service(self) -> str:
        return self.workload.service

    @property
    def version(self) -> str:
        return self.workload.version

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.workload.metrics_port}"

    def log_command(self, since_minutes: int) -> str:
        """The command that prints this proxy's Envoy output on its host: its unit's journal or its sidecar's log."""
        if self.workload.container:
            return f"docker logs --since {since_minutes}m {shlex.quote(sidecar_name(self.workload))} 2>&1"
        unit = paths.envoy_unit_name(paths.proxy_name(self.workload))
        return f"journalctl -u {shlex.quote(unit)} -o cat --no-pager --since '{since_minutes} min ago'"


def lab_mesh() -> Mesh:
    return check_inventory(load_inventory(str(INVENTORY)), str(INVENTORY)).mesh


def lab_proxies() -> list[Proxy]:
    return [Proxy(host.name, host.connection.address, workload)
            for host in lab_mesh().hosts for workload in host.workloads]


def proxy_of(proxies: list[Proxy], service: str, host: str, instance: str | None = None) -> Proxy:
    """The proxy of `service` on `host` (the container `instance` on a container host, as the hop names it)."""
    for proxy in proxies:
        if proxy.service == service and proxy.host == host and (
                proxy.workload.container is None or proxy.workload.container == instance):
            return proxy
    raise AssertionError(f"no {service} proxy on {host} ({instance}) in {INVENTORY}")


# ---- access lines ------------------------------------------------------------------------------------------

Line = dict[str, Any]


def access_lines(text: str) -> list[Line]:
    """The access lines in a proxy's output: JSON objects with "mesh": "access" (Envoy's own logs aside)."""
    found = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("mesh") == "access":
            found.append(line)
    return found


def proxy_lines(lab: LabUp, proxy: Proxy, since_minutes: int = 5) -> list[Line]:
    """What the proxy's host holds of its access lines (the journal on a VM, the sidecar's log on dock1)."""
    return access_lines(out(lab, proxy.host, proxy.log_command(since_minutes), timeout=60))


def when(line: Line) -> datetime:
    return datetime.strptime(str(line["time"]), "%Y-%m-%dT%H:%M:%S.%fZ")


def ends(line: Line) -> float:
    """When the request or connection ended, in seconds on the lines' clock (start + duration)."""
    return when(line).timestamp() + float(line["duration_ms"]) / 1000


def brief(lines: list[Line]) -> str:
    return "\n".join(json.dumps(line, sort_keys=True) for line in lines[-20:]) or "(no access lines)"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---- metrics -----------------------------------------------------------------------------------------------

Families = list[Any]


def scrape_from(source: str, proxy: Proxy, path: str = "/stats/prometheus", method: str = "GET") -> Run:
    """curl on `source` (through `mesh lab exec`, as a user would) asking proxy's metrics port; stdout is the
    body, then a last line `HTTP <status>` (`HTTP 000` when it could not connect)."""
    return run_mesh("lab", "exec", source, "--", "curl", "-sS", "--connect-timeout", "3", "--max-time", "10",
                    "-X", method, "-w", "\nHTTP %{http_code}\n", proxy.metrics_url + path, timeout=60)


def status_and_body(run: Run) -> tuple[str, str]:
    return _status_and_body(run.stdout)


def _status_and_body(text: str) -> tuple[str, str]:
    body, _, status = text.rstrip("\n").rpartition("\n")
    return status.removeprefix("HTTP ").strip(), body


_REQUEST_MARK = "=====mesh-e2e-request "


def scrape_each_from(source: str, proxy: Proxy, requests: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """scrape_from for each (method, path) in one `mesh lab exec` on `source` (one curl per request, as
    scrape_from runs it): {"METHOD path": (status, body)}, the status "000" when curl could not connect."""
    script = "; ".join(
        f"echo {shlex.quote(_REQUEST_MARK + method + ' ' + path)}; curl -sS --connect-timeout 3 --max-time 10 "
        f"-X {shlex.quote(method)} -w '\\nHTTP %{{http_code}}\\n' {shlex.quote(proxy.metrics_url + path)}"
        for method, path in requests)
    run = run_mesh("lab", "exec", source, "--", "sh", "-c", script + "; true", timeout=60 + 15 * len(requests))
    assert run.code == 0, str(run)
    answers: dict[str, tuple[str, str]] = {}
    for chunk in run.stdout.split(_REQUEST_MARK)[1:]:
        request, _, text = chunk.partition("\n")
        answers[request] = _status_and_body(text)
    assert sorted(answers) == sorted(f"{method} {path}" for method, path in requests), str(run)
    return answers


def metrics(proxy: Proxy) -> Families:
    """The proxy's Prometheus text as read from the scraper, parsed with prometheus-client's text parser."""
    run = scrape_from(SCRAPER, proxy)
    status, body = status_and_body(run)
    assert run.code == 0 and status == "200", f"{proxy.node_id}: {proxy.metrics_url} from {SCRAPER}:\n{run}"
    families = list(text_string_to_metric_families(body))
    assert families, f"{proxy.node_id}: no metric families in {body[:500]!r}"
    return families


def value(families: Families, metric: str, **labels: str) -> float:
    """Sum of the samples named `metric` whose labels include `labels` (the parser names a counter's samples
    `<family>_total`, so either spelling of a counter matches)."""
    names = {metric, metric.removesuffix("_total") + "_total"}
    return sum(sample.value for family in families for sample in family.samples
               if sample.name in names and labels.items() <= sample.labels.items())


def labelled(families: Families, metric: str) -> str:
    """The samples of `metric`, for failure messages."""
    names = {metric, metric.removesuffix("_total") + "_total"}
    found = [f"{sample.name}{sample.labels} {sample.value}" for family in families for sample in family.samples
             if sample.name in names]
    return "\n".join(found[:30]) or f"(no {metric} samples)"


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        yield up


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    if run.code != 0:
        pytest.fail(f"the deploy failed, so there is no telemetry to read:\n{run}")
    wait_for(lambda: web_hops(lab), chain_ok, "web -> api -> db through the mesh after the deploy", timeout=120)
    return lab


def web_hops(lab: LabUp, request_id: str | None = None) -> list[dict[str, Any]] | str:
    """What web on vm1 answers (its hops), asked on loopback with curl, with `x-request-id` when given."""
    return hops(lab, "vm1", WEB_PORT, request_id)


@dataclass(frozen=True)
class Traced:
    """One request through web -> api -> db and the four access lines it left, read on the proxies' hosts."""

    request_id: str
    hops: list[dict[str, Any]]
    api: Proxy  # the api instance that answered
    web_out: Line
    api_in: Line
    api_out: Line  # TCP, to db
    db_in: Line  # TCP


def _request_lines(lines: list[Line], request_id: str, direction: str) -> list[Line]:
    return [line for line in lines if line.get("request_id") == request_id and line.get("direction") == direction]


def _tcp_lines_between(lines: list[Line], direction: str, destination: str, start: datetime,
                       end: float) -> list[Line]:
    """TCP lines of `direction` towards `destination` that started within [start, end] (seconds)."""
    return [line for line in lines
            if line.get("direction") == direction and line.get("protocol") == "tcp"
            and line.get("destination_identity") == identity(destination)
            and start <= when(line) and when(line).timestamp() <= end]


def trace(lab: LabUp, proxies: list[Proxy], request_id: str) -> Traced:
    """Send one request with `request_id` to web on vm1 and wait (generously) for its four lines."""
    hops = web_hops(lab, request_id)
    assert chain_ok(hops), f"web on vm1 did not answer web -> api -> db: {hops}"
    assert isinstance(hops, list)
    web = proxy_of(proxies, "web", "vm1")
    api = proxy_of(proxies, "api", str(hops[1]["host"]), str(hops[1].get("instance")))
    db = proxy_of(proxies, "db", str(hops[2]["host"]))

    web_out = wait_for(lambda: _request_lines(proxy_lines(lab, web), request_id, "outbound"), bool,
                       f"web's outbound access line with x-request-id {request_id} on vm1", LOG_WAIT, 1.0)[0]
    api_in = wait_for(lambda: _request_lines(proxy_lines(lab, api), request_id, "inbound"), bool,
                      f"{api.node_id}'s inbound access line with x-request-id {request_id}", LOG_WAIT, 1.0)[0]
    # TCP lines carry no request id: api's connection to db for this request started and ended while api's
    # inbound request ran (the lines share this machine's clock; duration_ms is whole milliseconds), and db's
    # inbound connection while api's outbound one was open. The module holds the lab's lock: no other traffic.
    api_out = wait_for(
        lambda: _tcp_lines_between(proxy_lines(lab, api), "outbound", "db", when(api_in), ends(api_in) + 0.002),
        bool, f"{api.node_id}'s outbound TCP line to db during request {request_id}", LOG_WAIT, 1.0)[-1]
    db_in = wait_for(
        lambda: _tcp_lines_between(proxy_lines(lab, db), "inbound", "db", when(api_out), ends(api_out) + 0.002),
        bool, f"{db.node_id}'s inbound TCP line during request {request_id}", LOG_WAIT, 1.0)[-1]
    return Traced(request_id, hops, api, web_out, api_in, api_out, db_in)


@pytest.fixture(scope="module")
def traces(deployed: LabUp) -> list[Traced]:
    """One traced request answered by each api instance (vm2's, a VM, and dock1's container): requests are sent
    until each has answered one (Envoy balances them; 40 tries at most)."""
    proxies = lab_proxies()
    apis = {proxy.node_id for proxy in proxies if proxy.service == "api"}
    found: dict[str, Traced] = {}
    for _ in range(40):
        if found:  # a request untraced first: when an instance already traced answers it, the next goes to
            hops = web_hops(deployed)  # another one most likely (Envoy balances round robin): trace that one
            assert chain_ok(hops), f"web on vm1 did not answer web -> api -> db: {hops}"
            assert isinstance(hops, list)
            if proxy_of(proxies, "api", str(hops[1]["host"]), str(hops[1].get("instance"))).node_id not in found:
                continue
        traced = trace(deployed, proxies, f"mesh-e2e-telemetry-{uuid.uuid4().hex}")
        found.setdefault(traced.api.node_id, traced)
        if set(found) == apis:
            break
    assert set(found) == apis, f"only {sorted(found)} of the api instances {sorted(apis)} answered"
    return sorted(found.values(), key=lambda traced: when(traced.web_out))


# ---- access logs -------------------------------------------------------------------------------------------

def test_the_demo_apps_pass_the_request_id_on(traces: list[Traced]) -> None:
    for traced in traces:
        assert [(hop["service"], hop.get("request_id")) for hop in traced.hops] == [
            ("web", traced.request_id), ("api", traced.request_id), ("db", None)], traced.hops


def test_web_to_api_has_a_caller_line_and_a_callee_line_with_the_request_id(traces: list[Traced]) -> None:
    for traced in traces:
        _check_http_hop(traced)


def _check_http_hop(traced: Traced) -> None:
    common = {"request_id": traced.request_id, "protocol": "http", "method": "GET", "path": "/", "status": 200,
              "source_identity": identity("web"), "destination_identity": identity("api"),
              "destination_service": "api", "destination_version": traced.api.version, "mtls": True}
    web_out, api_in = traced.web_out, traced.api_in
    assert {key: web_out.get(key) for key in common} == common, brief([web_out])
    assert {key: api_in.get(key) for key in common} == common, brief([api_in])
    assert (web_out["proxy"], web_out["direction"], web_out["source_service"], web_out["source_version"]) == (
        "web-vm1-8080", "outbound", "web", "v1"), brief([web_out])
    assert web_out["destination_instance"] == traced.api.node_id, brief([web_out])
    assert (api_in["proxy"], api_in["direction"], api_in["destination_instance"]) == (
        traced.api.node_id, "inbound", traced.api.node_id), brief([api_in])
    assert api_in["source_service"] == "web" and api_in["source_version"] == "v1", brief([api_in])
    for line in (web_out, api_in):
        assert is_number(line["bytes_sent"]) and line["bytes_sent"] > 0, brief([line])
        assert is_number(line["duration_ms"]), brief([line])
    assert when(web_out) <= when(api_in), "api's inbound request started before web's outbound one"


def test_api_to_db_has_tcp_connection_lines_with_bytes_and_duration(traces: list[Traced]) -> None:
    for traced in traces:
        _check_tcp_hop(traced)


def _check_tcp_hop(traced: Traced) -> None:
    api_out, db_in = traced.api_out, traced.db_in
    for line, direction, proxy in ((api_out, "outbound", traced.api.node_id), (db_in, "inbound", "db-vm2-5432")):
        assert (line["proxy"], line["direction"], line["protocol"]) == (proxy, direction, "tcp"), brief([line])
        assert (line["source_identity"], line["destination_identity"]) == (identity("api"), identity("db")), \
            brief([line])
        assert line["destination_service"] == "db" and line["mtls"] is True, brief([line])
        for key in ("bytes_received", "bytes_sent"):
            assert is_number(line[key]) and line[key] > 0, f"{key}: {brief([line])}"
        assert is_number(line["duration_ms"]), brief([line])
    assert api_out["source_service"] == "api" and api_out["source_version"] == traced.api.version, brief([api_out])
    # Each Envoy counts what its downstream sent (api's app: `hop\n`) and what it sent back (db's one JSON line,
    # which is the db hop of the answer), so both lines count the same bytes.
    answer = len(json.dumps(traced.hops[2]).encode()) + 1
    for line in (api_out, db_in):
        assert (line["bytes_received"], line["bytes_sent"]) == (len(b"hop\n"), answer), brief([api_out, db_in])


def _mesh_logs(*args: str) -> tuple[Run, list[Line]]:
    run = run_mesh("logs", "-i", str(INVENTORY), "--json", *args, timeout=120)
    lines = []
    for raw in run.stdout.splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                raise AssertionError(f"`mesh logs --json` printed a line that is not JSON: {raw!r}\n{run}") from None
    return run, lines


def _same(line: Line, raw: Line) -> bool:
    """`mesh logs` printed this line as the host holds it (it may fill in source_service, from the identity)."""
    return all(line.get(key) == wanted for key, wanted in raw.items() if key != "source_service")


def test_mesh_logs_returns_every_hop_merged_in_time_order(traces: list[Traced]) -> None:
    hops = {f"{traced.api.node_id}: {name}": line for traced in traces for name, line in (
        ("web outbound", traced.web_out), ("api inbound", traced.api_in), ("api outbound (tcp)", traced.api_out),
        ("db inbound (tcp)", traced.db_in))}

    def read() -> tuple[Run, list[Line], list[str]]:
        run, lines = _mesh_logs("--since", "1m")
        return run, lines, [name for name, raw in hops.items() if not any(_same(line, raw) for line in lines)]

    run, lines, _ = wait_for(read, lambda seen: seen[0].code == 0 and not seen[2],
                                   "`mesh logs --since 1m --json` showing the request's four hops", LOG_WAIT, 2.0)
    assert all(line.get("mesh") == "access" for line in lines), run
    times = [when(line) for line in lines]
    assert times == sorted(times), f"`mesh logs` lines are not in time order:\n{run.stdout[-3000:]}"
    found = [next(i for i, line in enumerate(lines) if _same(line, raw)) for raw in hops.values()]
    assert found == sorted(found), f"the hops are not in the order they happened: {dict(zip(hops, found))}"
    # source_service comes from the SPIFFE identity on every line, db's TCP inbound ones included
    for name, index in zip(hops, found, strict=True):
        wanted = "web" if name.endswith(("web outbound", "api inbound")) else "api"
        assert lines[index].get("source_service") == wanted, (name, lines[index])


def test_mesh_logs_keeps_the_lines_of_one_service(traces: list[Traced]) -> None:
    run, lines = _mesh_logs("--since", "5m", "--service", "db")
    assert run.code == 0, run
    assert lines and all("db" in (line.get("source_service"), line.get("destination_service")) for line in lines), \
        brief(lines)
    for traced in traces:
        assert any(_same(line, traced.db_in) for line in lines), brief([traced.db_in])
        assert any(_same(line, traced.api_out) for line in lines), brief([traced.api_out])
        assert not any(_same(line, traced.web_out) for line in lines)


def test_mesh_logs_keeps_the_lines_of_one_host(traces: list[Traced]) -> None:
    run, lines = _mesh_logs("--since", "5m", "--host", "dock1")
    assert run.code == 0, run
    container = next(traced for traced in traces if traced.api.host == "dock1")
    assert lines and {line["proxy"] for line in lines} == {container.api.node_id}, brief(lines)
    assert any(_same(line, container.api_in) for line in lines) and any(_same(line, container.api_out)
                                                                         for line in lines)


# ---- metrics -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxies(deployed: LabUp) -> list[Proxy]:
    return lab_proxies()


def test_every_proxy_counts_the_requests_under_their_source_and_destination(deployed: LabUp,
                                                                           proxies: list[Proxy]) -> None:
    before = {proxy.node_id: metrics(proxy) for proxy in proxies}
    answered: dict[str, int] = {}  # api node id -> requests it answered
    for _ in range(REQUESTS):
        hops = web_hops(deployed, f"mesh-e2e-metrics-{uuid.uuid4().hex}")
        assert chain_ok(hops), hops
        assert isinstance(hops, list)
        api = proxy_of(proxies, "api", str(hops[1]["host"]), str(hops[1].get("instance")))
        answered[api.node_id] = answered.get(api.node_id, 0) + 1
    by_id = {proxy.node_id: proxy for proxy in proxies}

    def expectations() -> list[tuple[str, str, dict[str, str], float]]:
        """(proxy node id, metric, labels, at least this many more than before)."""
        wanted: list[tuple[str, str, dict[str, str], float]] = []
        caller = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
        wanted += [("web-vm1-8080", "envoy_cluster_upstream_rq", {**caller, "envoy_response_code": "200"}, REQUESTS),
                   ("web-vm1-8080", "envoy_cluster_upstream_rq_xx", {**caller, "envoy_response_code_class": "2"},
                    REQUESTS),
                   ("web-vm1-8080", "envoy_cluster_upstream_rq_time_count", caller, REQUESTS)]
        for node_id, count in answered.items():
            version = by_id[node_id].version.replace(".", "_")  # a version's '.' is '_' in stat names and labels
            callee = {"destination_service": "api", "destination_version": version}
            wanted += [(node_id, "envoy_http_downstream_rq_xx", {**callee, "envoy_response_code_class": "2"}, count),
                       (node_id, "envoy_http_downstream_rq_time_count", callee, count),
                       (node_id, "envoy_vhost_vcluster_upstream_rq",
                        {**callee, "source_service": "web", "envoy_response_code": "200"}, count),
                       (node_id, "envoy_cluster_upstream_cx_total",
                        {"source_service": "api", "source_version": version, "destination_service": "db"}, count)]
        wanted += [("db-vm2-5432", "envoy_tcp_downstream_cx_total",
                    {"destination_service": "db", "destination_version": "v1"}, REQUESTS)]
        return wanted

    def short(after: dict[str, Families]) -> list[str]:
        """What did not grow enough, with the samples of that metric."""
        left = []
        for node_id, metric, labels, least in expectations():
            grew = value(after[node_id], metric, **labels) - value(before[node_id], metric, **labels)
            if grew < least:
                left.append(f"{node_id}: {metric}{labels} grew by {grew}, not >= {least}\n"
                            f"{labelled(after[node_id], metric)}")
        return left

    wait_for(lambda: short({proxy.node_id: metrics(proxy) for proxy in proxies}), lambda left: not left,
             f"every proxy's metrics (read from {SCRAPER}) counting the {REQUESTS} requests", METRICS_WAIT, 3.0)


def test_only_scrapers_and_controllers_reach_a_metrics_port(deployed: LabUp, proxies: list[Proxy]) -> None:
    def reached_from(source: str) -> dict[str, str]:
        targets = [(proxy.address, proxy.workload.metrics_port) for proxy in proxies if proxy.host != source]
        return tcp_from(deployed, source, targets)

    sources = ALLOWED + NOT_ALLOWED
    with ThreadPoolExecutor(len(sources)) as pool:  # every source at once: a dropped connection waits 3 s
        seen = dict(zip(sources, pool.map(reached_from, sources), strict=True))
    for source in ALLOWED:
        assert all(state.startswith("open") for state in seen[source].values()), (source, seen[source])
    for source in NOT_ALLOWED:
        assert all(state.startswith("closed") for state in seen[source].values()), (source, seen[source])
    # the named scraper reads a whole Prometheus text from every proxy, the non-scraper vm1 none (asked at once:
    # each refused connection waits out curl's connect timeout)
    asks = [(SCRAPER, proxy) for proxy in proxies] + [("vm1", proxy) for proxy in proxies if proxy.host != "vm1"]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: status_and_body(scrape_from(*ask))[0], asks))
    for (source, proxy), status in zip(asks, answers, strict=True):
        assert status == ("200" if source == SCRAPER else "000"), (source, proxy.metrics_url, status)


ADMIN_REQUESTS = [("GET", "/quitquitquit"), ("POST", "/quitquitquit"), ("GET", "/config_dump"),
                  ("GET", "/stats"), ("GET", "/stats?format=json"), ("GET", "/clusters"), ("GET", "/"),
                  ("POST", "/stats/prometheus"), ("POST", "/reset_counters"), ("GET", "/certs"),
                  ("GET", "/stats/prometheus/../../config_dump")]


def test_the_metrics_port_answers_nothing_but_get_stats_prometheus(deployed: LabUp, proxies: list[Proxy]) -> None:
    for proxy in proxies:
        answers = scrape_each_from(SCRAPER, proxy, ADMIN_REQUESTS)
        wrong = {request: (status, body[:200]) for request, (status, body) in answers.items() if status != "404"}
        assert not wrong, f"{proxy.node_id} ({proxy.metrics_url}) answered more than /stats/prometheus: {wrong}"
    # and every Envoy still runs, its counters intact, its metrics port still serving
    for proxy in proxies:
        assert value(metrics(proxy), "envoy_server_live") == 1, proxy.node_id
    wait_for(lambda: web_hops(deployed), chain_ok, "web -> api -> db after the admin requests")


# ---- mesh metrics targets ----------------------------------------------------------------------------------

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def test_metrics_targets_is_file_sd_json_naming_every_proxy(deployed: LabUp, proxies: list[Proxy],
                                                            tmp_path: Path) -> None:
    run = run_mesh("metrics", "targets", "-i", str(INVENTORY), timeout=60)
    assert run.code == 0, run
    groups = json.loads(run.stdout)
    assert isinstance(groups, list) and groups, run
    for group in groups:  # Prometheus' file_sd: a list of {"targets": [host:port...], "labels": {name: value}}
        assert set(group) <= {"targets", "labels"} and isinstance(group["targets"], list), group
        assert all(isinstance(t, str) and re.fullmatch(r"[^\s:/]+:\d+", t) for t in group["targets"]), group
        labels = group.get("labels", {})
        assert all(LABEL_NAME.match(k) and isinstance(v, str) for k, v in labels.items()), group
        assert labels.get("__metrics_path__") == "/stats/prometheus", group
    named = sorted((g["labels"]["mesh_host"], g["labels"]["mesh_service"], g["labels"]["mesh_version"],
                    g["labels"]["mesh_kind"], tuple(g["targets"])) for g in groups)
    assert named == sorted((p.host, p.service, p.version, "container" if p.workload.container else "vm",
                            (f"{p.address}:{p.workload.metrics_port}",)) for p in proxies), run.stdout
    assert {g["labels"]["mesh_proxy"] for g in groups} in (
        {p.node_id for p in proxies}, {paths.proxy_name(p.workload) for p in proxies}), run.stdout
    # every target answers Prometheus text to the scraper
    for group in groups:
        fetched = run_mesh("lab", "exec", SCRAPER, "--", "curl", "-sSf", "--max-time", "10",
                           f"http://{group['targets'][0]}{group['labels']['__metrics_path__']}", timeout=60)
        assert fetched.code == 0 and list(text_string_to_metric_families(fetched.stdout)), fetched
    # -o writes the same JSON to a file
    written = tmp_path / "targets.json"
    assert run_mesh("metrics", "targets", "-i", str(INVENTORY), "-o", str(written)).code == 0
    assert json.loads(written.read_text()) == groups


# ---- mesh top ----------------------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")


def edge_rate(screen: str, source: str, destination: str) -> float | None:
    """The first number after `source ... destination` on a line of the screen (the edge's rate column), or
    None when no line shows that edge."""
    edge = re.compile(rf"\b{source}\b\W+{destination}\b(.*)$")
    for line in screen.splitlines():
        match = edge.search(line)
        if match:
            numbers = NUMBER.findall(match.group(1))
            if numbers:
                return float(numbers[0])
    return None


@pytest.fixture
def tmux_session(tmp_path: Path) -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (scripts/setup --test installs it)")
    name = f"mesh-e2e-top-{time.monotonic_ns()}"
    socket = tmp_path / "tmux.sock"  # a server of its own: nothing else's sessions are touched
    yield f"{socket}:{name}"
    subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True, check=False)


def test_mesh_top_shows_the_labs_edges_with_non_zero_rates(deployed: LabUp, tmux_session: str) -> None:
    socket, _, name = tmux_session.rpartition(":")
    tmux = ["tmux", "-S", socket]
    command = (f"{shlex.quote(MESH)} top -i {shlex.quote(str(INVENTORY))} --interval 2; "
               "echo mesh-top-exited-$?; sleep 600")
    subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "200", "-y", "60", command], check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True,
                              check=False).stdout

    def rates(text: str) -> dict[str, float | None]:
        return {"web -> api": edge_rate(text, "web", "api"), "api -> db": edge_rate(text, "api", "db")}

    with request_loop(deployed, port=WEB_PORT) as loop:
        shown = wait_for(screen, lambda text: all((rate or 0) > 0 for rate in rates(text).values()),
                         "`mesh top` showing web -> api and api -> db with non-zero rates", TOP_WAIT, 2.0)
    assert loop.ok > 0 and loop.failed == 0, loop
    assert "mesh-top-exited" not in shown, shown
    subprocess.run([*tmux, "send-keys", "-t", name, "C-c"], check=True)
    ended = wait_for(screen, lambda text: "mesh-top-exited-" in text, "`mesh top` ending on Ctrl-C", 30.0)
    assert "mesh-top-exited-0" in ended and "Traceback" not in ended, ended
