"""`mesh top`'s table: services and edges with rate, error rate and p99, versions under them, proxies that did
not answer named under the table; --once after two scrapes."""

from __future__ import annotations

from rich.console import Console
from telemetry_samples import PromText, telemetry_mesh

from mesh.errors import EXIT_OK, EXIT_UNREACHABLE
from mesh.telemetry.fleet import EdgeNumbers, FleetNumbers, Numbers, ProxyScrape, ServiceNumbers
from mesh.telemetry.scrape import FetchError
from mesh.telemetry.targets import ProxyTarget, proxy_targets
from mesh.telemetry.top import render, steadier_p99, top


def screen(renderable: object) -> list[str]:
    console = Console(record=True, width=110, color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_the_table_shows_services_and_edges_with_their_numbers() -> None:
    targets = proxy_targets(telemetry_mesh())
    numbers = FleetNumbers(
        interval=5.0,
        services=(ServiceNumbers("api", "http", Numbers(2.0, 0.1, 950.0),
                                 {"v1": Numbers(1.2, 0.0, 4.7), "v2": Numbers(0.8, 0.25, 812.5)}),
                  ServiceNumbers("web", "http", Numbers(0.0, None, None))),
        edges=(EdgeNumbers("web", "api", "http", Numbers(2.0, 0.1, 950.0), {"v1": Numbers(2.0, 0.1, 950.0)},
                           {"v1": Numbers(1.2, 0.0, 4.7), "v2": Numbers(0.8, 0.25, 812.5)}),
               EdgeNumbers("api", "db", "tcp", Numbers(123.4, 0.0, 40.0))),
        failures=(ProxyScrape(targets[2], 0.0, error="10.77.0.12:20001: timed out"),))
    lines = [line for line in screen(render(numbers, "through ctl1")) if any(c.isalnum() for c in line)]
    rows = [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in lines]
    assert rows == [
        "services (as their proxies received)",
        "service protocol rate errors p99",
        "api http 2.00/s 10.0% 950 ms",
        "version v1 1.20/s 0.0% 4.7 ms",
        "version v2 0.80/s 25.0% 812 ms",
        "web http 0.00/s - -",
        "edges (as callers measured them)",
        "source -> destination protocol rate errors p99",
        "web -> api http 2.00/s 10.0% 950 ms",
        "to v1 1.20/s 0.0% 4.7 ms",
        "to v2 0.80/s 25.0% 812 ms",
        "api -> db tcp 123/s 0.0% 40.0 ms",
        "over 5.0 s, metrics read through ctl1; errors: 5xx share (HTTP), connect failures (TCP); p99: request latency",
        "(HTTP), connection length (TCP)",
        "vm2 db-5432: no metrics: 10.77.0.12:20001: timed out",
    ]


class Counting:
    """A fetcher whose web proxy counts 10 more requests at each read; the others do not answer."""

    via = "direct"

    def __init__(self) -> None:
        self.reads = 0

    def fetch(self, target: ProxyTarget) -> str:
        if target.proxy != "web-8080":
            raise FetchError(f"{target.endpoint}: connection refused")
        self.reads += 1
        caller = {"source_service": "web", "source_version": "v1", "destination_service": "api"}
        return PromText().counter("envoy_cluster_upstream_rq_xx", {**caller, "envoy_response_code_class": "2"},
                                  10 * self.reads).text()

    def close(self) -> None:
        pass


def test_once_prints_one_table_after_two_reads_an_interval_apart() -> None:
    console = Console(record=True, width=110, color_system=None)
    slept: list[float] = []
    assert top(proxy_targets(telemetry_mesh()), Counting(), console, interval=2.0, once=True,
               sleep=slept.append) == EXIT_OK
    text = console.export_text()
    assert slept == [2.0]
    assert "web -> api" in text and "/s" in text
    assert "vm2 api-9090: no metrics: 10.77.0.12:20000: connection refused" in text


def test_once_exits_3_when_no_proxy_answered() -> None:
    class Nobody(Counting):
        def fetch(self, target: ProxyTarget) -> str:
            raise FetchError(f"{target.endpoint}: timed out")

    console = Console(record=True, width=110, color_system=None)
    assert top(proxy_targets(telemetry_mesh()), Nobody(), console, interval=1.0, once=True,
               sleep=lambda _: None) == EXIT_UNREACHABLE
    assert "vm1 web-8080: no metrics: 10.77.0.11:20000: timed out" in console.export_text()


def test_refreshing_takes_p99_over_a_longer_window_where_there_were_requests() -> None:
    short = FleetNumbers(2.0, (ServiceNumbers("api", "http", Numbers(1.0, 0.0, None), {"v1": Numbers(1.0, 0.0, None)}),
                               ServiceNumbers("db", "tcp", Numbers(0.0, None, None))),
                         (EdgeNumbers("web", "api", "http", Numbers(1.0, 0.0, None), {"v1": Numbers(1.0, 0.0, None)},
                                      {"v1": Numbers(1.0, 0.0, None)}),), ())
    longer = FleetNumbers(10.0, (ServiceNumbers("api", "http", Numbers(0.8, 0.0, 12.0), {"v1": Numbers(0.8, 0.0, 12.0)}),
                                 ServiceNumbers("db", "tcp", Numbers(0.5, 0.0, 4.0))),
                          (EdgeNumbers("web", "api", "http", Numbers(0.8, 0.0, 15.0), {"v1": Numbers(0.8, 0.0, 15.0)},
                                       {"v1": Numbers(0.8, 0.0, 11.0)}),), ())
    steadier = steadier_p99(short, longer)
    assert [(s.service, s.numbers, s.by_version) for s in steadier.services] == [
        ("api", Numbers(1.0, 0.0, 12.0), {"v1": Numbers(1.0, 0.0, 12.0)}),
        ("db", Numbers(0.0, None, None), {})]  # no request now: no p99, whatever the longer window saw
    edge = steadier.edges[0]
    assert (edge.numbers, edge.by_source_version, edge.by_destination_version) == (
        Numbers(1.0, 0.0, 15.0), {"v1": Numbers(1.0, 0.0, 15.0)}, {"v1": Numbers(1.0, 0.0, 11.0)})


def test_refreshing_ends_with_exit_0_on_ctrl_c() -> None:
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    console = Console(record=True, width=110, color_system=None, force_terminal=False)
    assert top(proxy_targets(telemetry_mesh()), Counting(), console, interval=1.0, sleep=sleep) == EXIT_OK
    assert calls == [1.0, 1.0, 1.0]
    assert "web -> api" in console.export_text()
