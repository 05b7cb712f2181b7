"""The `mesh lab` command group (placeholder until the lab lands)."""

from __future__ import annotations

import click


@click.group()
def lab() -> None:
    """A real multi-node fleet on this machine: nspawn VMs, a Docker host and Consul."""
