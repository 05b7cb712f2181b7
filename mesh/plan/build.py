"""build_plan: the whole fleet's plan from the validated mesh and what was decided before it (the CA's root,
Envoy's binary, the sidecar image, the Consul files for the checker). Pure: it reads no file and reaches no
host, so an error here stops the run before anything changed. It owns which files, folders, users and units
each kind of host gets; the render functions own their contents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from mesh.catalog import registrations
from mesh.config import paths
from mesh.config.compute import compute_proxy_config
from mesh.containers.image import SIDECAR_UID
from mesh.containers.reachability import (
    LIST_PATH,
    RULES_PATH,
    WATCHER_PATH,
    WATCHER_UNIT,
    WATCHER_UNIT_PATH,
    render_rules,
    render_sidecar_list,
    render_watcher,
    render_watcher_unit,
)
from mesh.containers.sidecar import bootstrap_sidecar
from mesh.controller import spec as controller_spec
from mesh.controller.spec_build import build_spec, controller_files
from mesh.controller_env import CHECKER_UNIT, CONTROLLER_UNIT, render_checker_unit, render_controller_unit
from mesh.deploy.modules.builtin import unit_check
from mesh.healthcheck.config import (
    CA_FILE,
    CHECKER_USER,
    CONFIG_DIR,
    CONSUL_CA_FILE,
    DEFAULT_CONFIG,
    TOKEN_FILE,
    checker_config,
)
from mesh.inventory.model import ManagedHost, Mesh, Workload, health_checker_spiffe_id
from mesh.inventory.policy import AuthzOverride, TrafficOverride
from mesh.plan import access
from mesh.plan.model import Effect, HostPlan, Plan, PlannedFile, PlannedFolder, ProxyPlan
from mesh.render import (
    envoy_start_script,
    render_envoy_unit,
    render_firewall,
    render_firewall_unit,
    render_proxy_files,
)

FIREWALL_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{paths.FIREWALL_UNIT}"
FIREWALL_CHECK = f"{paths.NFT_BINARY} -c -f %s"  # nft's own check of a staged ruleset (%s: its path)
CHECKER_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{CHECKER_UNIT}"
HOST_FOLDERS = (paths.MESH_ROOT, f"{paths.MESH_ROOT}/proxies", "/usr/local/lib/mesh")
CONTROLLER_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{CONTROLLER_UNIT}"
FILE_EFFECT: dict[str, Effect] = {"bootstrap": "restart", "ads-bootstrap": "restart", "resource": "reload",
                                  "secret": "reload", "trust": "reload"}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan needs beyond the mesh, decided (and read from disk) before it by the caller."""

    ca_root_pem: bytes
    ca_fingerprint: str
    envoy_sha256: str | None = None  # None when no VM is planned
    sidecar_image: str | None = None  # None when no container host is planned
    consul_token: bytes | None = None  # the checker's token file content (mesh_consul_token_file)
    consul_ca: bytes | None = None  # Consul's CA bundle (mesh_consul_ca_file)
    controller: ControllerInputs | None = None  # None: no controller access or service is planned
    # run-time overrides in Consul KV by service (mesh.traffic.kv.plan_overrides): routes as the controllers make them
    overrides: Mapping[str, TrafficOverride] = field(default_factory=lambda: MappingProxyType({}))
    # run-time denies in Consul KV by service (mesh.authz.kv.plan_authz_overrides): inbound files as the controllers
    # make them
    authz_overrides: Mapping[str, AuthzOverride] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ControllerInputs:
    """What the controllers' part of the plan needs, read before it: each controller's SSH public key (made on
    the controller), the known_hosts lines the deploy checks each host with, the controllers' intermediate,
    the mesh-ctl script, and whether a running controller owns the endpoint files."""

    keys: Mapping[str, str] = field(default_factory=dict)  # controller host -> `TYPE BASE64` (none yet: left out)
    known_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # host -> its known_hosts lines
    issuer_cert: bytes | None = None  # the controllers' intermediate certificate (None in check mode before it exists)
    issuer_key: bytes | None = field(default=None, repr=False)
    ctl_script: bytes = b""  # mesh.controller.protocol.script_text()
    endpoints_live: bool = False  # a controller answered: endpoint files on hosts are its own


def build_plan(mesh: Mesh, inputs: PlanInputs, hosts: Sequence[ManagedHost] | None = None) -> Plan:
    """The plan of `hosts` (by default every managed host of the mesh). Raises ConfigError (exit 1) or
    UnsafeScript on what cannot be rendered; never touches anything."""
    chosen = mesh.hosts if hosts is None else tuple(hosts)
    plan = Plan(mesh.settings.id, inputs.ca_fingerprint, tuple(_host_plan(mesh, host, inputs) for host in chosen),
                tuple(registrations(mesh)))
    if inputs.controller is None or not any(host.host.is_controller for host in plan.hosts):
        return plan
    # spec.json holds the digest of everything else the plan puts on managed hosts (it cannot hold its own; a host
    # that left the inventory, planned with nothing for its cleanup, is not the controllers')
    managed = {host.name for host in mesh.hosts}
    digest = replace(plan, hosts=tuple(host for host in plan.hosts if host.name in managed)).stable_digest
    spec = build_spec(plan, mesh, inputs.controller.known_hosts, digest)
    spec_file = PlannedFile(controller_spec.SPEC_PATH, spec.to_json().encode(), 0o640, "root",
                            controller_spec.CONTROLLER_USER, secret=False)
    return replace(plan, hosts=tuple(replace(host, files=(*host.files, spec_file)) if host.host.is_controller
                                     else host for host in plan.hosts), controller_digest=digest)


def has_firewall(mesh: Mesh, host: ManagedHost) -> bool:
    """mesh's nftables table goes on a VM with workloads (its app and metrics ports), and on a controller that
    is not a container host while some host is on `mesh_delivery: xds` (its ADS port)."""
    return host.kind == "vm" and (bool(host.workloads) or (host.is_controller and bool(mesh.xds_sources)))


def _host_plan(mesh: Mesh, host: ManagedHost, inputs: PlanInputs) -> HostPlan:
    proxies = tuple(_proxy_plan(mesh, host, workload, inputs) for workload in host.workloads)
    folders: list[PlannedFolder] = []
    files: list[PlannedFile] = []
    users: list[str] = []
    units: list[str] = []
    if host.workloads:
        folders += [PlannedFolder(path, 0o755, "root", "root") for path in HOST_FOLDERS]
        files.append(PlannedFile(paths.CA_PATH, inputs.ca_root_pem, 0o644, "root", "root"))
    if any(proxy.config.xds is not None for proxy in proxies):  # the start step its units or sidecars run
        files.append(PlannedFile(paths.ENVOY_START, envoy_start_script().encode(), 0o755, "root", "root"))
    if has_firewall(mesh, host):
        firewall = render_firewall(host, mesh.metrics_sources, mesh.xds_sources).encode()
        files.append(PlannedFile(paths.FIREWALL_PATH, firewall, 0o644, "root", "root", check=FIREWALL_CHECK))
        files.append(PlannedFile(FIREWALL_UNIT_PATH, render_firewall_unit().encode(), 0o644, "root", "root",
                                 check=unit_check(paths.FIREWALL_UNIT)))
        units.append(paths.FIREWALL_UNIT)
    if host.workloads and host.kind == "vm":
        users += [proxy.user for proxy in proxies]
        units[:0] = [paths.envoy_unit_name(proxy.name) for proxy in proxies]
    if host.workloads and host.kind == "container_host":
        files += [PlannedFile(LIST_PATH, render_sidecar_list(host).encode(), 0o644, "root", "root"),
                  PlannedFile(RULES_PATH, render_rules(host, mesh.metrics_sources).encode(), 0o755, "root", "root"),
                  PlannedFile(WATCHER_PATH, render_watcher(host).encode(), 0o755, "root", "root"),
                  PlannedFile(WATCHER_UNIT_PATH, render_watcher_unit().encode(), 0o644, "root", "root",
                              check=unit_check(WATCHER_UNIT))]
        units.append(WATCHER_UNIT)
    if host.is_controller:
        folders += [PlannedFolder(paths.MESH_ROOT, 0o755, "root", "root"),
                    PlannedFolder(CONFIG_DIR, 0o750, "root", CHECKER_USER)]
        files += [PlannedFile(CA_FILE, inputs.ca_root_pem, 0o644, "root", "root"),
                  PlannedFile(DEFAULT_CONFIG, checker_config(mesh).to_json().encode(), 0o644, "root", "root"),
                  PlannedFile(CHECKER_UNIT_PATH, render_checker_unit().encode(), 0o644, "root", "root",
                              check=unit_check(CHECKER_UNIT))]
        if inputs.consul_token is not None:
            files.append(PlannedFile(TOKEN_FILE, inputs.consul_token, 0o600, CHECKER_USER, CHECKER_USER,
                                     secret=True))
        if inputs.consul_ca is not None:
            files.append(PlannedFile(CONSUL_CA_FILE, inputs.consul_ca, 0o644, "root", "root"))
        users.append(CHECKER_USER)
        units.append(CHECKER_UNIT)
    controlled = inputs.controller is not None and bool(mesh.controllers) and (bool(host.workloads)
                                                                                or host.is_controller)
    if controlled and inputs.controller is not None:
        _access(host, proxies, inputs, inputs.controller, folders, files, users)
        if host.is_controller:
            _controller(mesh, inputs, inputs.controller, folders, files, users, units)
    envoy = (host.kind == "vm" and bool(host.workloads)) or (controlled and host.is_controller)
    return HostPlan(host, proxies, tuple(_unique_folders(folders)), tuple(files), tuple(users), tuple(units),
                    envoy_sha256=inputs.envoy_sha256 if envoy else None,
                    sidecar_image=inputs.sidecar_image if host.kind == "container_host" and host.workloads else None,
                    checker_identity=health_checker_spiffe_id(mesh.settings.trust_domain)
                    if host.is_controller else None)


def _access(host: ManagedHost, proxies: tuple[ProxyPlan, ...], inputs: PlanInputs, controller: ControllerInputs,
            folders: list[PlannedFolder], files: list[PlannedFile], users: list[str]) -> None:
    """The mesh-ctl account: the controllers' keys (forced command, restricted), its sudo rule, the script and
    the identities it may touch here."""
    folders += [PlannedFolder(path, 0o755, "root", "root")
                for path in (paths.MESH_ROOT, "/usr/local/lib/mesh", access.CTL_IDENTITIES_DIR, controller_spec.CTL_HOME,
                             access.CTL_SSH_DIR)]
    lines = [access.proxy_identity_line(proxy.name, proxy.workload.service, proxy.user,
                                        inputs.sidecar_image if proxy.sidecar is not None else None)
             for proxy in sorted(proxies, key=lambda proxy: proxy.name)]  # reordered workloads change nothing
    if host.is_controller:
        lines.append(access.checker_identity_line())
    files += [PlannedFile(controller_spec.CTL_SCRIPT, controller.ctl_script, 0o755, "root", "root"),
              PlannedFile(access.CTL_AUTHORIZED_KEYS, access.authorized_keys_text(controller.keys).encode(), 0o644,
                          "root", "root"),
              PlannedFile(controller_spec.CTL_SUDOERS, access.sudoers_text().encode(), 0o440, "root", "root",
                          check=access.SUDOERS_CHECK),
              PlannedFile(controller_spec.CTL_IDENTITIES, access.identities_text(tuple(lines)).encode(), 0o644,
                          "root", "root")]
    users.append(controller_spec.CTL_USER)


def _controller(mesh: Mesh, inputs: PlanInputs, controller: ControllerInputs, folders: list[PlannedFolder],
                files: list[PlannedFile], users: list[str], units: list[str]) -> None:
    """The controller service: its folder (its user's group may read), the controllers' intermediate (the key
    its user's alone), Consul's token and CA, the known_hosts of every host, its unit. spec.json comes last,
    once the rest of the plan is known (build_plan)."""
    user = controller_spec.CONTROLLER_USER
    folders += [PlannedFolder(controller_spec.CONTROLLER_DIR, 0o750, "root", user),
                PlannedFolder(controller_spec.CA_DIR, 0o750, "root", user)]
    files.append(PlannedFile(controller_spec.ROOT_CERT, inputs.ca_root_pem, 0o644, "root", "root"))
    if controller.issuer_cert is not None and controller.issuer_key is not None:
        files += [PlannedFile(controller_spec.INTERMEDIATE_CERT, controller.issuer_cert, 0o644, "root", "root"),
                  PlannedFile(controller_spec.INTERMEDIATE_KEY, controller.issuer_key, 0o600, user, user, secret=True)]
    if inputs.consul_token is not None:
        files.append(PlannedFile(controller_spec.TOKEN_FILE, inputs.consul_token, 0o600, user, user, secret=True))
    if inputs.consul_ca is not None:
        files.append(PlannedFile(controller_spec.CONSUL_CA_FILE, inputs.consul_ca, 0o644, "root", "root"))
    known = "".join(line + "\n" for host in mesh.hosts for line in controller.known_hosts.get(host.name, ()))
    files += [PlannedFile(controller_spec.KNOWN_HOSTS, known.encode(), 0o644, "root", "root"),
              PlannedFile(CONTROLLER_UNIT_PATH, render_controller_unit().encode(), 0o644, "root", "root",
                          check=unit_check(CONTROLLER_UNIT))]
    users.append(user)
    units.append(CONTROLLER_UNIT)


def _proxy_plan(mesh: Mesh, host: ManagedHost, workload: Workload, inputs: PlanInputs) -> ProxyPlan:
    config = compute_proxy_config(mesh, workload, inputs.overrides, authz_overrides=inputs.authz_overrides)
    proxy = config.proxy
    rendered = render_proxy_files(config)
    container = host.kind == "container_host"
    user = str(SIDECAR_UID) if container else paths.envoy_user(proxy)
    group = user
    reader = "0" if container else "root"
    folders = (PlannedFolder(paths.proxy_dir(proxy), 0o750, reader, group),
               PlannedFolder(paths.xds_dir(proxy), 0o750, reader, group),
               PlannedFolder(paths.admin_dir(proxy), 0o700, user, group))
    files = [PlannedFile(paths.proxy_ca_path(proxy), inputs.ca_root_pem, 0o640, reader, group, "reload")]
    live = controller_files(config, rendered) if inputs.controller and inputs.controller.endpoints_live \
        else frozenset()
    files += [PlannedFile(item.path, item.content.encode(), 0o640, reader, group, FILE_EFFECT[item.kind],
                          controller_owned=item.path in live)
              for item in rendered.files]
    unit = None
    sidecar = None
    if container:
        image = inputs.sidecar_image or ""
        bootstrap = rendered.bootstrap
        sidecar = bootstrap_sidecar(host, workload, image, bootstrap.path, bootstrap.sha256, config.xds is not None)
    else:
        unit = PlannedFile(paths.envoy_unit_path(proxy), render_envoy_unit(config).encode(), 0o644, "root", "root",
                           "restart", check=unit_check(paths.envoy_unit_name(proxy)))
    return ProxyPlan(proxy, workload, config, user, folders, tuple(files), unit, rendered.bootstrap_sha256,
                     rendered, sidecar)


def _unique_folders(folders: list[PlannedFolder]) -> list[PlannedFolder]:
    seen: dict[str, PlannedFolder] = {}
    for folder in folders:
        seen.setdefault(folder.path, folder)
    return list(seen.values())
