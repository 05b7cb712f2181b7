"""Helpers of the plan and rollout end-to-end tests (test_plan_lab.py, test_rollout_lab.py): `mesh plan`'s and
`mesh deploy --json`'s change sets, a request loop on vm1 through web's outbound listener to api, the Envoy
processes of the lab (unit PIDs, sidecar containers), and the lab deployed back from inventory/lab.yaml.
Every probe returns what it saw; the tests decide.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from deploy_helpers import INVENTORY, Run, hops, out, run_mesh, sh, wait_for
from lab_helpers import LabUp

from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh

DEPLOY_TIMEOUT = 900.0
CONSUL = "http://10.77.0.2:8500"
# The lab's proxies (stable names: <service>-<app port> on VMs, <service>-<container> on container hosts).
VM_UNITS = {"vm1": ["mesh-envoy-web-8080.service"],
            "vm2": ["mesh-envoy-api-9090.service", "mesh-envoy-db-5432.service"]}
SIDECARS = {"dock1": ["mesh-envoy-api-api-v2-1"]}
WEB_TO_API = 19101  # web's outbound listener to api on vm1 (inventory/lab.yaml)

ChangeKey = tuple[str, str, str, str]


def lab_state_dir() -> str:
    """mesh_state_dir of inventory/lab.yaml as an absolute path (copies keep the CA and the retry file)."""
    return os.path.abspath(build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir)


def retry_file() -> str:
    return os.path.join(lab_state_dir(), "deploy.retry")


# ---- plan and deploy ---------------------------------------------------------------------------------------

def plan(inventory: Any = INVENTORY, *args: str) -> Run:
    return run_mesh("plan", str(inventory), *args, timeout=300)


def plan_json(inventory: Any = INVENTORY, *args: str) -> dict[str, Any]:
    """`mesh plan --json`'s document; the run must exit 0."""
    run = plan(inventory, "--json", *args)
    assert run.code == 0, f"`mesh plan --json` failed:\n{run}"
    return dict(json.loads(run.stdout))


def deploy(inventory: Any = INVENTORY, *args: str) -> Run:
    return run_mesh("deploy", str(inventory), *args, timeout=DEPLOY_TIMEOUT)


def deploy_json(inventory: Any = INVENTORY, *args: str) -> tuple[Run, dict[str, Any]]:
    """`mesh deploy --json`: the run and its JSON document (stdout; the transcript is on stderr)."""
    run = deploy(inventory, "--json", *args)
    try:
        document = json.loads(run.stdout)
    except ValueError:
        raise AssertionError(f"`mesh deploy --json` printed no JSON document:\n{run}") from None
    return run, dict(document)


def keys(changes: list[dict[str, Any]]) -> set[ChangeKey]:
    """The change set as (host, kind, subject, action)."""
    return {(c["host"], c["kind"], c["subject"], c["action"]) for c in changes}


# A change mesh plans on ctl1 whenever this checkout's sources changed since the last deploy (other work edits them
# while the tests run): not what these tests look at.
CHECKER_INSTALL = ("ctl1", "checker", "environment", "install")


def converged(inventory: Any = INVENTORY) -> Run:
    """`mesh plan`, which must say `no changes` (the checker's wheels, rebuilt when the sources change, aside)."""
    run = plan(inventory, "--json")
    assert run.code == 0, f"`mesh plan --json` failed:\n{run}"
    left = keys(json.loads(run.stdout)["changes"]) - {CHECKER_INSTALL}
    assert not left, f"the plan still has changes: {sorted(left)}\n{plan(inventory).stdout}"
    return run


def deploy_lab_back(lab: LabUp) -> Run:
    """inventory/lab.yaml deployed (again when the first run left a host failed: a checker of another checkout
    on ctl1 is updated by the controller play, after the proxies' plays), then checked: `no changes`."""
    run = deploy(INVENTORY)
    if run.code != 0:
        run = deploy(INVENTORY)
    assert run.code == 0, f"inventory/lab.yaml could not be deployed back:\n{run}"
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "the demo chain web -> api -> db after deploying the lab",
             timeout=60)
    return run


def chain_ok(seen: list[dict[str, Any]] | str) -> bool:
    """web on vm1 answered web -> api (vm2 or dock1) -> db (vm2) with no error hop."""
    if isinstance(seen, str) or any("error" in hop for hop in seen):
        return False
    return [hop.get("service") for hop in seen] == ["web", "api", "db"]


# ---- the lab's Envoys --------------------------------------------------------------------------------------

def envoy_processes(lab: LabUp) -> dict[str, str]:
    """Every Envoy of the lab: each unit's MainPID and state, each sidecar's container id, PID and start time."""
    found: dict[str, str] = {}
    for host, units in VM_UNITS.items():
        text = out(lab, host, f"systemctl show -p Id -p MainPID -p ActiveState {' '.join(units)}")
        for block in text.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            found[f"{host}:{fields.get('Id')}"] = f"{fields.get('MainPID')} {fields.get('ActiveState')}"
    for host, names in SIDECARS.items():
        for name in names:
            found[f"{host}:{name}"] = out(lab, host, "docker container inspect -f "
                                                     f"'{{{{.Id}}}} {{{{.State.Pid}}}} {{{{.State.StartedAt}}}}' {name}").strip()
    return found


def status_json(inventory: Any = INVENTORY) -> dict[str, Any]:
    run = run_mesh("status", str(inventory), "--json", timeout=300)
    try:
        return dict(json.loads(run.stdout))
    except ValueError:
        raise AssertionError(f"`mesh status --json` printed no JSON:\n{run}") from None


def proxy_status(report: dict[str, Any], host: str, proxy: str) -> dict[str, Any]:
    for entry in report["hosts"]:
        if entry["host"] == host:
            for found in entry["proxies"]:
                if found["proxy"] == proxy:
                    return dict(found)
    raise AssertionError(f"`mesh status --json` shows no proxy {proxy} on {host}: {json.dumps(report)[:2000]}")


# ---- a request loop ----------------------------------------------------------------------------------------

_LOOP = r"""
import json, os, sys, time, urllib.request
stop, url = sys.argv[1], sys.argv[2]
ok, errors, started = 0, [], time.time()
while not os.path.exists(stop):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            hops = json.loads(answer.read()).get("hops")
        if not isinstance(hops, list) or any("error" in hop for hop in hops):
            errors.append(f"{time.time() - started:.2f}s: {json.dumps(hops)[:300]}")
        else:
            ok += 1
    except Exception as exc:
        errors.append(f"{time.time() - started:.2f}s: {type(exc).__name__}: {exc}"[:300])
    time.sleep(0.02)
os.unlink(stop)
print(json.dumps({"ok": ok, "failed": len(errors), "errors": errors[:30]}))
"""


@dataclass
class LoopResult:
    ok: int = 0
    failed: int = -1
    errors: tuple[str, ...] = ()


@contextmanager
def request_loop(lab: LabUp, port: int = WEB_TO_API, host: str = "vm1") -> Iterator[LoopResult]:
    """Requests one after the other (a new connection each) from host to 127.0.0.1:port (web's outbound
    listener to api: api on vm2 or dock1, then db on vm2) while the body runs; a request fails on any exception,
    an HTTP error, or an error hop. The result is filled in when the block ends (at least one request ran)."""
    stop = f"/run/mesh-e2e-loop-{os.getpid()}-{time.monotonic_ns()}"
    argv = lab.ssh_argv(host, f"python3 -c {shlex.quote(_LOOP)} {shlex.quote(stop)} http://127.0.0.1:{port}/")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result = LoopResult()
    time.sleep(2.0)  # the loop runs before the change starts
    try:
        yield result
    finally:
        time.sleep(3.0)  # and a while after it, when reloads settle
        sh(lab, host, f"touch {shlex.quote(stop)}")
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        text = stdout.decode(errors="replace").strip().splitlines()
        try:
            seen = json.loads(text[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"the request loop on {host} printed no result: {stdout!r} {stderr!r}") from None
        result.ok, result.failed, result.errors = seen["ok"], seen["failed"], tuple(seen["errors"])
