"""`mesh controller rotate-keys [-i INVENTORY]`: every controller gets a new SSH key (made on it, as on a first
deploy) and every managed host's authorized_keys is replaced. A deploy whose preparation removes the controllers'
keys first: the plan then holds the new public keys, the access play rewrites authorized_keys on every host (the
old keys stop working there), and the controller play restarts each controller with its new key.
"""

from __future__ import annotations

from dataclasses import replace

import click

from mesh.cli_inventory import fleet_inventory, inventory_option
from mesh.hosts.timeouts import DEFAULT_TIMEOUTS


@click.command("rotate-keys")
@inventory_option
@click.option("-f", "--forks", default=20, show_default=True, type=click.IntRange(1, 500),
              help="Hosts deployed in parallel.")
@click.option("-T", "--timeout", "connect_timeout", default=DEFAULT_TIMEOUTS.connect, show_default=True,
              type=click.FloatRange(min=1), metavar="SECONDS", help="SSH connect timeout.")
@click.pass_context
def rotate_keys_command(ctx: click.Context, inventory_option: str | None, forks: int, connect_timeout: float) -> None:
    """A new SSH key on every controller, and every host's authorized_keys replaced (a deploy of the whole
    inventory: the old keys are refused everywhere once it finished)."""
    from mesh.deploy.command import DeployOptions, deploy
    from mesh.hosts.connection import connector_factory

    options = DeployOptions(forks=forks, rotate_controller_keys=True)
    ctx.exit(deploy(fleet_inventory(None, inventory_option), options,
                    connector_factory=connector_factory(replace(DEFAULT_TIMEOUTS, connect=connect_timeout))))
