"""The runner's modules for container hosts: `mesh.sidecar_image`, `mesh.sidecar`, `mesh.sidecar_host`.
Each reads facts and yields only the changes needed; none touches an app container or applies anything itself.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import paths
from mesh.containers.docker import container_logs, container_state, image_present
from mesh.containers.image import ENVOY_IN_IMAGE, SIDECAR_UID, SidecarImage, build_sidecar_image_tar
from mesh.containers.reachability import (
    LIST_PATH,
    RULES_PATH,
    WATCHER_PATH,
    WATCHER_UNIT,
    WATCHER_UNIT_PATH,
    UnsafeScript,
    render_rules,
    render_sidecar_list,
    render_watcher,
    render_watcher_unit,
    sidecar_entries,
)
from mesh.containers.sidecar import (
    LABEL_MANAGED_BY,
    docker_run_args,
    file_modes,
    files_hash,
    hashed_files,
    sidecar_spec,
    validate_args,
)
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import Change, ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked, unit_check
from mesh.hosts.connection import Connector
from mesh.hosts.facts import file_sha256
from mesh.inventory.model import ManagedHost, Workload

if TYPE_CHECKING:
    from mesh.deploy.modules import ModuleRegistry

# mesh's own folder for the sidecar image tarball between its upload and `docker import` (root's, 0700).
STAGING_PARENT = "/var/lib/mesh"
STAGING_DIR = f"{STAGING_PARENT}/images"
IMPORT_CHANGES = (f"USER {SIDECAR_UID}:{SIDECAR_UID}", f'ENTRYPOINT ["{ENVOY_IN_IMAGE}"]')
SETTLE_S = 1  # a sidecar that cannot start (a port taken in the app's namespace) has exited by then


def sidecar_image(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """The sidecar image on the host under its tag; sent and `docker import`ed only when the tag is missing.
    Args: cache_dir (build here, cached) or src + tag (a tarball built earlier)."""
    image = _image(args)
    if image_present(ctx.connector, image.tag):
        return Outcome(msg=f"{image.tag} present", data={"tag": image.tag, "sent": False})
    yield from _staging_folder(ctx)
    remote = f"{STAGING_DIR}/{image.tag.replace(':', '-')}.tar.gz"
    yield PutFile(remote, image.path.read_bytes(), 0o600, None, None, f"send the sidecar image {image.tag}")
    changes = " ".join(f"--change {shlex.quote(change)}" for change in IMPORT_CHANGES)
    yield RunCommand(f"docker import {changes} {shlex.quote(remote)} {shlex.quote(image.tag)} >/dev/null; "
                     f"rc=$?; rm -f {shlex.quote(remote)}; exit $rc", f"docker import {image.tag}")
    return Outcome(msg=f"{image.tag} imported", data={"tag": image.tag, "sent": True})


def _staging_folder(ctx: TaskContext[Any]) -> ModuleRun:
    """STAGING_DIR as a real folder of root's, mode 0700, so that nobody else can read the tarball or swap it
    between its upload and `docker import` (a predictable path in world-writable /var/tmp allowed both)."""
    for folder, mode in ((STAGING_PARENT, 0o755), (STAGING_DIR, 0o700)):
        quoted = shlex.quote(folder)
        found = ctx.connector.run(f"stat -c '%F|%u:%g|%a' {quoted}")
        if not found.ok:
            yield RunCommand(f"mkdir -m {mode:04o} {quoted} && chown 0:0 {quoted}", f"create {folder}")
            continue
        kind, owner, current = (found.text().split("|") + ["", ""])[:3]
        if kind != "directory":
            raise ModuleFailure(f"{folder} on {ctx.host.name} is a {kind or 'thing'}, not a folder: mesh stages "
                                "the sidecar image there; remove it and deploy again")
        if folder == STAGING_PARENT:  # left as it is unless someone else could write to it
            if owner.split(":")[0] != "0" or int(current or "0", 8) & 0o022:
                raise ModuleFailure(f"{folder} on {ctx.host.name} is owned by {owner} with mode {current}: mesh "
                                    "stages the sidecar image below it only when root alone can write to it")
        elif (owner, current) != ("0:0", f"{mode:o}"):
            yield RunCommand(f"chown 0:0 {quoted} && chmod {mode:04o} {quoted}",
                             f"{folder}: root's, mode {mode:04o}")
    return None


def _image(args: dict[str, Any]) -> SidecarImage:
    if args.get("src") and args.get("tag"):
        return SidecarImage(Path(str(args["src"])), str(args["tag"]))
    if args.get("cache_dir"):
        return build_sidecar_image_tar(Path(str(args["cache_dir"])).expanduser())
    raise ModuleFailure("missing required argument: cache_dir (or src and tag)")


def sidecar(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """The proxy's sidecar running the current files and image in its app container's namespace. Untouched
    when its hash label matches and it shares the app's namespace; else validated in a throwaway container,
    then replaced. A missing app container fails this task only (mesh never creates or touches it)."""
    proxy, image = _arg(args, "proxy"), _arg(args, "image")
    workload = _workload(ctx.host, proxy)
    app = str(workload.container)
    app_state = container_state(ctx.connector, app)
    if app_state is None or not app_state.running:
        why = "does not exist" if app_state is None else f"is not running ({app_state.status})"
        return Outcome(msg=f"proxy {proxy}: the app container {app!r} {why} on {ctx.host.name}; mesh adds a "
                           "sidecar to the container you run and never creates or starts it: start it and deploy "
                           "again", data={"proxy": proxy, "app_container": app}, failed=True)
    if app_state.published:
        return Outcome(msg=published_verdict(ctx.host.name, proxy, app, app_state.published),
                       data={"proxy": proxy, "app_container": app, "published": list(app_state.published)},
                       failed=True)
    yield from _ownership(ctx, proxy)
    # the plan's spec (bootstrap hash and image) in a deploy; run by a playbook of its own, the files on the host
    planned = ctx.shared.proxy(ctx.host.name, proxy).sidecar if ctx.shared is not None else None
    spec = planned if planned is not None and planned.image == image else sidecar_spec(
        ctx.host, workload, image, files_hash(_digests(ctx, proxy), image))
    data = {"proxy": proxy, "name": spec.name, "config_hash": spec.revision, "app_container": app}
    current = container_state(ctx.connector, spec.name)
    if current is not None and current.config_hash == spec.revision and current.running:
        if current.netns == app_state.netns:
            return Outcome(msg=f"{spec.name} up to date", data={**data, "id": current.id})
        yield RunCommand(f"docker restart --time 5 {shlex.quote(spec.name)}",
                         f"restart {spec.name} into the network namespace of {app}")
        return Outcome(msg=f"{spec.name} rejoined {app}", data=data)
    if not image_present(ctx.connector, image):
        raise ModuleFailure(f"proxy {proxy}: the sidecar image {image} is not on {ctx.host.name} "
                            "(mesh.sidecar_image loads it)")
    checked = yield RunCommand(shlex.join(["docker", *validate_args(spec)]), f"validate {spec.config_path}",
                               check_exit=False, changes=False)
    if checked is not None and not checked.ok:
        kept = f"{spec.name} keeps running its previous config" if current else "no sidecar was started"
        return Outcome(msg=f"proxy {proxy}: Envoy refused {spec.config_path} on {ctx.host.name} ({kept}): "
                           f"{_envoy_reason(checked.error_text())}", data=data, failed=True)
    if current is not None:
        yield RunCommand(f"docker rm --force {shlex.quote(spec.name)} >/dev/null", f"remove the old {spec.name}")
    started = yield RunCommand(shlex.join(["docker", *docker_run_args(spec)]), f"run {spec.name}")
    if started is None:  # check mode
        return Outcome(msg=f"would (re)create {spec.name}", data=data)
    return _settled(ctx, spec.name, data)


def published_verdict(host: str, proxy: str, app: str, published: tuple[str, ...]) -> str:
    """Why a workload whose app container publishes ports is refused: Docker forwards a published port to the
    app straight from the host's network, around the sidecar and its mTLS."""
    return (f"proxy {proxy}: the app container {app!r} on {host} publishes port(s) {'; '.join(published)}: "
            "a published port reaches the app around its sidecar (no mTLS, no mesh identity). mesh never "
            "recreates or changes app containers: run it again without -p/--publish/-P and deploy again")


def _settled(ctx: TaskContext[Any], name: str, data: dict[str, Any]) -> Outcome:
    ctx.connector.run(f"sleep {SETTLE_S}")
    state = container_state(ctx.connector, name)
    if state is None or not state.running or state.restart_count > 0:
        status = state.status if state else "gone"
        return Outcome(msg=f"{name} did not stay up ({status}): {container_logs(ctx.connector, name)}",
                       data=data, failed=True)
    return Outcome(msg=f"{name} started", data={**data, "id": state.id})


def _ownership(ctx: TaskContext[Any], proxy: str) -> ModuleRun:
    for path, uid, gid, mode in file_modes(proxy):
        quoted = shlex.quote(path)
        found = ctx.connector.run(f"stat -c '%u:%g:%a' {quoted}")
        if not found.ok:
            raise ModuleFailure(f"proxy {proxy}: {path} is missing on {ctx.host.name} (the certificate and "
                                "Envoy config steps write it before the sidecar)")
        if found.text() != f"{uid}:{gid}:{mode:o}":
            yield RunCommand(f"chown {uid}:{gid} {quoted} && chmod {mode:04o} {quoted}",
                             f"{path}: {uid}:{gid} {mode:04o} for the sidecar's user")
    return None


def _digests(ctx: TaskContext[Any], proxy: str) -> dict[str, str]:
    digests: dict[str, str] = {}
    for path in hashed_files(proxy):
        found = file_sha256(ctx.connector, path)
        if found is None:
            raise ModuleFailure(f"proxy {proxy}: {path} is missing on {ctx.host.name}")
        digests[path] = found
    return digests


def sidecar_host(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """The host-wide parts: the sidecar list, the reachability script (applied when it changed or its rules
    are not in place), the watcher and its unit (enabled; restarted only when they changed), and the removal
    of mesh's sidecars whose workload left the inventory."""
    host = ctx.host
    try:
        wanted = ((LIST_PATH, render_sidecar_list(host), 0o644), (RULES_PATH, _rules_script(ctx), 0o755),
                  (WATCHER_PATH, render_watcher(host), 0o755), (WATCHER_UNIT_PATH, render_watcher_unit(), 0o644))
    except UnsafeScript as exc:
        return Outcome(msg=f"{host.name}: {exc}; nothing was changed by this step", failed=True)
    for folder in sorted({str(Path(path).parent) for path, _, _ in wanted}):
        if not ctx.connector.run(f"test -d {shlex.quote(folder)}").ok:
            yield RunCommand(f"mkdir -p -m 0755 {shlex.quote(folder)}", f"create {folder}")
    changed = set()
    for path, text, mode in wanted:
        data = text.encode()
        if file_sha256(ctx.connector, path) != hashlib.sha256(data).hexdigest():
            changed.add(path)
            if path == WATCHER_UNIT_PATH:  # a unit: checked by systemd-analyze on the host before it replaces
                refused = yield from install_checked(path, data, mode, "root", "root", unit_check(WATCHER_UNIT))
                if refused is not None:
                    return Outcome(msg=f"{host.name}: systemd-analyze refused the new {WATCHER_UNIT} (the old one "
                                       f"is kept): {refused}", failed=True)
            else:
                yield PutFile(path, data, mode, None, None, f"write {path}")
    yield from _watcher_changes(ctx, restart=bool(changed & {WATCHER_PATH, WATCHER_UNIT_PATH}))
    if RULES_PATH in changed or not ctx.connector.run(f"{RULES_PATH} check").ok:
        yield RunCommand(f"{RULES_PATH} apply", "apply the reachability rules")
    stale = stale_sidecars(ctx.connector, host)
    for change in remove_sidecar_commands(stale):  # noqa: UP028 (the runner send()s results: a list cannot take them)
        yield change
    return Outcome(msg=f"removed sidecars of workloads that left the inventory: {', '.join(stale)}" if stale else "",
                   data={"changed_files": sorted(changed), "removed": stale})


def _rules_script(ctx: TaskContext[Any]) -> str:
    """The plan's reachability script in a deploy (it carries the mesh's metrics sources); run by a playbook of its
    own, with no plan, rendered with no metrics source (the metrics ports then answer loopback only)."""
    if ctx.shared is None:
        return render_rules(ctx.host, ())
    try:
        return str(ctx.shared.host_plan(ctx.host.name).file(RULES_PATH).content.decode())
    except KeyError:
        raise ModuleFailure(f"the plan of {ctx.host.name} has no {RULES_PATH}") from None


def stale_sidecars(connector: Connector, host: ManagedHost) -> list[str]:
    """mesh's sidecars (by its label) on the host whose workload is no longer in the host's inventory entry."""
    listed = connector.run(f"docker ps --all --filter label={LABEL_MANAGED_BY}=mesh --format '{{{{.Names}}}}'")
    if not listed.ok:
        raise ModuleFailure(f"docker ps failed on {host.name}: {listed.error_text()}")
    wanted = {entry.sidecar for entry in sidecar_entries(host)}
    return sorted(set(listed.text().split()) - wanted)


def _watcher_changes(ctx: TaskContext[Any], restart: bool) -> ModuleRun:
    unit = WATCHER_UNIT
    if restart:
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    if ctx.connector.run(f"systemctl is-enabled --quiet {unit}").code != 0:
        yield RunCommand(f"systemctl enable {unit}", f"enable {unit}")
    if restart:
        yield RunCommand(f"systemctl restart {unit}", f"restart {unit}")
    elif ctx.connector.run(f"systemctl is-active --quiet {unit}").code != 0:
        yield RunCommand(f"systemctl start {unit}", f"start {unit}")
    return None


def remove_sidecar_commands(names: list[str]) -> list[Change]:
    """Changes that remove mesh's sidecars by name (a workload left the inventory; tests clean up)."""
    return [RunCommand(f"docker rm --force {shlex.quote(name)}", f"remove {name}") for name in names]


def register_container_modules(registry: ModuleRegistry) -> None:
    """Add mesh's container-host modules to a registry (the deploy's, or a test's copy)."""
    registry.register("mesh.sidecar_image", sidecar_image, params={"cache_dir", "src", "tag"})
    registry.register("mesh.sidecar", sidecar, params={"proxy", "image"})
    registry.register("mesh.sidecar_host", sidecar_host, params=set())


def _arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if value in (None, ""):
        raise ModuleFailure(f"missing required argument: {name}")
    return str(value)


def _workload(host: ManagedHost, proxy: str) -> Workload:
    for workload in host.workloads:
        if paths.proxy_name(workload) == proxy and workload.container:
            return workload
    raise ModuleFailure(f"{host.name} runs no container workload with proxy {proxy!r} in the inventory")


def _envoy_reason(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reasons = [line for line in lines if "[critical]" in line or "[error]" in line]
    return " | ".join((reasons or lines)[:3])[:2000]
