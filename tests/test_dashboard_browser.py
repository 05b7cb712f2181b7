"""The dashboard page in Debian's headless Chromium (selenium, Debian's chromedriver) against a dashboard server
on loopback fed with made-up fleets (no lab): it polls every 2 s while its tab is visible and not while hidden,
updates the graph in place (the same SVG elements, new numbers), and a larger fleet with long names still fits
a 1366x768 laptop screen without sideways scrolling."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mesh.dashboard.server import DashboardServer
from mesh.dashboard.view import DashboardInputs, Instance, dashboard_view
from mesh.testing.browser import headless_chromium

sys.path.insert(0, str(Path(__file__).parent / "unit"))
from dashboard_samples import lab_instances, lab_spec, proxy, reading


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


class Counting:
    """A dashboard answer that counts its polls."""

    def __init__(self, inputs: DashboardInputs) -> None:
        self.inputs = inputs
        self.polls: list[float] = []
        self.lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self.lock:
            self.polls.append(time.monotonic())
        return dashboard_view(replace(self.inputs, now=time.time()))

    def count(self) -> int:
        with self.lock:
            return len(self.polls)


def served(answer: Counting) -> DashboardServer:
    return DashboardServer(0, answer, poll_interval=0.05).start()


def wait(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.1)


def test_it_polls_every_2_s_while_visible_not_while_hidden_and_updates_in_place(browser: Any) -> None:
    answer = Counting(DashboardInputs(reading(), now=0.0, instances=lab_instances()))
    server = served(answer)
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait(lambda: browser.execute_script("return document.querySelectorAll('g.node').length") == 3)
        browser.execute_script("window.meshNode = document.querySelector('g.node[data-service=\"api\"]');")
        start = answer.count()
        time.sleep(6.5)
        visible = answer.count() - start
        assert 3 <= visible <= 4, visible  # one every 2 s
        assert browser.execute_script(
            "return document.querySelector('g.node[data-service=\"api\"]') === window.meshNode")  # in place
        browser.execute_script("Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
                               "document.dispatchEvent(new Event('visibilitychange'));")
        time.sleep(0.5)
        hidden_from = answer.count()
        time.sleep(5.0)
        assert answer.count() == hidden_from  # a hidden tab asks nothing
        browser.execute_script("Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
                               "document.dispatchEvent(new Event('visibilitychange'));")
        wait(lambda: answer.count() > hidden_from, 3.0)  # visible again: at once
    finally:
        server.stop()


def big_fleet() -> DashboardInputs:
    """Nine services in three tiers, 36 instances with long host and container names."""
    spec = lab_spec()
    fronts, middles, backs = ["frontend-web", "mobile-gateway", "partner-api"], \
        ["orders-service", "inventory-service", "payments-service"], ["postgres-main", "redis-cache", "kafka-bus"]
    hosts = []
    instances = []
    for index in range(12):
        name = f"host-{index:02d}.eu-west-1.compute.internal"
        proxies = []
        for service in (fronts[index % 3], middles[index % 3], backs[index % 3]):
            upstreams = tuple(middles) if service in fronts else tuple(backs) if service in middles else ()
            made = proxy(f"{service}-{index}", service, f"v{index % 2 + 1}.0.{index}", upstreams=upstreams,
                         routes=tuple(middles) if service in fronts else (),
                         protocol="tcp" if service in backs else "http", kind="container" if index % 2 else "vm",
                         container=f"{service}-container-with-a-long-name-{index}" if index % 2 else None)
            proxies.append(made)
            instances.append(Instance(f"{service}-{name}-{index}", service, name, f"10.1.0.{index}", 21000,
                                      "passing", "", False, made.version))
        hosts.append(replace(spec.hosts[0], name=name, proxies=tuple(proxies)))
    return DashboardInputs(reading(replace(spec, hosts=tuple(hosts))), now=0.0, instances=tuple(instances))


def test_a_larger_fleet_with_long_names_fits_a_laptop_screen(browser: Any, tmp_path: Path) -> None:
    server = served(Counting(big_fleet()))
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait(lambda: browser.execute_script("return document.querySelectorAll('#instances tr[data-instance]')"
                                            ".length") == 36)
        nodes = browser.execute_script("return document.querySelectorAll('g.node').length")
        edges = browser.execute_script("return document.querySelectorAll('g.edge').length")
        width, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        browser.save_screenshot(str(tmp_path / "big.png"))
    finally:
        server.stop()
    assert (nodes, edges) == (9, 18)
    assert width <= inner, f"the page scrolls sideways: {width} > {inner} ({tmp_path / 'big.png'})"
