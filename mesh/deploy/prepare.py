"""The phases of a deploy before anything changes, shared by `mesh deploy` and `mesh plan`: what the plan needs
(Envoy's binary, the sidecar image, the checker's wheels and Consul files), the plan itself, its check by the
local Envoy, and the observation of every target host. It wires those parts; it computes nothing itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mesh import catalog, controller_env
from mesh.config.validate import envoy_binary
from mesh.containers.image import SidecarImage, build_sidecar_image_tar
from mesh.controller.spec import ControllerSpec
from mesh.deploy.controller_inputs import controller_inputs, remove_controller_keys
from mesh.deploy.display import Display
from mesh.deploy.steps.context import ControllerWheels, LocalFile
from mesh.errors import MeshError
from mesh.hosts.connection import Connector
from mesh.inventory.model import ManagedHost, Mesh
from mesh.local_cache import cache_dir
from mesh.pki import CertificateAuthority
from mesh.pki.authority import CA_FOLDER
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.plan.changes import Change, certificate_reason_for
from mesh.plan.fleet import observe_fleet, validate_plan
from mesh.plan.model import Plan
from mesh.plan.report import FleetChanges, consul_changes
from mesh.plan.runtime import NO_OVERRIDES, RuntimeOverrides

WHEELS_CACHE = "wheels"  # under mesh_state_dir
IMAGES_CACHE = "images"  # in mesh.local_cache: the sidecar image tarball
ENVOY_CACHE = "envoy"  # in mesh.local_cache: Envoy's binary gzip-compressed for the wire, its sha256
VALIDATED_CACHE = "validated"  # in mesh.local_cache: a marker per proxy config the local Envoy accepted


@dataclass(frozen=True)
class Prepared:
    """Everything decided before the act phase."""

    plan: Plan
    envoy: LocalFile
    image: SidecarImage | None
    wheels: ControllerWheels | None
    fleet: FleetChanges


def prepare(mesh: Mesh, ca: CertificateAuthority, targets: Sequence[ManagedHost],
            connect: Callable[[ManagedHost], Connector], out: Display, forks: int = 20, diffs: bool = False,
            consul: bool = False, envoy: str | None = None, retired: Sequence[ManagedHost] = (),
            make_controller_keys: bool = False, rotate_controller_keys: bool = False,
            overrides: RuntimeOverrides = NO_OVERRIDES) -> Prepared:
    """Plan every managed host, check each distinct proxy config with the local Envoy (PlanRefused: nothing
    touched), then observe the targets. `consul` adds the catalog's pending changes; `envoy` the local Envoy
    (MESH_ENVOY, else mesh's own) that checks configs; `retired` hosts (they left the inventory) are planned
    with nothing on them. Before the plan, the controllers' public keys are read (mesh.deploy.controller_inputs;
    `make_controller_keys`: a deploy makes a missing key on its controller, and the controllers' intermediate;
    `rotate_controller_keys`: the targeted controllers' keys are removed first, so each gets a new one).
    `overrides`: the run-time overrides read from Consul (mesh.plan.runtime.read_runtime_overrides)."""
    if rotate_controller_keys and make_controller_keys:
        rotated = remove_controller_keys([host for host in targets if host.is_controller], connect, out.warning)
        out.line(f"controller keys removed, new ones made now: {', '.join(rotated) or 'none'}")
    controller = _controller_inputs(mesh, ca, connect, out, forks,
                                    [host.name for host in targets if host.is_controller] if make_controller_keys
                                    else [])
    plan, binary, image = _checked_plan(mesh, ca, targets, out, envoy, retired, controller, overrides)
    wheels = _wheels(mesh, targets)
    observed = observe_fleet(plan, targets, connect, certificate_reason_for(ca, mesh.settings.cert_ttl),
                             wheels.marker if wheels else None, diffs=diffs, forks=forks)
    pending = _consul_changes(mesh) if consul else ()
    fleet = FleetChanges(tuple(observed[host.name] for host in targets), tuple(pending))
    return Prepared(plan, binary, image, wheels, fleet)


def check_here(mesh: Mesh, targets: Sequence[ManagedHost], out: Display, envoy: str | None = None,
               retired: Sequence[ManagedHost] = (),
               overrides: RuntimeOverrides = NO_OVERRIDES) -> None:
    """Before any host is reached: every distinct proxy config checked by the local Envoy (PlanRefused, exit 1).
    The plan is made with the state dir's CA, or a throwaway one when there is none yet (Envoy judges the files
    alike whichever root they carry); `prepare`'s plan, made once the hosts' trust bundles are read, then finds
    its configs in the validation cache. A state dir whose CA cannot be loaded is left to the trust phase."""
    with tempfile.TemporaryDirectory(prefix="mesh-precheck-ca-") as scratch:
        try:
            if os.path.lexists(os.path.join(os.path.abspath(mesh.settings.state_dir), CA_FOLDER)):
                ca = CertificateAuthority.load(mesh.settings.state_dir)
            else:  # nothing is written to a state dir without a CA before the hosts' trust is read
                mesh = replace(mesh, settings=replace(mesh.settings, state_dir=scratch))
                ca, _ = CertificateAuthority.ensure(scratch, mesh.settings.trust_domain)
        except MeshError:
            return
        _checked_plan(mesh, ca, targets, None, envoy, retired, overrides=overrides)


def _controller_inputs(mesh: Mesh, ca: CertificateAuthority, connect: Callable[[ManagedHost], Connector],
                       out: Display, forks: int, create_on: Sequence[str]) -> ControllerInputs | None:
    from mesh.controller.protocol import script_text

    inputs = controller_inputs(mesh, ca, connect, create_on, out.warning, script_text().encode(), forks)
    if inputs is not None and mesh.settings.consul_url:
        out.line("a controller answered: endpoint files on hosts are its own (written only when missing)"
                 if inputs.endpoints_live else "no controller answered: endpoint files written by this deploy")
    return inputs


def _checked_plan(mesh: Mesh, ca: CertificateAuthority, targets: Sequence[ManagedHost], out: Display | None,
                  envoy: str | None, retired: Sequence[ManagedHost],
                  controller: ControllerInputs | None = None,
                  overrides: RuntimeOverrides = NO_OVERRIDES
                  ) -> tuple[Plan, LocalFile, SidecarImage | None]:
    """The plan of every managed host, each distinct proxy config checked by the local Envoy (PlanRefused)."""
    local_envoy = envoy or os.environ.get("MESH_ENVOY") or envoy_binary()
    binary = LocalFile(Path(local_envoy), cache_dir(ENVOY_CACHE))
    image = _sidecar_image(mesh, targets, out)
    wants_envoy = any((h.kind == "vm" and h.workloads) or (h.is_controller and controller) for h in mesh.hosts)
    inputs = PlanInputs(ca.bundle_pem, ca.root_fingerprint,  # the bundle of the CA's rotation phase
                        envoy_sha256=binary.sha256 if wants_envoy else None,
                        sidecar_image=image.tag if image is not None else None,
                        consul_token=_token(mesh), consul_ca=_consul_ca(mesh), controller=controller,
                        overrides=overrides.traffic, authz_overrides=overrides.authz)
    started = time.monotonic()
    plan = build_plan(mesh, inputs, [*mesh.hosts, *retired])
    checked = validate_plan(plan, ca.root_pem, local_envoy, binary.sha256, cache_dir(VALIDATED_CACHE))
    if out is not None:
        out.line(f"plan {plan.digest[:12]}: {sum(len(h.proxies) for h in plan.hosts)} proxies on "
                 f"{len(plan.hosts)} hosts, {checked} distinct config(s) checked by Envoy "
                 f"({time.monotonic() - started:.1f} s)")
    return plan, binary, image


def _sidecar_image(mesh: Mesh, targets: Sequence[ManagedHost], out: Display | None) -> SidecarImage | None:
    """The sidecar image tarball (built once per Envoy binary, cached in mesh_state_dir) when container hosts
    are planned; with the start step's tools when one of them is on `mesh_delivery: xds`."""
    if not any(host.kind == "container_host" and host.workloads for host in mesh.hosts):
        return None
    started = time.monotonic()
    start_step = any(host.kind == "container_host" and host.workloads and host.delivery == "xds" for host in mesh.hosts)
    image = build_sidecar_image_tar(cache_dir(IMAGES_CACHE), start_step=start_step)
    if out is not None:
        out.line(f"sidecar image {image.tag} ({image.path.stat().st_size >> 20} MiB, "
                 f"{time.monotonic() - started:.1f} s)")
    return image


def _wheels(mesh: Mesh, targets: Sequence[ManagedHost]) -> ControllerWheels | None:
    if not any(host.is_controller for host in targets):
        return None
    wheels = controller_env.build_wheels(Path(mesh.settings.state_dir) / WHEELS_CACHE)
    return ControllerWheels(tuple(wheels), controller_env.wheel_set_marker(wheels))


def _token(mesh: Mesh) -> bytes | None:
    if not mesh.settings.consul_token_file or not mesh.controllers:
        return None
    return catalog.read_token(mesh.settings.consul_token_file).encode() + b"\n"


def _consul_ca(mesh: Mesh) -> bytes | None:
    path = mesh.settings.consul_ca_file
    if not path or not mesh.controllers:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise MeshError(f"cannot read mesh_consul_ca_file {path}: {exc.strerror or exc}") from None


def _consul_changes(mesh: Mesh) -> list[Change]:
    if not mesh.settings.consul_url:
        return []
    try:
        pending = catalog.plan(catalog.access_for(mesh), mesh)
    except catalog.TokenRefused:
        raise
    except MeshError:
        return []
    return consul_changes(pending.register, pending.deregister)


def inventory_spec(inventory_path: str, out: Display | None = None) -> ControllerSpec:
    """The spec a deploy of the inventory would hand to its controllers, computed here without reaching a host
    (`mesh controller run -i INVENTORY`): the state dir's CA (which must exist), the controllers' public keys the
    last deploy recorded, the known_hosts lines the deploy would check, the local Envoy and sidecar image."""
    from mesh.controller.protocol import script_text
    from mesh.controller.spec import SPEC_PATH, parse_spec
    from mesh.deploy.controller_inputs import controller_active, known_hosts_lines, recorded_keys
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    mesh = check_inventory(load_inventory(inventory_path), inventory_path).mesh
    if not mesh.controllers:
        raise MeshError(f"{inventory_path} has no host in mesh_controllers: there is no controller spec")
    ca = CertificateAuthority.load(mesh.settings.state_dir)
    issuer = ca.controller_issuer(create=False)
    controller = ControllerInputs(keys=recorded_keys(mesh.settings.state_dir),
                                  known_hosts={host.name: known_hosts_lines(host) for host in mesh.hosts},
                                  issuer_cert=issuer.cert_pem if issuer else None,
                                  issuer_key=issuer.key_pem if issuer else None, ctl_script=script_text().encode(),
                                  endpoints_live=controller_active(mesh, out.warning if out else lambda _: None))
    from mesh.plan.runtime import read_runtime_overrides

    overrides = read_runtime_overrides(mesh, out.warning if out else lambda _: None)
    plan, _, _ = _checked_plan(mesh, ca, mesh.hosts, out, None, (), controller, overrides)
    return parse_spec(plan.host(mesh.controllers[0].name).file(SPEC_PATH).content.decode(), inventory_path)
