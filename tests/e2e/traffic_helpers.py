"""Helpers of the traffic management end-to-end tests (test_traffic_*.py): load sent from inside a lab node with
traffic_client.py (one SSH session for N requests), the demo app's behaviour file set per instance, binomial
bounds, `mesh route` / `mesh fault` / `mesh rollout` runs, `mesh route show --json`, and a proxy's Prometheus
counters read from a controller. Every probe returns what it saw; the tests decide.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_helpers import Run, out, run_mesh, sh, wait_for
from lab_helpers import LabUp

from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.lab.demo_units import SCRIPT_PATH

CLIENT = Path(__file__).with_name("traffic_client.py")
WEB_TO_API = "http://127.0.0.1:19101"  # web's outbound listener to api on vm1 (the client stands in for web)
V1 = "api/v1/vm2"  # the answering instance as traffic_client.py names it: service/version/instance
V2 = "api/v2/api-v2-1"
API_PORT = 9090
# Where each api instance's behaviour file is written: (host, container or None).
API_INSTANCES = {V1: ("vm2", None), V2: ("dock1", "api-v2-1")}
SIGMAS = 5.0
CLI_TIMEOUT = 180.0


# ---- load ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """What traffic_client.py printed (see its docstring)."""

    data: dict[str, Any]

    @property
    def answered(self) -> int:
        return int(self.data["answered"])

    def status(self, code: int | str) -> int:
        return int(self.data["status"].get(str(code), 0))

    def instance(self, name: str) -> int:
        return int(self.data["instance"].get(name, 0))

    def ok_by(self, name: str) -> int:
        return int(self.data["status_instance"].get(f"200 {name}", 0))

    @property
    def errors(self) -> dict[str, int]:
        return dict(self.data["errors"])

    @property
    def chains(self) -> dict[str, int]:
        return dict(self.data["chains"])

    @property
    def key_instance(self) -> dict[str, dict[str, int]]:
        return dict(self.data["key_instance"])

    @property
    def samples(self) -> list[list[Any]]:
        return list(self.data.get("samples", []))

    def all_ok(self) -> bool:
        """Every request answered 200 by the app, with no error hop down the chain."""
        return (not self.errors and self.status(200) == self.answered > 0
                and not any("/error" in chain for chain in self.chains))

    def brief(self) -> str:
        shown = {key: value for key, value in self.data.items() if key != "samples"}
        return json.dumps(shown, sort_keys=True)[:3000]

    def __repr__(self) -> str:
        return f"Load({self.brief()})"


def client_args(url: str, requests: int | None = 100, concurrency: int = 4, method: str = "GET",
                headers: dict[str, str] | None = None, cycle: tuple[str, list[str]] | None = None,
                samples: bool = False, pause: float = 0.0, stop_file: str | None = None) -> list[str]:
    argv = [url, "-c", str(concurrency), "-X", method]
    if requests is not None:
        argv += ["-n", str(requests)]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}:{value}"]
    if cycle is not None:
        argv += ["--header-cycle", f"{cycle[0]}:{','.join(cycle[1])}"]
    if samples:
        argv.append("--samples")
    if pause:
        argv += ["--pause", str(pause)]
    if stop_file:
        argv += ["--stop-file", stop_file]
    return argv


def send(lab: LabUp, url: str, requests: int = 100, concurrency: int = 4, host: str = "vm1",
         **options: Any) -> Load:
    """`requests` requests from `host` to url (on that host's loopback: an outbound listener stands in for the
    app), `concurrency` at a time; what came back."""
    argv = client_args(url, requests, concurrency, **options)
    text = out(lab, host, "python3 - " + " ".join(map(shlex.quote, argv)), input=CLIENT.read_text(), timeout=300)
    return Load(json.loads(text.strip().splitlines()[-1]))


@dataclass
class Background:
    load: Load | None = None


@contextmanager
def background_load(lab: LabUp, url: str, concurrency: int = 4, pause: float = 0.005,
                    host: str = "vm1") -> Iterator[Background]:
    """Requests from `host` to url while the block runs (from before it starts to after it ends); the result is
    filled in when the block ends."""
    stop = f"/run/mesh-e2e-traffic-{os.getpid()}-{time.monotonic_ns()}"
    argv = client_args(url, None, concurrency, pause=pause, stop_file=stop)
    out(lab, host, f"cat > {stop}.py", input=CLIENT.read_bytes())
    command = f"python3 {stop}.py " + " ".join(map(shlex.quote, argv))
    process = subprocess.Popen(lab.ssh_argv(host, command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    result = Background()
    time.sleep(1.0)
    try:
        yield result
    finally:
        time.sleep(1.0)
        sh(lab, host, f"touch {stop}")
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        sh(lab, host, f"rm -f {stop} {stop}.py")
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            result.load = Load(json.loads(lines[-1]))
        except (ValueError, IndexError):
            raise AssertionError(f"the background load on {host} printed no result: {stdout!r} {stderr!r}") from None


# ---- statistics ----------------------------------------------------------------------------------------------

def binomial_bounds(n: int, p: float, sigmas: float = SIGMAS) -> tuple[float, float]:
    """[low, high] of a count of n trials of probability p, `sigmas` standard deviations around its mean."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def within(count: int, n: int, p: float, sigmas: float = SIGMAS) -> bool:
    low, high = binomial_bounds(n, p, sigmas)
    return low <= count <= high


# ---- the demo app's behaviour --------------------------------------------------------------------------------

def behave(lab: LabUp, instance: str, settings: dict[str, Any] | None, port: int = API_PORT) -> None:
    """Write (None: remove) the behaviour file of an api instance (V1 or V2), in its container when it has one."""
    host, container = API_INSTANCES[instance]
    words = ["python3", SCRIPT_PATH, "behave", str(port)] + ([json.dumps(settings)] if settings is not None else [])
    command = " ".join(map(shlex.quote, words))
    if container:
        command = f"docker exec {shlex.quote(container)} {command}"
    out(lab, host, command)


def behave_normally(lab: LabUp) -> None:
    for instance in API_INSTANCES:
        behave(lab, instance, None)


# ---- the traffic commands ------------------------------------------------------------------------------------

def mesh_cli(inventory: Path, *args: str, timeout: float = CLI_TIMEOUT) -> Run:
    """`mesh ARGS -i inventory` (route, fault, rollout and logs take the inventory as an option)."""
    return run_mesh(*args, "-i", str(inventory), timeout=timeout)


def route_show(inventory: Path, service: str = "api") -> dict[str, Any]:
    run = mesh_cli(inventory, "route", "show", service, "--json")
    assert run.code == 0, f"`mesh route show {service} --json` failed:\n{run}"
    return dict(json.loads(run.stdout))


def catch_all(shown: dict[str, Any]) -> dict[str, int] | None:
    """The `to` of the last route when it matches every request ({} = every instance), else None."""
    routes = shown.get("routes") or []
    if not routes or routes[-1].get("match") is not None:
        return None
    return dict(routes[-1].get("to") or {})


def wait_routed(inventory: Path, split: dict[str, int], service: str = "api") -> dict[str, Any]:
    """Poll `mesh route show` until its catch-all route has `split` and the controller reports it applied."""
    return wait_for(lambda: route_show(inventory, service),
                    lambda shown: catch_all(shown) == split and bool(shown["controller"]["applied"]),
                    f"`mesh route show {service}` showing {split} applied", timeout=90, interval=1.0)


def reset_overrides(inventory: Path, service: str = "api") -> None:
    """Drop the service's run-time override (split and fault) without waiting: cleanup, never judged."""
    mesh_cli(inventory, "route", "reset", service, "--no-wait")


# ---- proxies' counters ---------------------------------------------------------------------------------------

def metrics_url(inventory: Path, host: str, service: str) -> str:
    """The metrics port URL of `service`'s proxy on `host` as the inventory places it."""
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    for managed in mesh.hosts:
        for workload in managed.workloads:
            if managed.name == host and workload.service == service:
                return f"http://{managed.connection.address}:{workload.metrics_port}/stats/prometheus"
    raise AssertionError(f"no {service} on {host} in {inventory}")


def counter(lab: LabUp, url: str, *names: str, reader: str = "ctl1") -> float:
    """The sum of every sample of the metrics `names` (any labels) that a proxy's metrics port shows, read from
    a controller (metrics ports answer the scrapers and the controllers only)."""
    text = out(lab, reader, f"curl -sS --fail --max-time 10 {shlex.quote(url)}", timeout=30)
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            total += float(line.rsplit(" ", 1)[1])
    return total
