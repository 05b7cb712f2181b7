"""The controller's loopback web server (mesh.dashboard.server) answering real HTTP on 127.0.0.1, and what the
controller reads for it (mesh.dashboard.gather): reads only while a page polls, at most every refresh, shared by
every viewer; nothing once no page is open."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
from dashboard_samples import lab_instances, lab_spec, reading

from mesh.dashboard.gather import DashboardSource, scrape_targets
from mesh.dashboard.server import DashboardServer, loopback_host, page_html
from mesh.dashboard.view import dashboard_view
from mesh.telemetry.targets import ProxyTarget

PROM = "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n"


class CountingFetcher:
    via = "direct"

    def __init__(self) -> None:
        self.fetched: list[str] = []
        self.lock = threading.Lock()

    def fetch(self, target: ProxyTarget) -> str:
        with self.lock:
            self.fetched.append(target.endpoint)
        return PROM

    def close(self) -> None:
        pass


def get(port: int, path: str, host: str | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        answer = conn.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read()
    finally:
        conn.close()


@pytest.fixture
def served() -> Any:
    asked: list[Mapping[str, str]] = []

    def traces(query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        asked.append(dict(query))
        return 200, {"traces": []}

    source = DashboardSource(lambda: reading(), lambda spec: lab_instances(), CountingFetcher(), background=False)
    server = DashboardServer(0, lambda: dashboard_view(source.viewed()), traces,
                             lambda: {"host": "ctl1", "leader": True}, poll_interval=0.02).start()
    try:
        yield server, asked
    finally:
        server.stop()


def test_the_page_is_one_html_file_with_its_own_graph_code_and_nothing_from_elsewhere() -> None:
    page = page_html().decode()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "api/dashboard" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no CDN, no other site
    assert "https://" not in page and "<script src" not in page and "<link" not in page


def test_it_listens_on_loopback_only_and_serves_the_page(served: Any) -> None:
    server, _ = served
    assert server.server.server_address[0] == "127.0.0.1"
    status, kind, body = get(server.port, "/")
    assert (status, kind) == (200, "text/html; charset=utf-8") and body == page_html()


def test_api_dashboard_answers_the_views_json(served: Any) -> None:
    server, _ = served
    status, kind, body = get(server.port, "/api/dashboard")
    assert (status, kind) == (200, "application/json")
    found = json.loads(body)
    assert {item["name"] for item in found["services"]} == {"web", "api", "db"}
    assert found["controller"]["host"] == "ctl1"
    assert json.loads(get(server.port, "/api/controller")[2]) == {"host": "ctl1", "leader": True}


def test_api_traces_hands_the_query_to_the_trace_store(served: Any) -> None:
    server, asked = served
    status, _, body = get(server.port, "/api/traces?last=5&service=api")
    assert (status, json.loads(body)) == (200, {"traces": []})
    assert asked == [{"last": "5", "service": "api"}]


def test_a_controller_without_traces_says_so() -> None:
    server = DashboardServer(0, dict, poll_interval=0.02).start()
    try:
        status, _, body = get(server.port, "/api/traces?last=1")
    finally:
        server.stop()
    assert status == 503 and "no traces" in json.loads(body)["error"]


def test_other_hosts_methods_and_paths_are_refused(served: Any) -> None:
    server, _ = served
    assert get(server.port, "/api/dashboard", host="evil.example:9191")[0] == 403  # DNS rebinding
    assert get(server.port, "/api/dashboard", host="localhost:8000")[0] == 200
    assert get(server.port, "/api/dashboard", method="POST")[0] == 405
    assert get(server.port, "/nothing")[0] == 404


def test_a_failing_answer_is_a_500_and_the_server_goes_on() -> None:
    calls = []

    def broken() -> Mapping[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("bug")
        return {"ok": True}

    server = DashboardServer(0, broken, poll_interval=0.02).start()
    try:
        assert get(server.port, "/api/dashboard")[0] == 500
        assert json.loads(get(server.port, "/api/dashboard")[2]) == {"ok": True}
    finally:
        server.stop()


@pytest.mark.parametrize(("header", "loopback"), [("127.0.0.1:9191", True), ("localhost", True), ("[::1]:80", True),
                                                  (None, True), ("ctl1:9191", False), ("127.0.0.1.nip.io", False)])
def test_loopback_names(header: str | None, loopback: bool) -> None:
    assert loopback_host(header) is loopback


def test_the_scrape_targets_are_every_proxy_of_the_spec_with_its_metrics_address() -> None:
    targets = {target.instance: target for target in scrape_targets(lab_spec())}
    assert set(targets) == {"web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"}
    assert targets["db-vm2-5432"].endpoint == "10.77.0.12:20001" and targets["db-vm2-5432"].protocol == "tcp"
    assert (targets["api-dock1-api-v2-1"].kind, targets["api-dock1-api-v2-1"].version) == ("container", "v2")


def test_nothing_is_read_while_no_page_polls() -> None:
    fetcher = CountingFetcher()
    consul: list[int] = []
    source = DashboardSource(lambda: reading(), lambda spec: consul.append(1) or lab_instances(), fetcher,
                             viewed_within_s=0.3, refresh_s=0.05)
    time.sleep(0.3)
    assert fetcher.fetched == [] and consul == [] and source.thread is None


def test_pages_polling_share_one_read_per_refresh_and_the_reads_stop_once_they_stop() -> None:
    fetcher = CountingFetcher()
    source = DashboardSource(lambda: reading(), lambda spec: lab_instances(), fetcher,
                             viewed_within_s=0.4, refresh_s=0.2)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # three viewers polling every 10 ms for a second
        for _ in range(3):
            source.viewed()
        time.sleep(0.01)
    time.sleep(0.8)  # past viewed_within_s after the last poll: the refresher ends
    assert source.thread is None or not source.thread.is_alive()
    refreshes = source.state()["refreshes"]
    assert 5 <= refreshes <= 8, refreshes  # one per 0.2 s while polled (and 0.4 s after), whatever the polls
    assert len(fetcher.fetched) == 4 * refreshes  # each refresh reads the four proxies once
    time.sleep(0.5)
    assert source.state()["refreshes"] == refreshes and not source.state()["watched"]
    inputs = source.inputs()
    assert inputs.numbers is not None and inputs.instances == lab_instances() and inputs.scraping is False


def test_a_scrape_left_from_an_earlier_viewing_is_no_base_for_a_rate() -> None:
    now = [1000.0]
    source = DashboardSource(lambda: reading(), lambda spec: lab_instances(), CountingFetcher(),
                             clock=lambda: now[0], background=False)
    source.refresh()
    assert source.inputs().numbers is None  # one scrape: no rate yet
    now[0] += 5
    source.refresh()
    assert source.inputs().numbers is not None
    now[0] += 600  # the page was closed for ten minutes
    source.refresh()
    assert source.inputs().numbers is None


def test_consul_that_fails_is_named_and_the_last_instances_are_kept() -> None:
    from mesh.errors import MeshError

    answers: list[Any] = [lab_instances(), MeshError("cannot reach Consul at http://10.77.0.2:8500: refused")]

    def instances(spec: object) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    source = DashboardSource(lambda: reading(), instances, CountingFetcher(), background=False)
    source.refresh()
    source.refresh()
    inputs = source.inputs()
    assert inputs.instances == lab_instances() and "cannot reach Consul" in (inputs.consul_error or "")
