"""Per-proxy mesh steps: the proxy's folder, key and certificate, Envoy's config (validated on the host before it
replaces the old one: by the host's Envoy on a VM, in the sidecar image on a container host), and on VMs the
systemd unit and the handler restarting exactly the proxies whose files changed.
"""

from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from mesh.config import paths
from mesh.config.errors import EnvoyRejectedConfig
from mesh.containers.sidecar import validate_args
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked, unit_check
from mesh.deploy.steps import rollback
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.gate import read_health
from mesh.deploy.steps.identity import (
    Identity,
    checker_identity,
    in_new_folder,
    proxy_identity,
    renewal_reason,
    swap_command,
)
from mesh.deploy.steps.ownership import Owned, folder_changes, ownership_changes
from mesh.deploy.variables import to_bool
from mesh.hosts.facts import file_sha256
from mesh.plan.model import ProxyPlan
from mesh.render import (
    BOOTSTRAP_KINDS,
    ProxyFiles,
    RenderedFile,
    host_validation,
    stale_paths,
    transition,
    validate_proxy_files,
)

VALIDATE_TIMEOUT_S = 120


def _proxy(args: dict[str, Any]) -> str:
    name = args.get("proxy")
    if not name:
        raise ModuleFailure("missing required argument: proxy")
    return str(name)


def proxy_folder(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The proxy's folders from the plan: /etc/mesh/proxies/<proxy> (readable by the proxy's user alone), its
    xds/ folder, and the folder of Envoy's admin socket (the proxy's user's alone, 0700: no other user of the
    host can connect to admin)."""
    planned = ctx.shared.proxy(ctx.host.name, _proxy(args))
    for folder in planned.folders:
        yield from folder_changes(ctx.connector, folder.path, Owned(folder.owner, folder.group, folder.mode))
    return Outcome(data={"path": paths.proxy_dir(planned.name), "admin_socket": paths.admin_socket_path(planned.name)})


def certificate(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """A key made on the host (never leaving it) and a certificate from the mesh CA, renewed when needed."""
    shared = ctx.shared
    trust_domain = shared.mesh.settings.trust_domain
    if to_bool(args.get("checker", False)):
        identity = checker_identity(trust_domain)
    else:
        planned = shared.proxy(ctx.host.name, _proxy(args))
        home = planned.folders[0]
        identity = proxy_identity(planned.name, planned.spiffe_id, planned.user,
                                  Owned(home.owner, home.group, home.mode), planned.config.node_id)
    fresh = not ctx.connector.run(f"test -s {shlex.quote(identity.key)}").ok
    # A new key goes into a new folder with its certificate, swapped in by one rename once both are there: a
    # restart in between still finds the old, matching pair.
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    target = in_new_folder(identity, version) if fresh else identity
    if fresh:
        if target is not identity and identity.folder is not None:  # the new versioned folder
            yield from folder_changes(ctx.connector, target.key.rsplit("/", 1)[0], identity.folder)
        made = yield RunCommand(_keygen(target), f"create the private key {target.key} on the host")
        if made is None:  # check mode: no key, so no CSR either
            return Outcome(msg="would create a key and request a certificate")
    else:
        if identity.home is not None and identity.folder is not None:  # the folder the `tls` link names
            yield from ownership_changes(ctx.connector, f"{identity.home}/tls/", identity.folder)
        yield from ownership_changes(ctx.connector, identity.key, Owned(identity.owner, identity.owner, 0o600))
    reason = "new key" if fresh else renewal_reason(ctx.connector, identity, shared.ca,
                                                             shared.mesh.settings.cert_ttl)
    if reason is None:
        return Outcome(msg="certificate valid", data={"spiffe_id": identity.spiffe_id})
    if ctx.check_mode:
        return Outcome(msg=f"would renew the certificate: {reason}")
    if not fresh and identity.home is not None and identity.folder is not None:
        # a renewal too goes into a new folder (the key copied beside the new certificate): Envoy sees the `tls`
        # link renamed in the folder it watches, never a file rewritten inside the folder the link names
        target = in_new_folder(identity, version)
        yield from folder_changes(ctx.connector, target.key.rsplit("/", 1)[0], identity.folder)
        yield RunCommand(f"cp -p {shlex.quote(identity.key)} {shlex.quote(target.key)}",
                         "copy the key beside its new certificate")
    csr = ctx.connector.run(f"openssl req -new -sha256 -key {shlex.quote(target.key)} -subj "
                            f"{shlex.quote('/CN=' + identity.common_name)}")
    if not csr.ok:
        raise ModuleFailure(f"openssl could not make a CSR on the host: {csr.error_text()}")
    issued = shared.ca.sign(csr.stdout, identity.spiffe_id, shared.mesh.settings.cert_ttl, ctx.host.name,
                            identity.ledger_name, dns_names=identity.dns_names)
    yield PutFile(target.cert, issued.chain_pem, 0o644, "root", "root", f"write {target.cert}")
    if identity.proxy is not None:
        _before_change(ctx, identity.proxy)
    if target is not identity:
        yield RunCommand(swap_command(identity, version), f"switch {identity.home}/tls to the new key and "
                                                          "certificate")
    return Outcome(msg=f"certificate issued ({reason}), valid until {issued.not_after.isoformat()}",
                   data={"spiffe_id": identity.spiffe_id, "serial": issued.serial})


def _keygen(identity: Identity) -> str:
    key = shlex.quote(identity.key)
    owner = shlex.quote(f"{identity.owner}:{identity.owner}")
    return ("set -e; umask 077; t=" + key + ".mesh-tmp.$$; trap 'rm -f \"$t\"' EXIT; "
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out \"$t\" 2>/dev/null; "
            f"chown {owner} \"$t\"; chmod 0600 \"$t\"; mv -f \"$t\" {key}")


def proxy_files(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The proxy's files from the plan: its trust bundle, then Envoy's resource files and bootstrap. Only what
    differs is sent, into a staging folder beside them; there the host's Envoy checks them all (on a VM as the
    proxy's user; on a container host in a throwaway container of the sidecar image `image`); then they are
    moved into place one by one, each waiting until a running Envoy took it (mesh.render.host_validation). A
    refused file fails the host and leaves every running file. A changed bootstrap marks a restart; the
    rest Envoy reloads by itself."""
    planned = ctx.shared.proxy(ctx.host.name, _proxy(args))
    trust = planned.files[0]  # the proxy's copy of the trust bundle, moved into place first
    found = _file_sums(ctx, [planned_file.path for planned_file in planned.files], paths.xds_dir(planned.name))
    if found.get(trust.path) != trust.sha256:
        yield PutFile(trust.path, trust.content, trust.mode, trust.owner, trust.group, f"write {trust.path}")
    rendered = planned.rendered
    for planned_file in planned.files:  # a running controller's endpoint files: written only when missing
        if planned_file.controller_owned and planned_file.path in found:
            found[planned_file.path] = planned_file.sha256
    steps = transition(rendered, found, _host_cds(ctx, rendered, found))
    stale = stale_paths(rendered, found)
    for planned_file in planned.files:
        if planned_file.controller_owned:
            continue
        if found.get(planned_file.path) == planned_file.sha256:  # right content: only its mode and owner
            yield from ownership_changes(ctx.connector, planned_file.path,
                                         Owned(planned_file.owner, planned_file.group, planned_file.mode))
    if not steps and not stale:
        return Outcome(data={"proxy": planned.name, "moved": []})
    container = ctx.host.kind == "container_host"
    check = host_validation(rendered, steps, stale, user=None if container else planned.user)
    try:  # the same Envoy locally first, so a bad render never reaches a host
        validate_proxy_files(rendered, ctx.shared.ca.root_pem, str(ctx.shared.envoy.path))
    except EnvoyRejectedConfig as exc:
        raise ModuleFailure(f"proxy {planned.name}: {exc}; nothing was sent") from None
    owner, group = planned.files[-1].owner, planned.files[-1].group
    yield RunCommand(f"rm -rf {shlex.quote(check.staging_dir)} && mkdir -p -m 0750 {shlex.quote(check.staging_dir)}"
                     f"/{paths.XDS_DIR_NAME} && chown -R {shlex.quote(owner)}:{shlex.quote(group)} "
                     f"{shlex.quote(check.staging_dir)}", "create the staging folder", changes=False)
    for staged in (*check.staged, RenderedFile(check.config_path, check.config, "bootstrap")):
        yield PutFile(staged.path, staged.content.encode(), 0o640, owner, group, f"stage {staged.path}")
    validate = check.command if not container else _sidecar_validate(planned, args, check.config_path)
    checked = yield RunCommand(validate, "validate on the host", check_exit=False, changes=False)
    if checked is not None and not checked.ok:
        yield RunCommand(f"rm -rf {shlex.quote(check.staging_dir)}", "remove the refused files", changes=False)
        return Outcome(msg=f"proxy {planned.name}: Envoy on {ctx.host.name} refused the new files (the running "
                           f"ones are kept): {envoy_error(checked.error_text())}", failed=True)
    _before_change(ctx, planned.name)
    yield RunCommand(rollback.backup_command(planned), "keep the running files for a rollback", changes=False)
    installed = yield RunCommand(check.install, f"move {len(check.moves)} file(s) into place", check_exit=False)
    if installed is not None and not installed.ok:
        return Outcome(msg=f"proxy {planned.name}: {installed.error_text()}", failed=True)
    moved = [final for _, final in check.moves]
    if any(file.kind in BOOTSTRAP_KINDS and file.path in moved for file in rendered.files):  # either bootstrap
        ctx.shared.mark_restart(ctx.host.name, planned.name)
    return Outcome(data={"proxy": planned.name, "moved": moved, "removed": list(stale)})


def _before_change(ctx: TaskContext[DeployContext], proxy: str) -> None:
    """The proxy is about to change: the gate will check it against how healthy it is now."""
    if ctx.check_mode:
        return
    before = None if ctx.shared.has_baseline(ctx.host.name, proxy) else read_health(ctx.connector, proxy)
    ctx.shared.mark_changed(ctx.host.name, proxy, before)


def _file_sums(ctx: TaskContext[DeployContext], wanted: list[str], listed: str) -> dict[str, str]:
    """sha256 of each wanted path that is a file, and of every file in the folder `listed`, in one command."""
    script = ("for p in " + " ".join(shlex.quote(path) for path in wanted) + f" {shlex.quote(listed)}/*; do "
              "[ -f \"$p\" ] && printf '%s\\t%s\\n' \"$p\" \"$(sha256sum < \"$p\" | cut -c1-64)\"; done; true")
    result = ctx.connector.run(script)
    sums: dict[str, str] = {}
    for line in result.text().splitlines():
        path, _, digest = line.partition("\t")
        if len(digest) == 64:
            sums[path] = digest
    return sums


def _host_cds(ctx: TaskContext[DeployContext], rendered: ProxyFiles, found: dict[str, str]) -> str | None:
    """The host's cds.yaml when it differs (to keep clusters that leave until no route names them)."""
    cds = next((item for item in rendered.files if item.path.endswith(f"/{paths.XDS_DIR_NAME}/cds.yaml")), None)
    if cds is None or cds.path not in found or found[cds.path] == cds.sha256:
        return None
    data = ctx.connector.get(cds.path)
    return data.decode(errors="replace") if data is not None else None


def _sidecar_validate(planned: ProxyPlan, args: dict[str, Any], config_path: str) -> str:
    image = args.get("image")
    if not image or planned.sidecar is None:
        raise ModuleFailure("missing required argument on a container host: image (the sidecar image's tag)")
    # The sidecar's own image, user and read-only mounts: what the sidecar will see, with no host Envoy.
    return shlex.join(["docker", *validate_args(replace(planned.sidecar, image=str(image)), config_path)])


def envoy_error(output: str) -> str:
    """Envoy's own reason from `--mode validate` output (which may echo the whole config after it)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reasons = [line for line in lines if "[critical]" in line or "[error]" in line]
    return " | ".join((reasons or lines)[:3])[:2000]


def envoy_unit(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The proxy's systemd unit from the plan, checked by `systemd-analyze verify` on the host before it
    replaces the old one (a refused unit fails the host and leaves the old one); systemd re-reads units when it
    changed, and the proxy owes a restart."""
    planned = ctx.shared.proxy(ctx.host.name, _proxy(args))
    unit = planned.unit
    if unit is None:
        raise ModuleFailure(f"proxy {planned.name} has no unit on {ctx.host.name} (a container host's sidecar)")
    name = paths.envoy_unit_name(planned.name)
    if file_sha256(ctx.connector, unit.path) != unit.sha256:
        refused = yield from install_checked(unit.path, unit.content, unit.mode, unit.owner, unit.group,
                                             unit_check(name))
        if refused is not None:
            return Outcome(msg=f"proxy {planned.name}: systemd-analyze on {ctx.host.name} refused the new unit (the "
                               f"old one is kept): {refused}", data={"unit": name, "dest": unit.path}, failed=True)
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
        _before_change(ctx, planned.name)
        ctx.shared.mark_restart(ctx.host.name, planned.name)
    return Outcome(data={"unit": name, "dest": unit.path})


def proxies_current(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Every proxy of the host runs its files: restarted when its bootstrap, unit or Envoy's binary changed in
    this run (`all`), or when the bootstrap Envoy runs (node.metadata in /server_info) is not the planned one,
    so a restart a failed run still owed is never lost."""
    plan = ctx.shared.host_plan(ctx.host.name)
    marked = set(ctx.shared.restarts(ctx.host.name))
    restarted = []
    for planned in plan.proxies:
        if planned.unit is None:
            continue
        running = running_bootstrap(ctx, planned.name)
        if to_bool(args.get("all", False)) or planned.name in marked or running != planned.bootstrap_sha256:
            _before_change(ctx, planned.name)
            yield RunCommand(f"systemctl restart {paths.envoy_unit_name(planned.name)}", f"restart {planned.name}")
            restarted.append(planned.name)
    return Outcome(msg=f"restarted: {', '.join(restarted) or 'none'}", data={"restarted": restarted})


def running_bootstrap(ctx: TaskContext[DeployContext], proxy: str) -> str:
    """The bootstrap sha256 the proxy's Envoy runs (its node.metadata), or "" when admin does not answer."""
    socket = shlex.quote(paths.admin_socket_path(proxy))
    found = ctx.connector.run(f"curl -s --max-time 3 --unix-socket {socket} http://admin/server_info")
    match = re.search(r'"mesh_bootstrap_sha256":\s*"([0-9a-f]{64})"', found.stdout.decode(errors="replace"))
    return match.group(1) if match else ""
