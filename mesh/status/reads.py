"""The read-only commands `mesh status` runs on a host, all in one batch (mesh.status.batch), keyed so that
mesh.status.judge finds each answer: units, every rendered file, certificates, Envoy's admin API, containers.
It owns the command lines; it must not interpret their output.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from mesh import controller_env
from mesh.config import paths
from mesh.containers.reachability import RULES_PATH, WATCHER_UNIT
from mesh.containers.sidecar import LABEL_CONFIG_HASH
from mesh.healthcheck.config import CERT_FILE as CHECKER_CERT_PATH
from mesh.status.expected import ExpectedProxy

ADMIN_TIMEOUT_S = 3
# What status asks Envoy's admin API, by the key the answer is filed under.
ADMIN_PATHS = {"server_info": "server_info", "config_dump": "config_dump?include_eds", "certs": "certs",
               "clusters": "clusters"}
HOST_CA = "ca"
CONTAINERS = "containers"
WATCHER = "watcher"
RULES = "rules"
CHECKER = "checker"
CHECKER_CERT = "checker certificate"
# docker inspect fields, `|`-separated (no field holds one); the network namespace is appended by the command.
CONTAINER_FORMAT = ("{{.Name}}|{{.Id}}|{{.State.Status}}|{{.State.Running}}|"
                    f'{{{{index .Config.Labels "{LABEL_CONFIG_HASH}"}}}}|{{{{.Config.Image}}}}|{{{{.State.Pid}}}}')


def key(proxy: ExpectedProxy, what: str) -> str:
    """The key of one read about one proxy: `key(p, "unit")`, `key(p, "file /etc/...")`, `key(p, "admin certs")`."""
    return f"{proxy.proxy} {what}"


def host_commands(proxies: Sequence[ExpectedProxy], sidecar_host: bool, controller: bool) -> dict[str, str]:
    """Every read of one host, by key."""
    commands = {HOST_CA: sha256(paths.CA_PATH)}
    for proxy in proxies:
        commands.update(proxy_commands(proxy))
    if sidecar_host and proxies:
        names = [name for proxy in proxies for name in (proxy.sidecar, proxy.workload.container) if name]
        commands[CONTAINERS] = containers_command(names)
        commands[WATCHER] = f"systemctl is-active {shlex.quote(WATCHER_UNIT)}"
        commands[RULES] = f"{shlex.quote(RULES_PATH)} check"
    if controller:
        commands[CHECKER] = f"systemctl is-active {shlex.quote(controller_env.CHECKER_UNIT)}"
        commands[CHECKER_CERT] = cat(CHECKER_CERT_PATH)
    return commands


def proxy_commands(proxy: ExpectedProxy) -> dict[str, str]:
    commands = {}
    if proxy.unit:
        commands[key(proxy, "unit")] = f"systemctl is-active {shlex.quote(proxy.unit)}"
        commands[key(proxy, "pid")] = f"systemctl show -p MainPID --value {shlex.quote(proxy.unit)}"
    for file in proxy.files.files:
        commands[key(proxy, f"file {file.path}")] = cat(file.path)
    commands[key(proxy, "ca")] = sha256(proxy.ca_path)
    commands[key(proxy, "certificate")] = cat(proxy.cert_path)
    for name, path in ADMIN_PATHS.items():
        commands[key(proxy, f"admin {name}")] = (f"curl -s -m {ADMIN_TIMEOUT_S} --unix-socket "
                                                 f"{shlex.quote(proxy.admin_socket)} "
                                                 f"{shlex.quote('http://localhost/' + path)}")
    return commands


def cat(path: str) -> str:
    return f"cat {shlex.quote(path)}"


def sha256(path: str) -> str:
    return f"sha256sum {shlex.quote(path)}"


def containers_command(names: Sequence[str]) -> str:
    """One `docker container inspect` of every named container (a missing one is left out of the output, and
    named on stderr), each line followed by `|` and the container's network namespace."""
    quoted = " ".join(shlex.quote(name) for name in names)
    return (f"out=$(docker container inspect --format {shlex.quote(CONTAINER_FORMAT)} {quoted}); rc=$?; "
            'printf "%s\\n" "$out" | while IFS= read -r line; do [ -n "$line" ] || continue; '
            'printf "%s|%s\\n" "$line" "$(readlink "/proc/${line##*|}/ns/net" 2>/dev/null)"; done; exit $rc')
