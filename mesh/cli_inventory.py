"""How a command that acts on a fleet is told its inventory: INVENTORY, `-i PATH` (as Ansible takes it), or
$MESH_INVENTORY. It owns the options and their resolution; it must not load the inventory.
"""

from __future__ import annotations

import os

import click

from mesh.errors import UsageError

INVENTORY_ENV = "MESH_INVENTORY"

inventory_argument = click.argument("inventory_path", metavar="[INVENTORY]", required=False)
inventory_option = click.option("-i", "--inventory", "inventory_option", metavar="PATH", default=None,
                                help=f"The inventory (as ansible-playbook -i); default: ${INVENTORY_ENV}.")


def fleet_inventory(positional: str | None, option: str | None) -> str:
    """The inventory path from the command line, else from $MESH_INVENTORY; a usage error when there is none."""
    if positional and option and positional != option:
        raise UsageError(f"two inventories given: {positional!r} and -i {option!r}", "give one")
    chosen = positional or option or os.environ.get(INVENTORY_ENV)
    if not chosen:
        raise UsageError(f"no inventory: give INVENTORY or -i PATH, or set {INVENTORY_ENV}")
    return chosen
