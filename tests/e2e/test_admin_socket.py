"""End to end on the lab (issue 16): Envoy's admin API is a unix socket that only root (and Envoy's own user)
can open, on VMs and in sidecars; no admin port answers anywhere, from another host, from an unprivileged local
user or from the app container sharing a sidecar's namespace; `mesh status` still reads it as root. The Envoy
unit carries the hardening and still serves; a broken nft ruleset or unit is refused by the host's own tool
before it replaces anything; a new key is swapped in together with its certificate.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab), deploys, and leaves the lab
deployed. The refusal tests stage their broken files through mesh's own install step and leave the host's files
as they were.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from deploy_helpers import (
    INVENTORY,
    Run,
    cert_public_fingerprint,
    hops,
    out,
    public_fingerprint,
    run_mesh,
    sh,
    shared_lab,
    tcp_from,
    wait_for,
)
from lab_helpers import MESH, LabUp

from mesh.config import paths
from mesh.deploy.execute import apply_change
from mesh.deploy.modules.api import Change
from mesh.deploy.modules.builtin import install_checked, staged_path, unit_check
from mesh.deploy.steps.host import FIREWALL_CHECK
from mesh.hosts.connection import CommandResult, Connector, connect
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh

DEPLOY_TIMEOUT = 600.0
# host -> (proxy, its inventory proxy_port, its inventory admin_port: a former admin port)
VM_PROXIES = {"vm1": [("web-8080", 21000, 19000)], "vm2": [("api-9090", 21000, 19000), ("db-5432", 21001, 19001)]}
SIDECAR_HOST, SIDECAR_PROXY, SIDECAR_PROXY_PORT, SIDECAR_ADMIN_PORT = "dock1", "api-api-v2-1", 21000, 19000
APP_CONTAINER, SIDECAR = "api-v2-1", "mesh-envoy-api-api-v2-1"
HARDENING = {"ProtectProc": "invisible", "ProtectKernelLogs": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
             "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes"}


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        yield up


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    if run.code != 0:
        pytest.fail(f"the deploy failed, so there is no admin socket to examine:\n{run}")
    return lab


def _curl_socket(socket: str, path: str = "/ready", user: str | None = None) -> str:
    run_as = f"runuser -u {user} -- " if user else ""
    return f"{run_as}curl -sS -m 5 --unix-socket {shlex.quote(socket)} {shlex.quote('http://localhost' + path)}"


def _envoy_ports(lab: LabUp, host: str, netns_of: str | None = None) -> set[int]:
    """The TCP ports Envoy listens on (in the network namespace of container netns_of, when given)."""
    if netns_of is None:
        text = out(lab, host, "ss -ltnpH")
        lines = [line for line in text.splitlines() if '"envoy"' in line]
    else:
        pid = out(lab, host, f"docker container inspect -f '{{{{.State.Pid}}}}' {netns_of}").strip()
        lines = out(lab, host, f"nsenter -t {pid} -n ss -ltnpH").splitlines()
        lines = [line for line in lines if '"envoy"' in line]
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in lines}


# ---- the socket and who can open it -------------------------------------------------------------------------

def test_vm_admin_is_a_socket_of_envoys_user_and_root_reads_it(deployed: LabUp) -> None:
    for host, proxies in VM_PROXIES.items():
        for proxy, _proxy_port, _admin_port in proxies:
            folder, socket = paths.admin_dir(proxy), paths.admin_socket_path(proxy)
            user = paths.envoy_user(proxy)  # each proxy its own user
            assert out(deployed, host, f"stat -c '%a %U %G' {folder}").strip() == f"700 {user} {user}"
            assert out(deployed, host, f"stat -c '%a %U %F' {socket}").strip() == f"600 {user} socket"
            assert out(deployed, host, _curl_socket(socket)).strip() == "LIVE", f"{host} {proxy}"


def test_vm_admin_refuses_an_unprivileged_user_and_no_admin_port_answers(deployed: LabUp) -> None:
    for host, proxies in VM_PROXIES.items():
        for proxy, _proxy_port, admin_port in proxies:
            socket = paths.admin_socket_path(proxy)
            denied = sh(deployed, host, _curl_socket(socket, user="nobody"))
            assert denied.returncode != 0 and "LIVE" not in denied.stdout, (host, proxy, denied)
            # The folder is what stops it: nobody cannot even see the socket.
            assert sh(deployed, host, f"runuser -u nobody -- test -e {socket}").returncode != 0
            for user in ("nobody", None):  # and as root: there is no admin port at all
                run_as = f"runuser -u {user} -- " if user else ""
                port = sh(deployed, host, f"{run_as}curl -sS -m 3 http://127.0.0.1:{admin_port}/ready")
                assert port.returncode != 0 and "LIVE" not in port.stdout, (host, admin_port, user, port)


def test_vm_envoys_leave_no_hot_restart_socket_for_local_users(deployed: LabUp) -> None:
    """Hot restart is off (systemd restarts Envoy): no abstract `envoy_domain_socket_*` that any local user could
    send hot-restart requests to."""
    for host in VM_PROXIES:
        sockets = out(deployed, host, "ss -xlpH")
        assert "envoy_domain_socket" not in sockets, (host, sockets)
        assert '"envoy"' in sockets  # the admin sockets themselves are there


def test_no_admin_port_from_another_host_on_any_envoy_port(deployed: LabUp) -> None:
    """vm1 -> vm2 and vm2 -> dock1 (and vm2 -> vm1): every former admin port and every port an Envoy listens on,
    except the proxy ports (the mTLS inbound listeners, which are meant to be reached), is closed."""
    targets: dict[str, list[tuple[str, int]]] = {}
    for source, target in (("vm1", "vm2"), ("vm2", "vm1")):
        proxy_ports = {proxy_port for _p, proxy_port, _a in VM_PROXIES[target]}
        ports = {admin for _p, _pp, admin in VM_PROXIES[target]} | _envoy_ports(deployed, target)
        targets[source] = [(deployed.hosts[target], port) for port in sorted(ports - proxy_ports)]
    sidecar_ports = _envoy_ports(deployed, SIDECAR_HOST, netns_of=APP_CONTAINER) | {SIDECAR_ADMIN_PORT}
    targets["vm2"] += [(deployed.hosts[SIDECAR_HOST], port) for port in sorted(sidecar_ports - {SIDECAR_PROXY_PORT})]
    for source, probes in targets.items():
        assert probes, f"nothing to probe from {source}"
        seen = tcp_from(deployed, source, probes)
        opened = {target: state for target, state in seen.items() if not state.startswith("closed")}
        assert not opened, f"from {source}, open: {opened}"


def test_sidecar_admin_is_a_socket_in_a_host_folder_out_of_the_apps_reach(deployed: LabUp) -> None:
    folder, socket = paths.admin_dir(SIDECAR_PROXY), paths.admin_socket_path(SIDECAR_PROXY)
    assert out(deployed, SIDECAR_HOST, f"stat -c '%a %u %g' {folder}").strip() == "700 64101 64101"
    assert out(deployed, SIDECAR_HOST, f"stat -c '%a %u %F' {socket}").strip() == "600 64101 socket"
    assert out(deployed, SIDECAR_HOST, _curl_socket(socket)).strip() == "LIVE"
    denied = sh(deployed, SIDECAR_HOST, _curl_socket(socket, user="nobody"))
    assert denied.returncode != 0 and "LIVE" not in denied.stdout
    # The app container shares the sidecar's network namespace, but not its files: no admin port, no socket.
    probe = ("import os, socket\n"
             f"print(os.path.exists({socket!r}))\n"
             "try:\n"
             f"    socket.create_connection(('127.0.0.1', {SIDECAR_ADMIN_PORT}), 2)\n"
             "    print('open')\n"
             "except OSError as e:\n"
             "    print('closed', type(e).__name__)\n")
    seen = out(deployed, SIDECAR_HOST, f"docker exec -i {APP_CONTAINER} python3 -", input=probe).split("\n")
    assert seen[0] == "False" and seen[1].startswith("closed"), seen
    # Abstract unix sockets belong to the network namespace: the sidecar's Envoy runs without hot restart, so
    # the app sees no `envoy_domain_socket_*` it could send hot-restart requests to.
    abstract = out(deployed, SIDECAR_HOST, f"docker exec -i {APP_CONTAINER} python3 -",
                   input="print(open('/proc/net/unix').read())")
    assert "envoy_domain_socket" not in abstract, abstract
    # Only the admin folder is writable in the sidecar; the rest of the proxy's folder stays read-only.
    mounts = out(deployed, SIDECAR_HOST, f"docker container inspect -f "
                                         f"'{{{{range .Mounts}}}}{{{{.Destination}}}}={{{{.RW}}}} {{{{end}}}}' {SIDECAR}")
    assert dict(item.split("=") for item in mounts.split()) == {
        paths.proxy_dir(SIDECAR_PROXY): "false", folder: "true"}  # the trust bundle is in the proxy's folder


def test_status_reads_admin_over_the_socket_and_exits_0(deployed: LabUp) -> None:
    def status() -> Run:
        done = subprocess.run([MESH, "status", str(INVENTORY)], capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "250"})
        return Run(("status", str(INVENTORY)), done.returncode, done.stdout, done.stderr)

    seen = wait_for(status, lambda run: run.code == 0, "`mesh status` exiting 0 on a healthy mesh", timeout=60)
    version = out(deployed, "vm1", f"{paths.ENVOY_BINARY} --version")
    number = re.search(r"/(\d+\.\d+\.\d+)/", version)
    assert number is not None, version
    rows = [line for line in seen.stdout.splitlines()  # the table's rows (the survival line names a proxy too)
            if line.startswith("|") and re.search(r"\b(web-8080|api-9090|db-5432|api-api-v2-1)\b", line)]
    assert len(rows) == 4, seen  # three VM proxies and the sidecar
    for row in rows:  # Envoy's version from server_info, upstream health from /clusters: both over the socket
        assert number.group(1) in row and "applied" in row, row
    upstreams = {match.group(1): match.group(0) for row in rows for match in
                 [re.search(r"(api|db): consul \d+/\d+, envoy (\d+)/(\d+)", row)] if match}
    assert set(upstreams) == {"api", "db"}, seen
    assert "envoy 2/2" in upstreams["api"] and "envoy 1/1" in upstreams["db"], upstreams


# ---- the unit's hardening -----------------------------------------------------------------------------------

def test_envoy_units_are_hardened_and_serve_through_the_mesh(deployed: LabUp) -> None:
    for host, proxies in VM_PROXIES.items():
        for proxy, _proxy_port, _admin_port in proxies:
            unit = paths.envoy_unit_name(proxy)
            props = ["ActiveState", "NRestarts", "SystemCallFilter", "ReadWritePaths", *HARDENING]
            text = out(deployed, host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
            shown = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            assert {key: shown.get(key) for key in HARDENING} == HARDENING, (host, unit)
            assert shown["ActiveState"] == "active" and shown["NRestarts"] == "0", (host, unit, shown)
            allowed = set(shown["SystemCallFilter"].split())
            assert "read" in allowed and not allowed & {"reboot", "kexec_load", "init_module", "swapon"}, unit
            assert shown["ReadWritePaths"] == paths.admin_dir(proxy)
            # Envoy's /proc view (ProtectProc=invisible) hides other users' processes: no init, no sshd.
            pid = out(deployed, host, f"systemctl show -p MainPID --value {unit}").strip()
            user = paths.envoy_user(proxy)
            seen = out(deployed, host, f"nsenter -t {pid} -m --setuid $(id -u {user}) "
                                       f"--setgid $(id -g {user}) ls /proc").split()
            assert "1" not in seen and pid in seen, (host, unit)
    chain = wait_for(lambda: hops(deployed, "vm1", 8080),
                     lambda seen: not isinstance(seen, str) and [hop.get("service") for hop in seen] ==
                     ["web", "api", "db"] and not any("error" in hop for hop in seen), "web -> api -> db")
    assert not isinstance(chain, str)


# ---- broken files refused by the host's own tool ------------------------------------------------------------

def _drive(connector: Connector, steps: Generator[Change, CommandResult | None, str | None]) -> str | None:
    """Apply every change the install step yields on the real host, as the runner does; its result."""
    try:
        change = next(steps)
        while True:
            change = steps.send(apply_change(change, connector))
    except StopIteration as stop:
        result: Any = stop.value
        return result


@pytest.fixture(scope="module")
def vm1(deployed: LabUp) -> Iterator[Connector]:
    mesh = build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))
    connector = connect(mesh.host("vm1"))
    yield connector
    connector.close()


def _digest(lab: LabUp, path: str) -> str:
    return out(lab, "vm1", f"sha256sum {path}").split()[0]


def test_a_broken_ruleset_is_refused_by_nft_and_the_old_one_stays(deployed: LabUp, vm1: Connector) -> None:
    before = _digest(deployed, paths.FIREWALL_PATH)
    broken = b"table inet mesh\ndelete table inet mesh\ntable inet mesh {\n\tchain input {\n\t\tbogus rule\n\t}\n}\n"
    refused = _drive(vm1, install_checked(paths.FIREWALL_PATH, broken, 0o644, "root", "root", FIREWALL_CHECK))
    assert refused is not None and "Error" in refused and "bogus" in refused, refused
    assert _digest(deployed, paths.FIREWALL_PATH) == before
    assert sh(deployed, "vm1", f"test -e {staged_path(paths.FIREWALL_PATH)}").returncode != 0
    assert "drop" in out(deployed, "vm1", "nft list table inet mesh")  # the loaded table is untouched
    # The deployed ruleset itself passes the same check (installing it again changes nothing).
    current = vm1.get(paths.FIREWALL_PATH)
    assert current is not None
    assert _drive(vm1, install_checked(paths.FIREWALL_PATH, current, 0o644, "root", "root", FIREWALL_CHECK)) is None
    assert _digest(deployed, paths.FIREWALL_PATH) == before


@pytest.mark.parametrize(("what", "edit", "message"), [
    ("a missing binary", lambda unit: re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/nonexistent/envoy", unit),
     "is not executable"),
    ("a setting systemd would ignore", lambda unit: unit.replace("ProtectProc=invisible", "ProtectProc=bogus"),
     "bogus"),
])
def test_a_broken_unit_is_refused_by_systemd_analyze_and_the_old_one_stays(deployed: LabUp, vm1: Connector,
                                                                           what: str, edit: Any,
                                                                           message: str) -> None:
    path, name = paths.envoy_unit_path("web-8080"), paths.envoy_unit_name("web-8080")
    before = _digest(deployed, path)
    pid = out(deployed, "vm1", f"systemctl show -p MainPID --value {name}").strip()
    current = vm1.get(path)
    assert current is not None
    broken = edit(current.decode()).encode()
    assert broken != current, what
    refused = _drive(vm1, install_checked(path, broken, 0o644, "root", "root", unit_check(name)))
    assert refused is not None and message in refused, (what, refused)
    assert _digest(deployed, path) == before and sh(deployed, "vm1", f"test -e {staged_path(path)}").returncode != 0
    # The rendered unit passes the same check, and Envoy kept running throughout.
    assert _drive(vm1, install_checked(path, current, 0o644, "root", "root", unit_check(name))) is None
    assert _digest(deployed, path) == before
    assert out(deployed, "vm1", f"systemctl show -p MainPID --value {name}").strip() == pid


# ---- a new key and its certificate, swapped in together ------------------------------------------------------

def test_a_new_key_is_swapped_in_with_its_certificate_behind_one_link(deployed: LabUp) -> None:
    host, proxy = "vm2", "db-5432"
    link, folder = paths.tls_link(proxy), paths.proxy_dir(proxy)
    old = out(deployed, host, f"readlink {link}").strip()
    out(deployed, host, f"rm {paths.key_path(proxy)}")  # a lost key: the deploy makes a new one
    run = run_mesh("deploy", str(INVENTORY), "--limit", host, timeout=DEPLOY_TIMEOUT)
    assert run.code == 0, str(run)
    new = out(deployed, host, f"readlink {link}").strip()
    assert new != old and new.startswith(paths.TLS_VERSION_PREFIX) and "/" not in new  # relative: same in a sidecar
    assert out(deployed, host, f"ls -d {folder}/{paths.TLS_VERSION_PREFIX}*").split() == [f"{folder}/{new}"]
    assert out(deployed, host, f"stat -c '%a %U' {paths.key_path(proxy)}").strip() == f"600 {paths.envoy_user(proxy)}"
    key = public_fingerprint(out(deployed, host, f"cat {paths.key_path(proxy)}").encode())
    cert = out(deployed, host, f"cat {paths.cert_path(proxy)}")
    assert key == [cert_public_fingerprint(cert.encode())]
    serial = out(deployed, host, f"openssl x509 -noout -serial -in {paths.cert_path(proxy)}").split("=")[1].strip()
    served = wait_for(lambda: _admin_certs(deployed, host, proxy), lambda text: serial.lower() in text.lower(),
                      f"{proxy}'s Envoy serving the new certificate")
    assert serial.lower() in served.lower()
    chain = wait_for(lambda: hops(deployed, "vm1", 8080),
                     lambda seen: not isinstance(seen, str) and [hop.get("service") for hop in seen] ==
                     ["web", "api", "db"] and not any("error" in hop for hop in seen), "web -> api -> db")
    assert not isinstance(chain, str)


def _admin_certs(lab: LabUp, host: str, proxy: str) -> str:
    return out(lab, host, _curl_socket(paths.admin_socket_path(proxy), "/certs"))
