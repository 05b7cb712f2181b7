"""`mesh deploy INVENTORY`: inventory, CA (after trust.py's preflight), playbooks/deploy.yml on the managed hosts
in parallel, then Consul.
It wires the parts and prints what it did; it must not compute config or talk to a host itself.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from mesh import catalog, package_data
from mesh.config import paths
from mesh.deploy import record, trust
from mesh.deploy.controller_inputs import read_state as read_controller_state
from mesh.deploy.display import Display
from mesh.deploy.hostvars import InventoryVars, inventory_vars
from mesh.deploy.lock import deploy_lock
from mesh.deploy.modules import ModuleRegistry, registry
from mesh.deploy.pacing import Serial
from mesh.deploy.patterns import limit_hosts
from mesh.deploy.playbook import Playbook, load_playbook
from mesh.deploy.prepare import Prepared, check_here, prepare
from mesh.deploy.recap import exit_code
from mesh.deploy.retry import retry_path
from mesh.deploy.runner import ConnectorFactory, run_playbook
from mesh.deploy.saved_plan import read_saved_plan, refuse_stale_plan
from mesh.deploy.steps import register_mesh_modules
from mesh.deploy.steps.context import DeployContext
from mesh.errors import EXIT_ERROR, EXIT_OK, InventoryError, InventoryErrors, MeshError, Origin, UsageError
from mesh.hosts.connection import connect
from mesh.hosts.pool import ConnectionPool
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import CONTROLLERS_GROUP, ManagedHost, Mesh
from mesh.pki import CertificateAuthority
from mesh.plan.report import json_report, text_report
from mesh.plan.runtime import NO_OVERRIDES, RuntimeOverrides, read_runtime_overrides

PLAYBOOK = package_data.playbook_path("deploy.yml")
VM_GROUP = "mesh_vms"  # VMs with workloads, as the playbook's plays name them
CONTAINER_HOSTS_GROUP = "mesh_container_hosts"  # container hosts with workloads
RETIRED_GROUP = "mesh_retired"  # hosts deployed before that left the inventory: only cleaned
WHEELS_CACHE = "wheels"  # under mesh_state_dir
CONTROLLER_WAIT_S = 20.0  # after the lock is released: how long the deploy waits for a controller to take its plan


@dataclass(frozen=True)
class DeployOptions:
    """What the command line may change about a deploy."""

    check: bool = False
    limit: str | None = None
    tags: Sequence[str] | None = None
    forks: int = 20
    playbook: Path = PLAYBOOK
    replace_ca: bool = False  # hosts trusting another root get the state dir's CA (which must exist)
    diff: bool = False  # print each host's changes with unified diffs before acting
    json: bool = False  # the change set and the recap as JSON on stdout (the transcript goes to stderr)
    plan_file: Path | None = None  # apply exactly this saved plan (`mesh plan -o FILE`), refusing if it is stale
    serial: Serial | None = None  # every play's batch sizes (overrides the playbook's `serial:`)
    max_fail_percentage: float | None = None  # likewise for `max_fail_percentage:`
    rotate_controller_keys: bool = False  # `mesh controller rotate-keys`: new controller keys, every host re-keyed


def deploy(inventory_path: str, options: DeployOptions = DeployOptions(), output: TextIO | None = None,
           connector_factory: ConnectorFactory = connect) -> int:
    """Deploy the inventory's mesh; the exit code of INVENTORY.md. Raises InventoryErrors (exit 4) before
    touching anything when the inventory or the playbook is refused, and PlanRefused (exit 1) when Envoy here
    refuses a planned config (no host is reached)."""
    started = time.monotonic()
    stdout = output or sys.stdout
    transcript = sys.stderr if options.json and output is None else stdout
    out = Display(transcript)
    if options.replace_ca and options.limit:
        raise UsageError("--replace-ca re-trusts every managed host at once; it cannot be used with --limit",
                         "a fleet split between two roots cannot talk to itself")
    data = load_inventory(inventory_path)  # read once: the model, and the runner's variables and groups
    mesh = check_inventory(data, inventory_path).mesh
    variables = inventory_vars(data)
    _require_controller(mesh, inventory_path)
    modules = registry.copy()
    register_mesh_modules(modules)
    playbook = load_playbook(options.playbook, modules)
    saved = read_saved_plan(options.plan_file) if options.plan_file else None
    targets = _targets(mesh, options.limit, out, variables.groups)
    handed: list[str] = []  # the digest the controllers' spec.json carries, once planned
    report: list[str] = []  # the --json document, written once the controller was waited for
    with nullcontext() if options.check else deploy_lock(mesh, out.warning):  # check mode takes no lock
        code = _locked_deploy(mesh, variables, targets, playbook, modules, saved, options, stdout, transcript,
                              connector_factory, out, started, handed, report)
    if not options.check and handed and handed[0]:
        wait_for_controller(mesh, handed[0], out)
    for text in report:
        stdout.write(text)
    return code


def wait_for_controller(mesh: Mesh, digest: str, out: Display, timeout: float = CONTROLLER_WAIT_S,
                        read: Callable[[Mesh], dict[str, Any] | None] = read_controller_state) -> bool:
    """After the deploy lock is released (the controllers push nothing while a deploy holds it): wait until the
    active controller publishes this plan's digest; say whether it took the new plan."""
    if not mesh.settings.consul_url:
        return False
    deadline = time.monotonic() + timeout
    state: dict[str, Any] | None = None
    while True:
        try:
            state = read(mesh)
        except MeshError as exc:
            out.warning(f"cannot read the controller's state from Consul ({exc}): whether it took plan "
                        f"{digest[:12]} is unknown")
            return False
        if state is not None and state.get("plan_digest") == digest:
            out.line(f"controller {state.get('holder', '?')} took this deploy's plan (spec {digest[:12]})")
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    found = (state or {}).get("plan_digest")
    out.warning(f"no controller took plan {digest[:12]} within {timeout:.0f} s "
                + (f"(the active one runs {str(found)[:12]})" if found else "(no controller state in Consul)")
                + ": endpoints and certificates follow Consul again once one does")
    return False


def _locked_deploy(mesh: Mesh, variables: InventoryVars, targets: list[ManagedHost], playbook: Playbook,
                   modules: ModuleRegistry, saved: dict[str, Any] | None, options: DeployOptions,
                   stdout: TextIO, transcript: TextIO, connector_factory: ConnectorFactory, out: Display,
                   started: float, handed: list[str], report: list[str]) -> int:
    """From the Consul preflight to the end, under the deploy lock."""
    overrides = _consul_preflight(mesh, out)
    retired = retired_targets(mesh, options.limit, out)
    targets = targets + retired
    if not mesh.hosts and not retired:
        out.line("no managed host (no workloads, no mesh_controllers): no CA made, no host touched")
        synced = _sync_catalog(mesh, options.check, out)
        out.line(f"deploy finished in {time.monotonic() - started:.1f} s")
        return synced
    with ExitStack() as stack:
        pool = stack.enter_context(ConnectionPool(connector_factory))
        ca_mesh = mesh
        if options.check and trust.state_root(mesh.settings.state_dir) is None:
            # check mode changes nothing, the state dir included: a throwaway CA stands in for the one a
            # deploy would make
            throwaway = stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-check-ca-"))
            ca_mesh = replace(mesh, settings=replace(mesh.settings, state_dir=throwaway))
            out.line(f"check mode: no CA in {mesh.settings.state_dir}; a deploy would make one")
        # a config the local Envoy refuses stops the run before any host is reached
        check_here(mesh, targets, out, retired=retired, overrides=overrides)
        # every managed host's trust bundle is read first: the CA is made only when no host trusts another root
        ca, created = trust.trusted_ca(ca_mesh, pool.connect, replace=options.replace_ca,
                                       forks=options.forks, warn=out.warning, unreachable=[])
        if ca_mesh is mesh:
            out.line(f"mesh CA {'created' if created else 'found'} in {ca.ca_dir} "
                     f"(root {ca.root_fingerprint[:23]}...)")
        prepared = prepare(ca_mesh, ca, targets, pool.connect, out, options.forks,
                           diffs=options.diff, consul=options.json, retired=retired,
                           make_controller_keys=not options.check,
                           rotate_controller_keys=options.rotate_controller_keys, overrides=overrides)
        if any(host.is_controller for host in targets):
            handed[:] = [prepared.plan.controller_digest]
        elif mesh.controllers:
            out.line("no controller in this run (--limit): the controllers keep the spec of their last deploy")
        if saved is not None:
            refuse_stale_plan(saved, prepared, options.plan_file)
        if options.diff or options.check:
            out.line(text_report(prepared.fleet, diffs=options.diff).rstrip("\n"))
        code, recap = _deploy_hosts(variables, mesh, ca, targets, prepared, playbook, modules, options,
                                    transcript, pool.connect, out, started)
    if options.json:
        report.append(json_report(prepared.fleet, {"exit_code": code, "recap": recap}))
    return code


def _deploy_hosts(variables: InventoryVars, mesh: Mesh, ca: CertificateAuthority, targets: list[ManagedHost], prepared: Prepared,
                  playbook: Playbook, modules: ModuleRegistry, options: DeployOptions, output: TextIO,
                  connector_factory: ConnectorFactory, out: Display, started: float) -> tuple[int, dict[str, Any]]:
    """The playbook on the targets with changes (the others are converged: not touched), then Consul; the exit
    code and the recap's counters per host."""
    fleet = prepared.fleet
    context = DeployContext(mesh, ca, prepared.envoy, prepared.plan, prepared.wheels,
                            {observed.host: observed.changes for observed in fleet.hosts}, connector_factory)
    extra_vars: dict[str, Any] = {"mesh_ca_pem": ca.bundle_pem.decode(),
                                  "mesh_controller_keys_rotated": options.rotate_controller_keys}
    if prepared.image is not None:
        extra_vars["mesh_sidecar_image"] = {"src": str(prepared.image.path), "tag": prepared.image.tag}
    converged = set(fleet.converged_hosts())
    acting = [host for host in targets if host.name not in converged]
    result = run_playbook(
        playbook, acting, connector_factory, extra_vars=extra_vars, shared=context,
        check=options.check, forks=options.forks, tags=options.tags,
        host_vars=_host_vars(variables, prepared, acting), groups={**variables.groups, **_groups(acting)},
        modules=modules, output=output, converged=[host.name for host in targets if host.name in converged],
        serial=options.serial, max_fail_percentage=options.max_fail_percentage,
        retry_file=retry_path(mesh.settings.state_dir))
    if not options.check:
        unfinished = set(result.retry_hosts)
        managed = {host.name for host in mesh.hosts}
        record.update(mesh, [host for host in targets if host.name in managed and host.name not in unfinished],
                      [host.name for host in targets if host.name not in managed and host.name not in unfinished],
                      out.warning)
    # also after a host failed: its old config still runs
    synced = _sync_catalog(mesh, options.check, out, prepared.plan.registrations)
    code = exit_code(result) or synced
    out.line(f"deploy finished in {time.monotonic() - started:.1f} s" + (" (check mode)" if options.check else ""))
    return code, {name: asdict(stats) for name, stats in result.stats.items()}


def _require_controller(mesh: Mesh, inventory_path: str) -> None:
    if mesh.workloads and not mesh.controllers:
        raise InventoryErrors([InventoryError(
            Origin(inventory_path), "the inventory has workloads but no host in the group mesh_controllers",
            key=CONTROLLERS_GROUP, hint="add a host to mesh_controllers: it runs mesh's health checker")])


def _targets(mesh: Mesh, limit: str | None, out: Display,
             groups: Mapping[str, Sequence[str]] | None = None) -> list[ManagedHost]:
    """The hosts this deploy may touch (the plays pick VMs and container hosts with workloads, and controllers);
    --limit knows every inventory group (groups) and the playbook's, and `@FILE` (a retry file)."""
    targets = list(mesh.hosts)
    if limit:
        known = {**(groups or {}), **_groups(targets)}
        names, unknown = limit_hosts(limit, [host.name for host in targets], known)
        for term in unknown:
            out.warning(f"--limit: {term!r} matches no host this deploy touches")
        targets = [host for host in targets if host.name in names]
    return targets


def retired_targets(mesh: Mesh, limit: str | None, out: Display) -> list[ManagedHost]:
    """Hosts mesh deployed to that left the inventory entirely (deployed.json, Consul): cleaned by this run
    (the group `mesh_retired` for --limit)."""
    retired = record.retired_hosts(mesh, out.warning)
    if limit and retired:
        names, _ = limit_hosts(limit, [host.name for host in retired], {RETIRED_GROUP: [h.name for h in retired]})
        retired = [host for host in retired if host.name in names]
    if retired:
        out.line(f"left the inventory, cleaned by this run: {', '.join(host.name for host in retired)}")
    return retired


def _groups(targets: Sequence[ManagedHost]) -> dict[str, list[str]]:
    return {VM_GROUP: [host.name for host in targets if host.kind == "vm" and host.workloads],
            CONTAINER_HOSTS_GROUP: [host.name for host in targets if host.kind == "container_host" and host.workloads],
            CONTROLLERS_GROUP: [host.name for host in targets if host.is_controller]}


def _host_vars(variables: InventoryVars, prepared: Prepared,
               targets: Sequence[ManagedHost]) -> dict[str, Mapping[str, Any]]:
    """Each host's inventory variables, plus from the plan `mesh_proxies` (its proxies' names) and
    `mesh_proxy_users` (the system users they run as on a VM) and `mesh_planned_firewall` (mesh's nftables table
    is planned there)."""
    made: dict[str, Mapping[str, Any]] = {}
    for host in targets:
        planned = prepared.plan.host(host.name)
        mine = {"mesh_proxies": [proxy.name for proxy in planned.proxies],
                "mesh_proxy_users": [proxy.user for proxy in planned.proxies if proxy.unit is not None],
                "mesh_planned_firewall": any(file.path == paths.FIREWALL_PATH for file in planned.files)}
        made[host.name] = ChainMap(mine, variables.host_vars.get(host.name, {}))  # type: ignore[arg-type]
    return made


def _consul_preflight(mesh: Mesh, out: Display) -> RuntimeOverrides:
    """Before any host is touched: a token Consul refuses, or an instance another mesh id owns, stops the
    deploy (exit 1). Consul merely unreachable does not: hosts are deployed, and the sync after them says so.
    Returns the run-time overrides the plan's routes and inbound files take (mesh.plan.runtime)."""
    if not mesh.settings.consul_url:
        return NO_OVERRIDES
    try:
        conflicts = catalog.plan(catalog.access_for(mesh), mesh).conflicts
    except catalog.TokenRefused:
        raise
    except MeshError as exc:
        out.warning(f"Consul cannot be read before the deploy ({exc}); the hosts are deployed first, with routes "
                    "as the inventory says (run-time traffic overrides and denies not read)")
        return NO_OVERRIDES
    if conflicts:
        raise MeshError("Consul: " + "; ".join(conflicts),
                        hint="another inventory (another mesh_id) owns these; no host was touched")
    return read_runtime_overrides(mesh, out.warning)


def _sync_catalog(mesh: Mesh, check: bool, out: Display,
                  wanted: Sequence[catalog.Registration] | None = None) -> int:
    """Register every instance and deregister what left (only the plan in check mode); 1 when Consul fails,
    refuses the token, or another mesh id owns an instance's node or service ID."""
    url = mesh.settings.consul_url
    if not url:
        out.warning("mesh_consul_url is not set: Consul not updated")
        return EXIT_ERROR
    try:
        access = catalog.access_for(mesh)
        if check:
            plan = catalog.plan(access, mesh)
            out.line(f"Consul {url} (check mode): would register {len(plan.register)}, leave "
                     f"{len(plan.unchanged)} unchanged, deregister {len(plan.deregister)}")
            conflicts = plan.conflicts
        else:
            synced = catalog.sync(access, mesh, wanted)
            out.line(f"Consul {url}: registered {len(synced.registered)}, unchanged {len(synced.unchanged)}, "
                     f"deregistered {len(synced.deregistered)}")
            conflicts = synced.conflicts
    except MeshError as exc:
        out.line(f"ERROR: Consul not updated: {exc}", "failed")
        return EXIT_ERROR
    for conflict in conflicts:
        out.line(f"ERROR: Consul: {conflict}", "failed")
    return EXIT_ERROR if conflicts else EXIT_OK
