"""Per-proxy mesh steps: the proxy's folder, key and certificate, Envoy's config (validated on the host before it
replaces the old one: by the host's Envoy on a VM, in the sidecar image on a container host), and on VMs the
systemd unit and the handler restarting exactly the proxies whose files changed.
"""

from __future__ import annotations

import hashlib
import secrets
import shlex
from datetime import UTC, datetime
from typing import Any

from mesh.config import paths
from mesh.config.errors import ConfigError, EnvoyRejectedConfig
from mesh.containers.sidecar import sidecar_spec, validate_args
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked, unit_check
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.identity import (
    Identity,
    checker_identity,
    in_new_folder,
    proxy_identity,
    renewal_reason,
    swap_command,
)
from mesh.deploy.steps.ownership import Owned, folder_changes, ownership_changes, proxy_ownership
from mesh.deploy.variables import to_bool
from mesh.hosts.facts import file_sha256
from mesh.render import render_envoy_config, render_envoy_unit, validate_envoy_config

VALIDATE_TIMEOUT_S = 120


def _proxy(args: dict[str, Any]) -> str:
    name = args.get("proxy")
    if not name:
        raise ModuleFailure("missing required argument: proxy")
    return str(name)


def proxy_folder(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """/etc/mesh/proxies/<proxy>, owned as the host's kind wants it (see ownership.py), and in it the folder of
    Envoy's admin socket: Envoy's user's alone (0700), so no other user of the host can connect to admin."""
    proxy = _proxy(args)
    path = paths.proxy_dir(proxy)
    ownership = proxy_ownership(ctx.host, proxy)
    yield from folder_changes(ctx.connector, path, ownership.folder)
    envoy_user = ownership.key.owner
    yield from folder_changes(ctx.connector, paths.admin_dir(proxy), Owned(envoy_user, envoy_user, 0o700))
    return Outcome(data={"path": path, "admin_socket": paths.admin_socket_path(proxy)})


def certificate(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """A key made on the host (never leaving it) and a certificate from the mesh CA, renewed when needed."""
    shared = ctx.shared
    trust_domain = shared.mesh.settings.trust_domain
    if to_bool(args.get("checker", False)):
        identity = checker_identity(trust_domain)
    else:
        proxy = _proxy(args)
        ownership = proxy_ownership(ctx.host, proxy)
        identity = proxy_identity(proxy, shared.workload(ctx.host.name, proxy).spiffe_id, ownership.key.owner,
                                  ownership.folder)
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
        yield from ownership_changes(ctx.connector, identity.key, Owned(identity.owner, identity.owner, 0o600))
    reason = "new key" if fresh else renewal_reason(ctx.connector, identity, shared.ca,
                                                             shared.mesh.settings.cert_ttl)
    if reason is None:
        return Outcome(msg="certificate valid", data={"spiffe_id": identity.spiffe_id})
    if ctx.check_mode:
        return Outcome(msg=f"would renew the certificate: {reason}")
    csr = ctx.connector.run(f"openssl req -new -sha256 -key {shlex.quote(target.key)} -subj "
                            f"{shlex.quote('/CN=' + identity.common_name)}")
    if not csr.ok:
        raise ModuleFailure(f"openssl could not make a CSR on the host: {csr.error_text()}")
    issued = shared.ca.sign(csr.stdout, identity.spiffe_id, shared.mesh.settings.cert_ttl, ctx.host.name,
                            identity.ledger_name)
    yield PutFile(target.cert, issued.chain_pem, 0o644, "root", "root", f"write {target.cert}")
    if target is not identity:
        yield RunCommand(swap_command(identity, version), f"switch {identity.home}/tls to the new key and "
                                                          "certificate")
    if identity.proxy is not None:
        shared.mark_restart(ctx.host.name, identity.proxy)
    return Outcome(msg=f"certificate issued ({reason}), valid until {issued.not_after.isoformat()}",
                   data={"spiffe_id": identity.spiffe_id, "serial": issued.serial})


def _keygen(identity: Identity) -> str:
    key = shlex.quote(identity.key)
    owner = shlex.quote(f"{identity.owner}:{identity.owner}")
    return ("set -e; umask 077; t=" + key + ".mesh-tmp.$$; trap 'rm -f \"$t\"' EXIT; "
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out \"$t\" 2>/dev/null; "
            f"chown {owner} \"$t\"; chmod 0600 \"$t\"; mv -f \"$t\" {key}")


def envoy_config(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Envoy's rendered config: when it differs, sent beside the old one, validated there (on a VM by the host's
    Envoy as the proxy's user; on a container host in a throwaway container of the sidecar image `image`), then
    renamed into place; a refused config fails the host and leaves the old one."""
    proxy = _proxy(args)
    try:
        cfg = ctx.shared.proxy_config(ctx.host.name, proxy)
        data = render_envoy_config(cfg).encode()
    except ConfigError as exc:
        raise ModuleFailure(str(exc)) from None
    path, wanted = cfg.config_path, proxy_ownership(ctx.host, proxy).config
    if file_sha256(ctx.connector, path) == hashlib.sha256(data).hexdigest():
        yield from ownership_changes(ctx.connector, path, wanted)
        return Outcome(data={"dest": path})
    validate = _validate_command(ctx, proxy, args)
    try:  # the same Envoy locally first, so a bad render never reaches a host
        validate_envoy_config(data.decode(), {paths.CA_PATH: ctx.shared.ca.root_pem},
                              ctx.shared.local_envoy or str(ctx.shared.envoy.path))
    except EnvoyRejectedConfig as exc:
        raise ModuleFailure(f"proxy {proxy}: {exc}; nothing was sent") from None
    temp = new_config_path(proxy)
    yield PutFile(temp, data, wanted.mode, wanted.owner, wanted.group, f"send {path} (to validate)")
    checked = yield RunCommand(validate, "validate on the host", check_exit=False, changes=False)
    if checked is not None and not checked.ok:
        yield RunCommand(f"rm -f {shlex.quote(temp)}", "remove the refused config", changes=False)
        message = envoy_error(checked.error_text())
        return Outcome(msg=f"proxy {proxy}: Envoy on {ctx.host.name} refused the new config (the running config "
                           f"is kept): {message}", failed=True)
    yield RunCommand(f"mv -f {shlex.quote(temp)} {shlex.quote(path)}", f"install {path}")
    ctx.shared.mark_restart(ctx.host.name, proxy)
    return Outcome(data={"dest": path, "checksum": hashlib.sha256(data).hexdigest()})


def new_config_path(proxy: str) -> str:
    """Where a new config waits for validation: beside the old one (Envoy picks the format by extension)."""
    return f"{paths.proxy_dir(proxy)}/.envoy.new.yaml"


def _validate_command(ctx: TaskContext[DeployContext], proxy: str, args: dict[str, Any]) -> str:
    temp = new_config_path(proxy)
    if ctx.host.kind != "container_host":  # Envoy as the proxy's user: it must be able to read the key
        return (f"runuser -u {paths.ENVOY_USER} -- {paths.ENVOY_BINARY} --mode validate -c {shlex.quote(temp)} "
                f"--disable-hot-restart --log-level error")
    image = args.get("image")
    if not image:
        raise ModuleFailure("missing required argument on a container host: image (the sidecar image's tag)")
    # The sidecar's own image, user and read-only mounts: what the sidecar will see, with no host Envoy.
    spec = sidecar_spec(ctx.host, ctx.shared.workload(ctx.host.name, proxy), str(image), "")
    return shlex.join(["docker", *validate_args(spec, temp)])


def envoy_error(output: str) -> str:
    """Envoy's own reason from `--mode validate` output (which may echo the whole config after it)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reasons = [line for line in lines if "[critical]" in line or "[error]" in line]
    return " | ".join((reasons or lines)[:3])[:2000]


def envoy_unit(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The proxy's systemd unit, checked by `systemd-analyze verify` on the host before it replaces the old one
    (a refused unit fails the host and leaves the old one); systemd re-reads units when it changed."""
    proxy = _proxy(args)
    data = render_envoy_unit(ctx.shared.proxy_config(ctx.host.name, proxy)).encode()
    path, name = paths.envoy_unit_path(proxy), paths.envoy_unit_name(proxy)
    if file_sha256(ctx.connector, path) != hashlib.sha256(data).hexdigest():
        refused = yield from install_checked(path, data, 0o644, "root", "root", unit_check(name))
        if refused is not None:
            return Outcome(msg=f"proxy {proxy}: systemd-analyze on {ctx.host.name} refused the new unit (the old "
                               f"one is kept): {refused}", data={"unit": name, "dest": path}, failed=True)
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
        ctx.shared.mark_restart(ctx.host.name, proxy)
    return Outcome(data={"unit": paths.envoy_unit_name(proxy), "dest": path})


def restart_proxies(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Handler: restart the proxies whose files changed in this run (every proxy with all=true)."""
    names = [paths.proxy_name(workload) for workload in ctx.host.workloads]
    chosen = names if to_bool(args.get("all", False)) else ctx.shared.restarts(ctx.host.name)
    for proxy in chosen:
        yield RunCommand(f"systemctl restart {paths.envoy_unit_name(proxy)}", f"restart {proxy}")
    return Outcome(msg=f"restarted: {', '.join(chosen) or 'none'}", data={"restarted": chosen})
