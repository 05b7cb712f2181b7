"""What a deploy would change on a host: the plan of that host compared with the facts read from it (files,
folders, users, units, what Envoy runs, certificates, the firewall, sidecars, and what mesh left there that the
plan no longer has). Pure: the facts are given. `mesh plan` prints these, `mesh deploy --json` lists them, and a
host with none is not touched at all.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mesh.config import paths
from mesh.config.xds import ADS_BOOTSTRAP_NAME, DELIVERY_MARKER
from mesh.containers.reachability import LIST_PATH, RULES_PATH, WATCHER_PATH, WATCHER_UNIT, WATCHER_UNIT_PATH
from mesh.controller import spec as controller_spec
from mesh.controller_env import CHECKER_UNIT, CONTROLLER_UNIT, MARKER_FILE
from mesh.healthcheck.config import CERT_FILE, CONFIG_DIR, CONSUL_CA_FILE, KEY_FILE, TOKEN_FILE
from mesh.hosts.observe import ENVOY_SHA_CACHE_SUFFIX, HostFacts, ObserveRequest
from mesh.pki.leaf import node_id_reason
from mesh.plan.access import CTL_IDENTITIES_DIR
from mesh.plan.build import CHECKER_UNIT_PATH, CONTROLLER_UNIT_PATH, FIREWALL_UNIT_PATH, HOST_FOLDERS
from mesh.plan.model import HostPlan, PlannedFile
from mesh.render import stale_paths

CHECKER_CERT_NAME = "checker"
# What mesh may have put on a host for a role the host no longer has: observed always, removed when unplanned.
ROLE_PATHS = (paths.FIREWALL_PATH, FIREWALL_UNIT_PATH, paths.ENVOY_BINARY, LIST_PATH, RULES_PATH, WATCHER_PATH,
              WATCHER_UNIT_PATH, CHECKER_UNIT_PATH, TOKEN_FILE, CONSUL_CA_FILE, CONFIG_DIR, CONTROLLER_UNIT_PATH,
              controller_spec.CONTROLLER_DIR, controller_spec.CTL_SUDOERS, controller_spec.CTL_SCRIPT,
              CTL_IDENTITIES_DIR, controller_spec.CTL_HOME, paths.CA_PATH, paths.ENVOY_START,
              *reversed(HOST_FOLDERS))  # the folders last: a host that lost its last workload keeps none of them
ROLE_UNITS = (paths.FIREWALL_UNIT, WATCHER_UNIT, CHECKER_UNIT, CONTROLLER_UNIT)
# Users mesh makes for a role (the controllers' account on managed hosts, the controller's own): observed always,
# removed when the plan no longer has them.
ROLE_USERS = (controller_spec.CTL_USER, controller_spec.CONTROLLER_USER)

CertificateReason = Callable[[bytes | None, bytes | None, str], "str | None"]
"""(certificate, public key beside it, SPIFFE id) -> why it must be (re)issued, or None."""


@dataclass(frozen=True)
class Change:
    """One thing a deploy would do on a host."""

    host: str
    kind: str  # file, folder, user, unit, proxy, sidecar, firewall, certificate, binary, image, checker, rules
    subject: str  # a path, a unit, a user, a proxy or sidecar name
    action: str  # create, update, attributes, remove, enable, start, restart, issue, renew, send, load, replace
    detail: str = ""
    proxy: str | None = None
    diff: str | None = None  # a unified diff (files whose text both sides show)

    def summary(self) -> dict[str, Any]:
        return {"host": self.host, "kind": self.kind, "subject": self.subject, "action": self.action,
                "detail": self.detail, "proxy": self.proxy}

    def line(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.action} {self.kind} {self.subject}{detail}"


def observe_request(plan: HostPlan) -> ObserveRequest:
    """What to read on the plan's host to compare it with the plan (and find what mesh must remove)."""
    host = plan.host
    planned = [planned.path for planned in plan.every_file()] + [folder.path for folder in plan.every_folder()]
    planned += [path for proxy in plan.proxies for path in _delivery_leftovers(proxy.name)]
    certificates = [(proxy.name, paths.cert_path(proxy.name), paths.key_path(proxy.name)) for proxy in plan.proxies]
    if plan.checker_identity:
        certificates.append((CHECKER_CERT_NAME, CERT_FILE, KEY_FILE))
    return ObserveRequest(
        paths=tuple(dict.fromkeys(path for path in planned + list(ROLE_PATHS) if path != paths.ENVOY_BINARY)),
        stat_only=(paths.ENVOY_BINARY,),
        listed=tuple(paths.xds_dir(proxy.name) for proxy in plan.proxies),
        units=tuple(dict.fromkeys(list(plan.units) + list(ROLE_UNITS))),
        users=tuple(dict.fromkeys((*plan.users, *ROLE_USERS))),
        admin_sockets=tuple((proxy.name, paths.admin_socket_path(proxy.name)) for proxy in plan.proxies),
        certificates=tuple(certificates),
        envoy_binary=paths.ENVOY_BINARY if plan.envoy_sha256 else None,
        firewall=any(planned.path == paths.FIREWALL_PATH for planned in plan.files),
        container_host=host.kind == "container_host",
        sidecar_image=plan.sidecar_image,
        rules_check=f"{RULES_PATH} check" if plan.sidecar_image else None,
        checker_marker=MARKER_FILE if plan.checker_identity else None)


def host_changes(plan: HostPlan, facts: HostFacts, certificate_reason: CertificateReason,
                 checker_marker: str | None = None, texts: dict[str, str | None] | None = None) -> tuple[Change, ...]:
    """Every change a deploy would make on the host, in the order it would make them; removals last.
    `texts` (the host's current text of changed files, mesh.hosts.observe.read_texts) adds unified diffs."""
    name = plan.name
    changes: list[Change] = []
    add = changes.append
    for user in plan.users:
        if user not in facts.users:
            add(Change(name, "user", user, "create"))
    for folder in plan.every_folder():
        found = facts.path(folder.path)
        if found.kind != "directory":
            add(Change(name, "folder", folder.path, "create"))
        elif found.mode != folder.mode or not found.owned_by(folder.owner, folder.group):
            add(Change(name, "folder", folder.path, "attributes", _attributes(found, folder.mode, folder.owner,
                                                                               folder.group)))
    if plan.envoy_sha256 and facts.envoy_sha256 != plan.envoy_sha256:
        add(Change(name, "binary", paths.ENVOY_BINARY, "send" if facts.envoy_sha256 is None else "update"))
    if plan.sidecar_image and facts.image_present is False:
        add(Change(name, "image", plan.sidecar_image, "send"))
    if plan.checker_identity and checker_marker is not None and facts.checker_marker != checker_marker:
        add(Change(name, "checker", "environment", "install"))
    owners = {planned.path: proxy.name for proxy in plan.proxies for planned in proxy.all_files()}
    for planned in plan.every_file():
        change = _file_change(name, planned, facts, owners.get(planned.path), texts or {})
        if change is not None:
            add(change)
    for proxy in plan.proxies:
        cert, public_key = _certificate(facts, proxy.name)
        reason = certificate_reason(cert, public_key, proxy.spiffe_id) or node_id_reason(cert, proxy.config.node_id)
        if reason is not None:
            add(Change(name, "certificate", proxy.spiffe_id, "issue" if reason == "missing" else "renew", reason,
                       proxy.name))
    if plan.checker_identity:
        reason = certificate_reason(*_certificate(facts, CHECKER_CERT_NAME), plan.checker_identity)
        if reason is not None:
            add(Change(name, "certificate", plan.checker_identity, "issue" if reason == "missing" else "renew",
                       reason))
    for unit in plan.units:
        state = facts.units.get(unit)
        if state is None or state.enabled != "enabled":
            add(Change(name, "unit", unit, "enable", state.enabled if state else "not-found"))
        if state is None or state.active not in ("active", "activating", "reloading"):
            add(Change(name, "unit", unit, "start", state.active if state else "unknown"))
    restarting = {change.proxy for change in changes if change.kind == "file" and change.proxy
                  and plan.proxy(change.proxy).file(change.subject).effect == "restart"}
    for proxy in plan.proxies:
        if proxy.sidecar is not None:
            sidecar = facts.sidecars.get(proxy.sidecar.name)
            if sidecar is None:
                add(Change(name, "sidecar", proxy.sidecar.name, "create", proxy=proxy.name))
            elif sidecar.revision != proxy.sidecar.revision or sidecar.state != "running":
                add(Change(name, "sidecar", proxy.sidecar.name, "replace",
                           "stopped" if sidecar.state != "running" else "its bootstrap or image changed", proxy.name))
        elif proxy.name not in restarting and facts.running.get(proxy.name, "") != proxy.bootstrap_sha256:
            running = facts.running.get(proxy.name, "")[:12] or "no answer from its admin socket"
            add(Change(name, "proxy", proxy.name, "restart", f"Envoy runs {running}, files are "
                                                            f"{proxy.bootstrap_sha256[:12]}", proxy.name))
    if facts.firewall_loaded is False:
        add(Change(name, "firewall", "inet mesh", "load", "the loaded table differs from the file"))
    if facts.rules_in_place is False:
        add(Change(name, "rules", RULES_PATH, "load", "the reachability rules are not in place"))
    changes += removals(plan, facts)
    return tuple(changes)


def removals(plan: HostPlan, facts: HostFacts) -> list[Change]:
    """What mesh put on the host that the plan no longer has: proxies, their units, users and sidecars, and the
    files and units of a role the host lost (VM, container host, controller)."""
    name = plan.name
    planned_proxies = {proxy.name for proxy in plan.proxies}
    planned_paths = {planned.path for planned in plan.every_file()} | {f.path for f in plan.every_folder()}
    changes = [Change(name, "proxy", proxy, "remove", "it left the inventory", proxy)
               for proxy in facts.proxies if proxy not in planned_proxies]
    for proxy in plan.proxies:  # resource files Envoy no longer needs (render.stale_paths)
        changes += [Change(name, "file", stale, "remove", "Envoy reloads", proxy.name)
                    for stale in stale_paths(proxy.rendered, on_host(facts, proxy.name))]
        if proxy.rendered.ads_bootstrap is None:  # a proxy back on files: what xds left in its folder
            changes += [Change(name, "file", path, "remove", "the proxy is on files", proxy.name)
                        for path in _delivery_leftovers(proxy.name) if facts.path(path).exists]
    planned_units = {paths.envoy_unit_name(proxy) for proxy in planned_proxies} | set(plan.units)
    changes += [Change(name, "unit", unit, "remove") for unit in facts.unit_files if unit not in planned_units]
    changes += [Change(name, "unit", unit, "remove") for unit in ROLE_UNITS
                if unit not in planned_units and unit not in facts.unit_files
                and facts.units.get(unit) is not None and facts.units[unit].enabled not in ("not-found", "")]
    changes += [Change(name, "user", user, "remove") for user in facts.mesh_users if user not in plan.users]
    changes += [Change(name, "user", user, "remove") for user in ROLE_USERS
                if user in facts.users and user not in plan.users]
    wanted_sidecars = {proxy.sidecar.name for proxy in plan.proxies if proxy.sidecar is not None}
    changes += [Change(name, "sidecar", sidecar, "remove") for sidecar in facts.sidecars
                if sidecar not in wanted_sidecars]
    if plan.envoy_sha256:
        planned_paths.add(paths.ENVOY_BINARY)
    for path in ROLE_PATHS:
        if path not in planned_paths and facts.path(path).exists:
            changes.append(Change(name, "file" if facts.path(path).kind != "directory" else "folder", path, "remove"))
    return changes


def _delivery_leftovers(proxy: str) -> tuple[str, str]:
    """What a proxy on `mesh_delivery: xds` has that one on files has not: envoy-ads.yaml and the start step's
    marker (observed for every proxy, removed from those on files)."""
    return (f"{paths.proxy_dir(proxy)}/{ADS_BOOTSTRAP_NAME}", f"{paths.admin_dir(proxy)}/{DELIVERY_MARKER}")


def on_host(facts: HostFacts, proxy: str) -> dict[str, str]:
    """The sha256 of every file of the proxy's folder the facts hold (what render.transition compares)."""
    prefix = paths.proxy_dir(proxy) + "/"
    return {path: fact.sha256 for path, fact in facts.paths.items()
            if path.startswith(prefix) and fact.sha256 is not None}


def _file_change(host: str, planned: PlannedFile, facts: HostFacts, proxy: str | None,
                 texts: dict[str, str | None]) -> Change | None:
    found = facts.path(planned.path)
    if not found.exists:
        return Change(host, "file", planned.path, "create", _effect(planned), proxy,
                      _diff(planned, None) if planned.text is not None else None)
    if planned.controller_owned:  # the running controller keeps it current from Consul
        return None
    if found.sha256 != planned.sha256:
        detail = "content" + (f", {_effect(planned)}" if _effect(planned) else "")
        return Change(host, "file", planned.path, "update", detail, proxy,
                      _diff(planned, texts.get(planned.path)) if planned.text is not None else None)
    if found.mode != planned.mode or not found.owned_by(planned.owner, planned.group):
        return Change(host, "file", planned.path, "attributes",
                      _attributes(found, planned.mode, planned.owner, planned.group), proxy)
    return None


def _effect(planned: PlannedFile) -> str:
    return {"restart": "restarts its proxy", "reload": "Envoy reloads it", "none": ""}[planned.effect]


def _attributes(found: Any, mode: int, owner: str, group: str) -> str:
    return (f"{found.owner if not owner.isdigit() else found.uid}:{found.group if not group.isdigit() else found.gid} "
            f"{found.mode:04o} -> {owner}:{group} {mode:04o}")


def _diff(planned: PlannedFile, current: str | None) -> str:
    before = (current or "").splitlines(keepends=True)
    after = (planned.text or "").splitlines(keepends=True)
    return "".join(difflib.unified_diff(before, after, f"a{planned.path}" if current is not None else "/dev/null",
                                        f"b{planned.path}", n=2))


def _certificate(facts: HostFacts, name: str) -> tuple[bytes | None, bytes | None]:
    found = facts.certificates.get(name)
    return (found.cert_pem, found.public_key_pem) if found else (None, None)


def keep_envoy_sha_cache(binary: str = paths.ENVOY_BINARY) -> str:
    """The command that records Envoy's binary sha256, size and mtime beside it (read back by observe)."""
    cache = binary + ENVOY_SHA_CACHE_SUFFIX
    return (f"printf '%s %s\\n' \"$(sha256sum < {binary} | cut -c1-64)\" \"$(stat -c '%s %Y' {binary})\" "
            f"> {cache}.tmp && mv -f {cache}.tmp {cache}")


def certificate_reason_for(ca: Any, ttl: timedelta | None) -> CertificateReason:
    """certificate_reason bound to a CA and a ttl (mesh.deploy.steps.identity)."""
    from mesh.deploy.steps.identity import certificate_reason

    def reason(cert: bytes | None, public_key: bytes | None, spiffe_id: str) -> str | None:
        return certificate_reason(cert, public_key, spiffe_id, ca, ttl)
    return reason
