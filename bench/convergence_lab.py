"""bench/convergence's lab part: how long a Consul change (`mesh drain SERVICE HOST`, then its undo) takes to reach
every caller's Envoy (/clusters) and real traffic, against a baseline making the same change by writing the
endpoint file on the callers directly.

- **Callers**: every proxy of the controller's spec (/etc/mesh/controller/spec.json on the first controller)
  whose endpoint file is filled from SERVICE. On each caller host an observer (Python, stdlib, run over SSH)
  polls the proxy's admin socket `/clusters` every few ms and writes a line whenever the cluster's host set
  changes; on VM callers it also sends requests one after the other (a new connection each) to the caller's
  outbound listener for SERVICE and writes which host answered (the demo app's first hop). The lab's nodes
  share this machine's clock, so the observers' times and the bench's compare directly.
- **controller**: t0 is the moment the drain check's write to Consul returned (mesh.drain.apply_drain in the
  bench's process, the write wrapped to time it); runs alternate drain and undo.
- **baseline**: every controller stopped; the same endpoint files (SERVICE's instance on HOST removed, then back)
  are written on each caller over an open SSH connection (ControlMaster) and renamed into place: t0 is just before
  the bench sends it (SSH and the write included, as a controller's push includes them); the rename's own time on
  the host is also kept ("file"). The controllers are started again at the end, the files restored.
- Per run: the /clusters time (the last caller's Envoy showing the change) and the traffic time (drain: the first
  request after the last one answered by HOST; undo: the first request answered by HOST), p50 and p99 per kind,
  and the ratios controller/baseline.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from convergence_fanout import log, percentile

OBSERVER = r"""
import http.client, json, os, socket, sys, threading, time
sock, cluster, port, out_path, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
out = open(out_path, "a", buffering=1)
lock = threading.Lock()

def write(line):
    with lock:
        out.write(line + "\n")

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(sock)

def hosts():
    conn = Unix("admin")
    try:
        conn.request("GET", "/clusters")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    prefix = cluster + "::"
    return sorted({l.split("::")[1] for l in body.splitlines()
                   if l.startswith(prefix) and l.split("::")[2:3] == ["health_flags"]})

def poll():
    seen = None
    while not os.path.exists(stop):
        at = time.time()
        try:
            now = ",".join(hosts())
        except Exception as exc:
            now = "!" + type(exc).__name__
        if now != seen:
            write(f"C {at:.4f} {now}")
            seen = now
        time.sleep(0.003)

def requests():
    while not os.path.exists(stop):
        at = time.time()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            answer = json.loads(conn.getresponse().read())
            conn.close()
            write(f"R {at:.4f} {answer['hops'][0].get('host')}")
        except Exception as exc:
            write(f"E {at:.4f} {type(exc).__name__}")
        time.sleep(0.005)

threads = [threading.Thread(target=poll)] + ([threading.Thread(target=requests)] if port else [])
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@dataclass(frozen=True)
class Caller:
    host: str
    address: str
    proxy: str
    proxy_dir: str
    eds_path: str
    cluster: str
    local_port: int  # 0: no traffic from this caller (a container's outbound listener is in its namespace)


@dataclass
class Ssh:
    """OpenSSH with the lab inventory's key and known_hosts; a ControlMaster per address (fast repeated calls)."""

    user: str
    key: str
    common_args: str
    folder: Path
    masters: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def argv(self, address: str) -> list[str]:
        return ["ssh", "-i", self.key, "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-o", f"ControlPath={self.folder}/ssh-%h", *shlex.split(self.common_args), f"{self.user}@{address}"]

    def master(self, address: str) -> None:
        if address not in self.masters:
            self.masters[address] = subprocess.Popen(
                [*self.argv(address)[:-1], "-o", "ControlMaster=yes", "-N", f"{self.user}@{address}"],
                stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not Path(f"{self.folder}/ssh-{address}").exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"no SSH master connection to {address}")
                time.sleep(0.05)

    def run(self, address: str, script: str, input: bytes | None = None, timeout: float = 120,
            check: bool = True) -> str:
        done = subprocess.run([*self.argv(address), script], input=input, capture_output=True, timeout=timeout,
                              check=False, stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise SystemExit(f"ssh {address} {script[:80]!r}: exit {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')[-1500:]}")
        return done.stdout.decode(errors="replace")

    def close(self) -> None:
        for process in self.masters.values():
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass
class Lab:
    inventory: Path
    mesh: Any
    ssh: Ssh
    addresses: dict[str, str]
    controllers: list[str]

    @classmethod
    def read(cls, inventory: Path, folder: Path) -> Lab:
        from mesh.inventory.check import check_inventory
        from mesh.inventory.loader import load_inventory

        mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
        data = yaml.safe_load(inventory.read_text())["all"]
        variables = data.get("vars") or {}
        addresses, controllers = {}, []
        for group, body in (data.get("children") or {}).items():
            for name, host_vars in ((body or {}).get("hosts") or {}).items():
                addresses[name] = str((host_vars or {}).get("ansible_host", name))
                if group == "mesh_controllers":
                    controllers.append(name)
        ssh = Ssh(str(variables.get("ansible_user", "root")), str(variables["ansible_ssh_private_key_file"]),
                  str(variables.get("ansible_ssh_common_args", "")), folder)
        return cls(inventory, mesh, ssh, addresses, controllers)

    def sh(self, host: str, script: str, **kwargs: Any) -> str:
        return self.ssh.run(self.addresses[host], script, **kwargs)


# ---- Consul --------------------------------------------------------------------------------------------------

def consul_get(lab: Lab, path: str) -> Any:
    from mesh.catalog import access_for

    access = access_for(lab.mesh)
    headers = {"X-Consul-Token": access.token} if access.token else {}
    request = urllib.request.Request(f"{access.url.rstrip('/')}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)
    except OSError as exc:
        if getattr(exc, "code", None) == 404:
            return None
        raise


def leader(lab: Lab) -> str | None:
    from mesh.controller.spec import lock_key

    entries = consul_get(lab, f"/v1/kv/{lock_key(lab.mesh.settings.id)}")
    if not entries or not entries[0].get("Session"):
        return None
    value = json.loads(base64.b64decode(entries[0]["Value"] or b"").decode() or "{}")
    return str(value.get("holder", "?")).rsplit(":", 1)[0]


class TimedDrains:
    """mesh.drain's Consul catalog, keeping the time each write to Consul returned."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[float] = []

    def states(self, service: str) -> Any:
        return self.inner.states(service)

    def set(self, ref: Any, output: str) -> None:
        self.inner.set(ref, output)
        self.written.append(time.time())

    def clear(self, ref: Any) -> None:
        self.inner.clear(ref)
        self.written.append(time.time())


def consul_change(lab: Lab, service: str, host: str, undo: bool) -> float:
    """`mesh drain SERVICE HOST [--undo]` in this process: the time its write to Consul returned."""
    from datetime import UTC, datetime

    from mesh.catalog import access_for
    from mesh.drain import ConsulDrains, apply_drain

    drains = TimedDrains(ConsulDrains(access_for(lab.mesh)))
    changes = apply_drain(lab.mesh, service, host, undo, drains, "bench/convergence", lambda: datetime.now(UTC))
    if not drains.written:
        raise SystemExit(f"mesh drain {service} {host}{' --undo' if undo else ''} wrote nothing: "
                         f"{[change.line() for change in changes]}")
    return drains.written[-1]


# ---- callers and observers -----------------------------------------------------------------------------------

def callers(lab: Lab, service: str) -> list[Caller]:
    """Every proxy whose endpoint file the controller fills from `service` (the first controller's spec)."""
    from mesh.config import paths
    from mesh.controller.spec import SPEC_PATH, parse_spec

    spec = parse_spec(lab.sh(lab.controllers[0], f"cat {SPEC_PATH}"), f"{lab.controllers[0]}:{SPEC_PATH}")
    found = []
    for host in spec.hosts:
        for proxy in host.proxies:
            for eds_path, upstream in proxy.endpoints.items():
                if upstream.service != service or upstream.version is not None:
                    continue
                content = next(file.content for file in proxy.files if file.path == eds_path)
                cluster = str(yaml.safe_load(content)["resources"][0]["cluster_name"])
                port = 0
                managed = next((item for item in lab.mesh.hosts if item.name == host.name), None)
                if managed is not None and managed.kind == "vm":
                    for workload in managed.workloads:
                        if paths.proxy_name(workload) == proxy.name:
                            port = next((u.local_port for u in workload.upstreams if u.service == service), 0)
                found.append(Caller(host.name, lab.addresses.get(host.name, host.address), proxy.name,
                                    proxy.proxy_dir, eds_path, cluster, port))
    return found


@dataclass
class Observer:
    caller: Caller
    file: str
    stop: str
    process: subprocess.Popen[bytes]


def start_observers(lab: Lab, found: list[Caller]) -> list[Observer]:
    observers = []
    for caller in found:
        tag = f"{os.getpid()}-{caller.proxy}"
        file, stop = f"/run/mesh-bench-conv-{tag}.log", f"/run/mesh-bench-conv-{tag}.stop"
        lab.sh(caller.host, f"rm -f {file} {stop}")
        script = (f"python3 -c {shlex.quote(OBSERVER)} {caller.proxy_dir}/admin/admin.sock {caller.cluster} "
                  f"{caller.local_port} {file} {stop}")
        process = subprocess.Popen([*lab.ssh.argv(caller.address), script], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        observers.append(Observer(caller, file, stop, process))
    time.sleep(2.0)
    return observers


def stop_observers(lab: Lab, observers: list[Observer]) -> dict[str, list[tuple[str, float, str]]]:
    """Every observer stopped; its lines (kind, time, value) per caller proxy."""
    found = {}
    for observer in observers:
        lab.sh(observer.caller.host, f"touch {observer.stop}", check=False)
    for observer in observers:
        try:
            observer.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            observer.process.kill()
        text = lab.sh(observer.caller.host, f"cat {observer.file}; rm -f {observer.file} {observer.stop}",
                      check=False)
        found[observer.caller.proxy] = parse_lines(text)
    return found


def parse_lines(text: str) -> list[tuple[str, float, str]]:
    lines = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2:
            lines.append((parts[0], float(parts[1]), parts[2] if len(parts) > 2 else ""))
    return lines


def cluster_now(lab: Lab, observer: Observer) -> str:
    text = lab.sh(observer.caller.host, f"grep '^C ' {observer.file} | tail -n 1", check=False)
    parts = text.strip().split(" ", 2)
    return parts[2] if len(parts) > 2 else ""


def wait_clusters(lab: Lab, observers: list[Observer], drained: str, present: bool, timeout: float = 60) -> None:
    """Until every caller's Envoy shows `drained` (address:) present or absent."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [cluster_now(lab, observer) for observer in observers]
        if all((f"{drained}:" in hosts) == present and not hosts.startswith("!") for hosts in seen):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the change did not reach every caller's Envoy in {timeout:.0f} s: {seen}")
        time.sleep(0.3)


# ---- one measured change -------------------------------------------------------------------------------------

@dataclass
class Change:
    kind: str  # controller | baseline
    undo: bool
    t0: float
    t0_file: float | None = None


def latencies(change: Change, end: float, lines: Mapping[str, list[tuple[str, float, str]]], drained_address: str,
              drained_host: str) -> tuple[float | None, float | None]:
    """(/clusters time: the last caller's Envoy showing the change, traffic time) after change.t0."""
    cluster_times = []
    for events in lines.values():
        hits = [at for kind, at, value in events if kind == "C" and change.t0 <= at < end
                and (f"{drained_address}:" in value) == change.undo and not value.startswith("!")]
        cluster_times.append(min(hits) - change.t0 if hits else None)
    cluster = None if not cluster_times or None in cluster_times else max(t for t in cluster_times if t is not None)
    traffic_times = []
    for events in lines.values():
        requests = [(at, value) for kind, at, value in events if kind == "R" and change.t0 <= at < end]
        if not requests:
            continue
        if change.undo:
            back = [at for at, value in requests if value == drained_host]
            traffic_times.append(back[0] - change.t0 if back else None)
        else:
            last = max((i for i, (_at, value) in enumerate(requests) if value == drained_host), default=-1)
            if last + 1 < len(requests):
                traffic_times.append(max(0.0, requests[last + 1][0] - change.t0))
            else:
                traffic_times.append(None)
    traffic = None if not traffic_times or None in traffic_times else max(t for t in traffic_times if t is not None)
    return cluster, traffic


def baseline_files(lab: Lab, found: list[Caller], drained_address: str) -> dict[str, tuple[str, str]]:
    """Per caller proxy: (its endpoint file as it is now, with the drained host; the same without it)."""
    files = {}
    for caller in found:
        text = lab.sh(caller.host, f"cat {caller.eds_path}")
        data = yaml.safe_load(text)
        for resource in data["resources"]:
            for locality in resource.get("endpoints") or []:
                locality["lb_endpoints"] = [
                    item for item in locality.get("lb_endpoints") or []
                    if item["endpoint"]["address"]["socket_address"]["address"] != drained_address]
        data["version_info"] = f"bench-without-{drained_address}"
        files[caller.proxy] = (text, "# bench/convergence baseline\n" + yaml.safe_dump(data, sort_keys=False))
    return files


def write_file(lab: Lab, caller: Caller, content: str) -> float:
    """The endpoint file written and renamed into place on the caller; the time there right before the rename."""
    staging = f"{caller.proxy_dir}/.bench-eds"
    script = (f"cat > {staging} && chmod 0640 {staging} && chgrp --reference={caller.eds_path} {staging} && "
              f"t=$(date +%s.%N) && mv -f {staging} {caller.eds_path} && echo $t")
    return float(lab.ssh.run(caller.address, script, input=content.encode()).strip())


def run_lab(inventory: Path, service: str, host: str, runs: int, pause: float,
            delivery: str = "files") -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="mesh-bench-conv-lab-"))
    lab = Lab.read(inventory, folder)
    try:
        return _run_lab(lab, service, host, runs, pause, delivery)
    finally:
        lab.ssh.close()
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def check_delivery(lab: Lab, found: list[Caller], delivery: str) -> None:
    """Every caller's Envoy started with `delivery` (its admin/delivery marker; a files proxy may have none)."""
    from mesh.config.xds import DELIVERY_MARKER

    wrong = []
    for caller in found:
        marker = lab.sh(caller.host, f"cat {caller.proxy_dir}/admin/{DELIVERY_MARKER} 2>/dev/null || true",
                        check=False).strip() or "files"
        if marker != delivery:
            wrong.append(f"{caller.host}/{caller.proxy}: {marker}")
    if wrong:
        raise SystemExit(f"--delivery {delivery}: callers whose Envoy started otherwise: {', '.join(wrong)} (deploy the "
                         f"lab with mesh_delivery: {delivery}, and wait for the proxies to move)")


def _run_lab(lab: Lab, service: str, host: str, runs: int, pause: float, delivery: str = "files") -> dict[str, Any]:

    active = leader(lab)
    if active is None:
        raise SystemExit("no controller holds the lock: deploy a mesh with controllers first")
    found = callers(lab, service)
    if not found:
        raise SystemExit(f"no proxy's endpoints are filled from {service} in the controller's spec")
    check_delivery(lab, found, delivery)
    drained_address = lab.addresses[host]
    log(f"lab: delivery {delivery}; active controller {active}; callers of {service}: "
        f"{', '.join(f'{c.host}/{c.proxy}' for c in found)}; changing {service} on {host} ({drained_address})")
    for caller in found:
        lab.ssh.master(caller.address)
    observers = start_observers(lab, found)
    changes: list[Change] = []
    try:
        wait_clusters(lab, observers, drained_address, present=True)
        controller_phase = time.time()
        for number in range(runs):  # the controller: a drain, then its undo, ...
            undo = number % 2 == 1
            changes.append(Change("controller", undo, consul_change(lab, service, host, undo)))
            wait_clusters(lab, observers, drained_address, present=undo)
            time.sleep(pause)
        if runs % 2:
            consul_change(lab, service, host, True)
            wait_clusters(lab, observers, drained_address, present=True)
        pushes = pushed_durations(lab, controller_phase, time.time())
        if delivery == "xds":  # ADS Envoys do not read the files: the files numbers come from a files deploy
            log("lab: xds: no file-writing baseline (run --delivery files on a files deploy for that side)")
        else:
            _run_baseline(lab, found, observers, drained_address, runs, pause, changes)
    finally:
        lines = stop_observers(lab, observers)
    results: dict[str, Any] = {"callers": [f"{c.host}/{c.proxy}" for c in found], "runs": [], "pushes_s": pushes}
    for index, change in enumerate(changes):
        end = changes[index + 1].t0 if index + 1 < len(changes) else float("inf")
        cluster, traffic = latencies(change, end, lines, drained_address, host)
        entry = {"kind": change.kind, "undo": change.undo, "clusters_s": cluster, "traffic_s": traffic}
        if change.t0_file is not None:
            file_change = Change(change.kind, change.undo, change.t0_file)
            entry["clusters_from_file_s"] = latencies(file_change, end, lines, drained_address, host)[0]
        results["runs"].append(entry)
    results["failed_requests"] = sum(1 for events in lines.values() for kind, _at, _v in events if kind == "E")
    results["requests"] = sum(1 for events in lines.values() for kind, _at, _v in events if kind == "R")
    return results


def _run_baseline(lab: Lab, found: list[Caller], observers: list[Observer], drained_address: str, runs: int,
                  pause: float, changes: list[Change]) -> None:
    """The controllers stopped, the same endpoint files written on every caller directly; all restored."""
    from mesh.controller.spec import CONTROLLER_UNIT

    files = baseline_files(lab, found, drained_address)
    log("baseline: stopping the controllers, writing the endpoint files directly")
    for name in lab.controllers:
        lab.sh(name, f"systemctl stop {CONTROLLER_UNIT}")
    try:
        for number in range(runs):
            undo = number % 2 == 1
            t0 = time.time()
            at_file = [write_file(lab, caller, files[caller.proxy][0 if undo else 1]) for caller in found]
            changes.append(Change("baseline", undo, t0, min(at_file)))
            wait_clusters(lab, observers, drained_address, present=undo)
            time.sleep(pause)
    finally:
        for caller in found:
            write_file(lab, caller, files[caller.proxy][0])
        for name in lab.controllers:
            lab.sh(name, f"systemctl start {CONTROLLER_UNIT}", check=False)
        wait_clusters(lab, observers, drained_address, present=True)


def pushed_durations(lab: Lab, since: float, until: float) -> list[float]:
    """The controllers' `pushed` log lines between since and until: each push's duration (one `apply` over SSH:
    the host's Envoy validation and the moves), in seconds."""
    from mesh.controller.spec import CONTROLLER_UNIT

    found = []
    for name in lab.controllers:
        text = lab.sh(name, f"journalctl -u {CONTROLLER_UNIT} --since @{int(since)} --until @{int(until) + 1} "
                            "-o cat --no-pager", check=False)
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == "pushed" and "duration_ms" in entry:
                found.append(float(entry["duration_ms"]) / 1000)
    return found


def _stats(values: list[float | None]) -> str:
    measured = [v for v in values if v is not None]
    missing = len(values) - len(measured)
    if not measured:
        return "no value"
    text = (f"p50 {percentile(measured, 0.5) * 1000:7.1f} ms  p99 {percentile(measured, 0.99) * 1000:7.1f} ms  "
            f"mean {statistics.mean(measured) * 1000:7.1f} ms")
    return text + (f"  ({missing} not seen)" if missing else "")


def print_lab(results: dict[str, Any]) -> None:
    runs = results["runs"]
    print(f"\n## convergence on the lab: callers {', '.join(results['callers'])}; "
          f"{sum(1 for r in runs if r['kind'] == 'controller')} changes per kind (drain and undo alternating)")
    for kind in ("controller", "baseline"):
        mine = [r for r in runs if r["kind"] == kind]
        print(f"  {kind:10}  /clusters  {_stats([r['clusters_s'] for r in mine])}")
        print(f"  {'':10}  traffic    {_stats([r['traffic_s'] for r in mine])}")
        for undo, label in ((False, "drain"), (True, "undo")):
            part = [r for r in mine if r["undo"] == undo]
            print(f"  {'':10}  {label:5} /clusters {_stats([r['clusters_s'] for r in part])}; "
                  f"traffic {_stats([r['traffic_s'] for r in part])}")
        if kind == "baseline":
            print(f"  {'':10}  from the rename on the host to /clusters: "
                  f"{_stats([r.get('clusters_from_file_s') for r in mine])}")
    if results["pushes_s"]:
        print(f"  the controller's pushes in its runs (one apply over SSH each: the host's Envoy validation, the "
              f"moves): {len(results['pushes_s'])}, {_stats(results['pushes_s'])}")
    for metric in ("clusters_s", "traffic_s"):
        ours = [r[metric] for r in runs if r["kind"] == "controller" and r[metric] is not None]
        base = [r[metric] for r in runs if r["kind"] == "baseline" and r[metric] is not None]
        if ours and base and percentile(base, 0.5) > 0:
            print(f"  ratio controller/baseline ({metric[:-2]}): p50 {percentile(ours, 0.5) / percentile(base, 0.5):.1f}x"
                  f"  p99 {percentile(ours, 0.99) / percentile(base, 0.99):.1f}x")
    ours = [r["clusters_s"] for r in runs if r["kind"] == "controller" and r["clusters_s"] is not None]
    if ours:
        print(f"  goal p99 < 0.5 s (Consul change to every caller's /clusters): "
              f"{'pass' if percentile(ours, 0.99) < 0.5 else 'miss'}")
    print(f"  requests during the bench: {results['requests']}, failed: {results['failed_requests']}")
