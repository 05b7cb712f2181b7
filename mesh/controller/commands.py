"""`mesh controller ...`: the live controller from the command line (the service runs `python -m mesh.controller`).

Thin: parses options, builds the spec loader and the options, calls mesh.controller.daemon.serve.
"""

from __future__ import annotations

import os

import click

from mesh.cli_inventory import fleet_inventory
from mesh.controller.spec import CA_DIR, SSH_KEY, ControllerSpec, load_spec
from mesh.errors import UsageError


@click.group()
def controller() -> None:
    """The live controller: Consul's endpoints, resource files and certificates pushed to every host."""


def spec_from_inventory(inventory: str) -> ControllerSpec:
    """The spec a deploy of `inventory` would hand to its controllers (its plan, known_hosts and connections).

    Built by mesh.deploy.prepare.inventory_spec (no host reached: the state dir's CA and recorded controller keys)."""
    from mesh.deploy.prepare import inventory_spec

    return inventory_spec(inventory)


@controller.command("run")
@click.option("--spec", "spec_path", default=None, type=click.Path(dir_okay=False),
              help="The spec.json a deploy wrote (re-read on SIGHUP).")
@click.option("-i", "--inventory", default=None,
              help="Build the spec from this inventory instead (default without --spec: $MESH_INVENTORY).")
@click.option("--ssh-key", default=SSH_KEY, show_default=True, help="The controller's SSH key for mesh-ctl.")
@click.option("--ca-dir", default=CA_DIR, show_default=True,
              help="Holds root.pem, intermediate.pem and intermediate.key (the controller's intermediate).")
@click.option("--envoy", default=None, help="Envoy binary validating bundles (default: mesh's own).")
@click.option("--holder", default=None, help="Name in the lock and the published state (default host:pid).")
def run(spec_path: str | None, inventory: str | None, ssh_key: str, ca_dir: str, envoy: str | None,
        holder: str | None) -> None:
    """Run a controller in the foreground until Ctrl-C (SIGHUP re-reads the spec or the inventory)."""
    from mesh.config.validate import envoy_binary
    from mesh.controller.daemon import ControllerOptions, serve

    if spec_path is not None and inventory is not None:
        raise UsageError("mesh controller run takes one of --spec PATH and -i INVENTORY, not both")
    if spec_path is None:
        inventory = fleet_inventory(None, inventory)  # -i, else $MESH_INVENTORY, else a usage error
    if inventory is not None:
        source = inventory

        def load() -> ControllerSpec:  # SIGHUP builds it again from the inventory as it is then
            return spec_from_inventory(source)
    else:
        path = str(spec_path)

        def load() -> ControllerSpec:
            return load_spec(path)

    options = ControllerOptions(key_path=ssh_key, intermediate_cert=os.path.join(ca_dir, "intermediate.pem"),
                                intermediate_key=os.path.join(ca_dir, "intermediate.key"),
                                root_cert=os.path.join(ca_dir, "root.pem"), envoy=envoy or envoy_binary(),
                                holder=holder)
    serve(load, options)


def _add_rotate_keys() -> None:
    from mesh.deploy.rotate_keys import rotate_keys_command  # a deploy: H-C's module

    controller.add_command(rotate_keys_command)


_add_rotate_keys()
